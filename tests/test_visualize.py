"""The visualize stage end to end on tiny data: the report is one page that a browser renders.

The browser is Debian's chromium, run headless for real (``make test`` installs it when missing);
without it the browser test is skipped and says why.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import from_dict
from pipeline.errors import MissingInputError
from pipeline.stages import augment, download, evaluate, finetune, pretrain, split, visualize
from tests.conftest import params_for, sync_matrix

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it as root)"
)

# Added to a copy of the report by the test only: once the page has loaded, counts the <img>
# elements the browser could not load and size (a broken image has no natural width), and writes
# the outcome where --dump-dom shows it. (Awaiting img.decode() instead is flaky: decoding runs
# outside headless Chromium's virtual time, so the DOM is often dumped first.) Every pixel of
# every embedded PNG is decoded by Pillow in embedded_images().
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((image) => !(image.complete && image.naturalWidth > 0));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = `images=${images.length} broken=${broken.length}`;
  document.body.appendChild(out);
});
</script>"""


def tiny_study(
    tiny_idx: Path,
    backbone: str = "lenet5",
    methods=("scratch", "vae", "gan", "pca"),
    modes=("linear", "knn"),
) -> dict:
    params = params_for("idx", split={"label_fractions": [0.5, 1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(backbone=backbone, width=8)
    params["pretrain"].update(methods=list(methods), epochs=2, batch_size=64)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["finetune"].update(
        modes=list(modes),
        max_passes=1,
        min_steps=4,
        batch_size=32,
        min_steps_per_epoch=2,
        seeds=[0],
    )
    params["finetune"]["knn"] = {"ks": [1, 5], "temperatures": [0.1]}
    params["evaluate"]["bootstrap"] = 20
    params["visualize"].update(
        embedding_images=60,
        embeddings=["tsne"],
        deconv_images=32,
        deconv_channels=2,
        deconv_top=3,
        cam_examples=1,
    )
    params["visualize"]["toy"].update(samples=60, depths=[0, 2], widths=[8], steps=30)
    return sync_matrix(params)


def run_study(params: dict) -> dict:
    config = from_dict(params)
    download.run(config)
    split.run(config)
    augment.run(config)
    for method in config.pretrain.methods:
        pretrain.run(config, method=method)
    for init, mode, fraction in config.finetune.cells():
        finetune.run(config, init=init, mode=mode, fraction=str(fraction))
    evaluate.run(config)
    return visualize.run(config)


def embedded_images(html: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', html):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()  # decodes every pixel: a truncated PNG raises here
        images.append(image)
    return images


@pytest.fixture(scope="module")
def lenet_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny study (lenet5; scratch, vae, gan, pca; linear and kNN) shared by the report
    tests."""
    from tests.conftest import tiny_images, write_idx

    root = tmp_path_factory.mktemp("study")
    data = root / "tiny_idx"
    for prefix, n, seed in (("train", 400, 1), ("t10k", 100, 2)):
        images, labels = tiny_images(n, 4, 8, seed)
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels)
    work = root / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        params = tiny_study(data)
        result = run_study(params)
    assert result["report"] == "reports/index.html"
    return work, params


@pytest.fixture
def lenet_report(lenet_study: tuple[Path, dict]) -> Path:
    return lenet_study[0] / "reports" / "index.html"


def test_the_report_has_every_section_in_pipeline_order_and_its_figures(lenet_report: Path):
    html = lenet_report.read_text()
    ids = re.findall(r'<section id="(\w+)">', html)
    assert ids == [
        "data",
        "augment",
        "pretrain",
        "encoders",
        "embeddings",
        "finetune",
        "evaluate",
        "interpret",
        "course",
        "run",
    ]
    # Self-contained: every image is embedded, nothing is fetched from elsewhere.
    assert not re.search(r'<img src="(?!data:)', html)
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html
    images = embedded_images(html)
    figures = sorted(p.name for p in (lenet_report.parent / "figures/visualize").glob("*.png"))
    assert len(images) == len(figures) + 2  # + the augment preview and the label-efficiency plot
    for name in (
        "samples",
        "pretrain_curves",
        "vae",
        "gan",
        "gan_monitors",
        "generative_samples",
        "filters_vae",
        "filters_gan",
        "filters_pca",
        "feature_maps_vae",
        "deconv_gan",
        "embeddings",
        "finetune_curves",
        "confusion",
        "cam_scratch",
        "cam_vae",
        "cam_gan",
        "cam_pca",
        "decision_boundaries",
    ):
        assert f"{name}.png" in figures
    # The generative models' samples side by side, in pretrain.methods order.
    assert "Generative models" in html and "side by side: vae, gan (" in html
    for image in images:
        pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 1.0  # not a blank canvas
    # The run: its commit, its params and the MLflow run ids of every job.
    assert "pipeline id" in html and "params.yaml" in html
    run_ids = re.findall(r"<td>([0-9a-f]{32})</td>", html)
    # download, split, augment, 4 pretrain, 4 x 2 x 2 finetune cells, evaluate and this run
    assert len(set(run_ids)) == 1 + 1 + 1 + 4 + 16 + 1 + 1
    # The answer in one sentence, beside the figure: the self-supervised init (VAE or GAN here)
    # against the best baseline (scratch or PCA), each chosen on validation, the difference with
    # its paired interval and what the interval allows one to say.
    answer = re.search(r"<p>(Answer: self-supervision .*?)</p>", html, re.S)
    assert answer and re.search("with 50 % of the labels (vae|gan)-", answer.group(1))
    verdict = (
        r"(\w+-\w+ beats \w+-\w+|the interval holds zero, so the two cannot be told apart"
        r"|but the seeds disagree on its sign)"
    )
    clause = (
        r"vs (scratch|pca)-\w+ [0-9.]+ %: [+-][0-9.]+ points \[[+-][0-9.]+, [+-][0-9.]+\]"
        r"( \(per seed [+-][0-9.]+(, [+-][0-9.]+)+\))?, "
    )
    assert len(re.findall(clause + verdict, answer.group(1))) == 2  # 50 % and 100 %
    # One sentence: the report's is the one metrics/summary.md ends with.
    summary_md = (lenet_report.parents[1] / "metrics/summary.md").read_text()
    assert unescape(answer.group(1)) == summary_md.splitlines()[-1]
    assert html.index("Answer: ") < html.index("Test accuracy against the labeled fraction")
    # Why each trained seed stopped, cell by cell.
    assert "Why each seed stopped" in html
    assert re.search(
        r"<td>scratch-linear-0\.5</td>.*?<td>(early stopping|cap)( †)?</td>", html, re.S
    )


def test_the_report_says_how_many_images_each_encoder_learned_from(lenet_study):
    """Without a pool every trained encoder (and PCA) saw the training split, nothing more;
    scratch saw nothing. (With a pool, tests/test_runners.py reads "+ M pool images" in a report
    made by both runners; here the pool's wording is checked on a pretraining record.)"""
    work, _ = lenet_study
    html = unescape((work / "reports/index.html").read_text())
    encoders = html[html.index('<section id="encoders">') : html.index('<section id="embeddings">')]
    training = len(np.load(work / "data/splits/idx/train.npy"))
    for method in ("vae", "gan", "pca"):
        assert f"{method} learned from {training} training images." in encoders, method
    assert "scratch learned from no images" in encoders
    assert "pool images" not in encoders
    record = {"images_seen": training + 36, "pool_images": 36}
    said = visualize._learned_from("simclr", record, training)
    assert said == f"simclr learned from {training} training + 36 pool images."


def test_the_figures_and_the_page_are_logged_to_the_stage_mlflow_run(lenet_study):
    from mlflow.tracking import MlflowClient

    work, _ = lenet_study
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("label-efficiency")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'visualize'")
    assert runs and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert "index.html" in [a.path for a in client.list_artifacts(run_id)]
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "figures")}
    assert logged == {p.name for p in (work / "reports/figures/visualize").glob("*.png")}
    assert runs[0].data.metrics["figures"] == len(logged)


def test_a_second_run_draws_the_same_figures(lenet_study: tuple[Path, dict]):
    work, params = lenet_study
    figures = work / "reports/figures/visualize"
    before = {p.name: p.read_bytes() for p in figures.glob("*.png")}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        visualize.run(from_dict(params))
    after = {p.name: p.read_bytes() for p in figures.glob("*.png")}
    assert after.keys() == before.keys()
    assert [name for name in before if before[name] != after[name]] == []


@needs_chromium
def test_the_report_opens_in_headless_chromium_with_every_image_decoded(
    lenet_report: Path, tmp_path: Path
):
    page = tmp_path / "probe.html"
    page.write_text(lenet_report.read_text().replace("</body>", PROBE + "</body>"))
    browser = _browser(tmp_path, 20000)
    dom = _dump_dom(browser, page)
    found = re.search(r"images=(\d+) broken=(\d+)", dom)
    assert found, f"the page's load handler never ran: {dom[-300:]!r}"
    count, broken = map(int, found.groups())
    assert count == len(embedded_images(lenet_report.read_text())) and count > 10
    assert broken == 0
    pixels = _screenshot(browser, lenet_report, tmp_path / "shot.png").mean(axis=2)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 10  # text and figures, not a blank page
    assert (pixels < 128).mean() > 0.01  # some dark ink on the light background


@needs_chromium
def test_the_browser_probe_sees_a_broken_image(tmp_path: Path):
    good = base64.b64encode(_tiny_png()).decode()
    page = tmp_path / "page.html"
    page.write_text(
        f'<html><body><img src="data:image/png;base64,{good}">'
        f'<img src="data:image/png;base64,bm90IGEgcG5n">{PROBE}</body></html>'
    )
    assert "images=2 broken=1" in _dump_dom(_browser(tmp_path, 5000), page)


def _browser(tmp_path: Path, budget_ms: int) -> list[str]:
    """Headless chromium with a fresh profile and ``budget_ms`` of virtual time per page."""
    return [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--virtual-time-budget={budget_ms}",
    ]


def _dump_dom(browser: list[str], page: Path) -> str:
    """The page's DOM after its load handlers ran (where the probes write their outcome)."""
    command = [*browser, "--dump-dom", page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def _screenshot(browser: list[str], page: Path, shot: Path) -> np.ndarray:
    """The first 1200 x 1600 pixels of the page as the browser draws them (RGB, float)."""
    command = [*browser, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()]
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(shot).convert("RGB"), dtype=float)


# A page that shows another one in a frame and, once both have loaded, writes how the browser read
# the framed one: its content type and how many of its <img> elements failed to load. Needs
# --allow-file-access-from-files (file:// pages are otherwise each their own origin).
FRAME_PROBE = """<!DOCTYPE html><html><body>
<iframe id="page" src="{src}" width="1200" height="1600"></iframe>
<script>
window.addEventListener("load", () => {{
  const doc = document.getElementById("page").contentDocument;
  const images = Array.from(doc.images);
  const broken = images.filter((image) => !(image.complete && image.naturalWidth > 0));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = `type=${{doc.contentType}} images=${{images.length}} broken=${{broken.length}}`;
  document.body.appendChild(out);
}});
</script></body></html>"""


def assert_opens_as_a_page(page: Path, tmp_path: Path) -> None:
    """Chromium opens ``page`` from where it lies as a rendered HTML page: its title is an element,
    not source text, every image loads, and it draws exactly like a plain ``.html`` copy.

    Why from where it lies: an output that is a symlink into DVC's cache (a file named by its
    md5, no extension) is served as text/plain, because Chromium follows the link and types the
    file by the target's name (issue 24). The page's bytes are fine, so a copy never shows it.
    """
    html = page.read_text()
    title = re.search(r"<title>([^<]+)</title>", html).group(1)
    browser = _browser(tmp_path, 20000)
    dom = _dump_dom(browser, page)
    assert "&lt;html" not in dom, f"{page} is shown as its source text: {dom[:300]!r}"
    assert f"<title>{title}</title>" in dom, dom[:300]
    frame = tmp_path / "frame.html"
    frame.write_text(FRAME_PROBE.format(src=page.as_uri()))
    probe = _dump_dom([*browser, "--allow-file-access-from-files"], frame)
    found = re.search(r"type=(\S+) images=(\d+) broken=(\d+)", probe)
    assert found, f"the frame's load handler never ran: {probe[-300:]!r}"
    images = len(re.findall(r"<img\b", html))
    assert found.groups() == ("text/html", str(images), "0") and images > 0, found.group(0)
    copy = tmp_path / "copy.html"
    copy.write_bytes(page.read_bytes())
    drawn = _screenshot(browser, page, tmp_path / "page.png")
    plain = _screenshot(browser, copy, tmp_path / "copy.png")
    assert drawn.shape == (1600, 1200, 3)
    assert np.abs(drawn - plain).mean() < 1.0, f"{page} is drawn unlike a plain copy of it"


# Added to a copy of the report by the test only: once the page has loaded, counts the evaluation
# section's tables the browser shows (checkVisibility: a closed <details> hides its content), then
# opens every folded metric the way a reader does, by clicking its summary, and counts again.
SELECTOR_PROBE = """<script>
window.addEventListener("load", () => {
  const section = document.getElementById("evaluate");
  const shown = () => Array.from(section.querySelectorAll("table"))
    .filter((table) => table.checkVisibility()).length;
  const before = shown();
  section.querySelectorAll("details > summary").forEach((summary) => summary.click());
  const out = document.createElement("pre");
  out.id = "selector";
  out.textContent = `tables=${section.querySelectorAll("table").length} ` +
    `shown=${before} opened=${shown()}`;
  document.body.appendChild(out);
});
</script>"""


def _evaluation_section(html: str) -> str:
    return re.search(r'<section id="evaluate">(.*?)</section>', html, re.S).group(1)


def test_the_report_shows_accuracy_and_folds_every_other_metric(lenet_study):
    from pipeline.evaluation import HEADLINE, METRICS

    work, _ = lenet_study
    section = _evaluation_section((work / "reports/index.html").read_text())
    captions = re.findall(r"<caption>Test ([^<(]+?) \(", section)
    assert captions == [m.title for m in METRICS.values()]  # accuracy first, then the registry
    # Only the headline table is outside a <details>; each other sits under its meaning.
    unfolded = re.sub(r"<details>.*?</details>", "", section, flags=re.S)
    assert re.findall(r"<caption>Test ([^<(]+?) \(", unfolded) == [METRICS[HEADLINE].title]
    folded = re.findall(r"<details><summary>([^<]*)</summary>\s*<table>", section)
    assert [unescape(text) for text in folded] == [
        f"{m.title}: {m.meaning}" for n, m in METRICS.items() if n != HEADLINE
    ]
    # One formatter: the report's cells are summary.md's, metric by metric.
    markdown = (work / "metrics/summary.md").read_text()
    cells = re.findall(r"<td[^>]*>(\d+\.\d+ ± \d+\.\d+ \[[^<†]*\])( †)?</td>", section)
    assert len(cells) == len(METRICS) * 4 * 2 * 2  # every metric: 4 inits x 2 modes x 2 fractions
    for cell, _ in cells:
        assert f"| {cell} |" in markdown, cell


@needs_chromium
def test_the_metric_selector_opens_in_headless_chromium(lenet_report: Path, tmp_path: Path):
    page = tmp_path / "selector.html"
    page.write_text(lenet_report.read_text().replace("</body>", SELECTOR_PROBE + "</body>"))
    dom = _dump_dom(_browser(tmp_path, 5000), page)
    found = re.search(r"tables=(\d+) shown=(\d+) opened=(\d+)", dom)
    assert found, f"the page's load handler never ran: {dom[-300:]!r}"
    from pipeline.evaluation import METRICS

    assert tuple(map(int, found.groups())) == (len(METRICS), 1, len(METRICS))


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    return buffer.getvalue()


def test_cam_falls_back_to_grad_cam_for_an_mlp_and_the_report_says_so(
    workdir: Path, tiny_idx: Path
):
    run_study(tiny_study(tiny_idx, backbone="mlp", methods=("scratch",), modes=("linear",)))
    html = (workdir / "reports/index.html").read_text()
    assert 'class="note"' in html
    note = re.search(r'<p class="note">(scratch-linear-1\.0: Grad-CAM[^<]*)</p>', html)
    assert note, "the fallback to Grad-CAM is not said in the report"
    assert "mlp" in note.group(1)
    assert (workdir / "reports/figures/visualize/cam_scratch.png").is_file()


def test_a_summary_without_the_answer_names_the_stage_to_rerun():
    config = from_dict(params_for("fashion_mnist"))
    document = {"test_accuracy": {}}  # written before the answer carried its paired interval
    with pytest.raises(MissingInputError, match="has no 'answer'.*python -m pipeline evaluate"):
        visualize._answer(config, document)


def test_the_page_escapes_text_and_marks_the_best_cells(tmp_path: Path):
    from pipeline.viz import report

    section = report.Section("data", "Data <b>", ["a class named <script>alert(1)</script>"])
    section.table(report.Table(["model", "acc"], [["a", "0.5"], ["b", "0.9"]], {(1, 1)}))
    section.table(report.Table(["model", "nll"], [["a", "0.3"]]), "NLL", folded="NLL: <i>nats</i>")
    html = report.render("T & T", [("commit", "abc")], [section])
    assert "<details><summary>NLL: &lt;i&gt;nats&lt;/i&gt;</summary>\n<table>" in html
    assert html.index("</table>\n</details>") > html.index("<caption>NLL</caption>")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<title>T &amp; T</title>" in html
    assert re.findall(r'<td class="best">([^<]*)</td>', html) == ["0.9"]
    with pytest.raises(ValueError, match="only PNG, JPEG and SVG"):
        report.data_uri(tmp_path / "notes.txt")
