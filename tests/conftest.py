"""Shared fixtures: every test works in its own tmp folder, with tiny data it makes itself.

Nothing here touches the network; the only outside data is Debian's Fashion-MNIST package, and the
tests that need it are skipped (with the reason) where it is not installed.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
VENV_BIN = Path(sys.executable).parent

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (make setup installs it)",
)

#: The files that take minutes (whole pipelines, killed and resumed training, DDP, a SLURM
#: cluster, UMAP's compilation), heaviest first as measured in CI. `make test` gives whole files
#: to its processes in collection order (pytest -n --dist loadfile --no-loadscope-reorder), and
#: a file handed out last decides when the suite ends: these go first, and the hundreds of short
#: tests fill in around them. A file missing here only runs later; the order is not a result.
HEAVY_FILES = (
    "test_runners.py",
    "test_runners_dvc.py",
    "test_resume.py",
    "test_tracking_concurrency.py",
    "test_slurm.py",
    "test_visualize.py",
    "test_semi_mode.py",
    "test_viz_toy_embedding.py",
    "test_distributed.py",
    "test_tracking.py",
    "test_gpu.py",
    "test_benchmarks.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The HEAVY_FILES first, heaviest first; every other file after them, in the usual order
    (a stable sort: each file's own tests keep their order, so module fixtures are made once)."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` in the IDX format (uint8 data), gzipped when ``gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(blob, mtime=0))
    else:
        path.write_bytes(blob)
    return path


def tiny_images(n: int, n_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct random images whose class is visible (brightness grows with the label)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    noise = rng.integers(0, 120, size=(n, size, size), dtype=np.int64)
    images = np.clip(noise + labels[:, None, None] * 12, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


@pytest.fixture
def tiny_idx(tmp_path: Path) -> Path:
    """An MNIST-style folder of tiny data (:func:`write_tiny_idx`)."""
    return write_tiny_idx(tmp_path / "tiny_idx")


def write_tiny_idx(folder: Path) -> Path:
    """An MNIST-style folder: 400 training and 100 test 8x8 images of 4 classes.

    Planted duplicates: training image 1 is a copy of training image 0 (same class), and test
    image 0 is a copy of training image 2, so the split's duplicate rules have work to do.
    """
    train, train_labels = tiny_images(400, 4, 8, seed=1)
    test, test_labels = tiny_images(100, 4, 8, seed=2)
    train[1], train_labels[1] = train[0], train_labels[0]
    test[0], test_labels[0] = train[2], train_labels[2]
    write_idx(folder / "train-images-idx3-ubyte.gz", train)
    write_idx(folder / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", test)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_labels)
    (folder / "classes.txt").write_text("dark\ndim\nbright\nbrightest\n")
    return folder


def params_for(dataset: str = "fashion_mnist", **overrides: dict) -> dict:
    """The repository's params.yaml with some sections replaced.

    A ``split`` override that sets ``label_fractions`` switches to that grid as the tests
    written for it measured it: ``labels_per_class`` off and, unless the override says
    otherwise, one draw of the labeled subsets (params.yaml's default is per class, two draws).
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dataset"] = dataset
    for section, values in overrides.items():
        params[section].update(values)
    if overrides.get("split", {}).get("label_fractions") is not None:
        use_label_fractions(params, params["split"]["label_fractions"], overrides["split"])
    sync_matrix(params)
    return params


def use_label_fractions(params: dict, fractions: list[float], split: dict | None = None) -> dict:
    """``params`` (changed in place) on the label-fraction grid ``fractions``: no per-class
    budgets and one draw of each subset, unless ``split`` (the caller's split settings) names
    label_draws. Keys are removed, not nulled, where the schema's default is that value, so
    that an older tree's params.yaml and schema (tests/byte_identity.py) take the result too."""
    section = params["split"]
    section.pop("labels_per_class", None)  # default: null
    section.pop("label_draws", None)  # default: 1
    section["label_fractions"] = list(fractions)
    if (split or {}).get("label_draws", 1) != 1:
        section["label_draws"] = split["label_draws"]
    return params


def sync_matrix(params: dict) -> dict:
    """Keep fine-tuning's matrix inside what split and pretraining make (config checks this):
    the budgets are the split's, the inits what pretraining makes, and the semi cells keep only
    the inits and budgets left (none, when the tiny grid lacks the default's 4pc)."""
    per_class = params["split"].get("labels_per_class")
    if per_class is not None:  # fine-tuning names per-class budgets by key: 4pc, all
        params["split"]["label_fractions"] = None
        params["finetune"]["fractions"] = [b if b == "all" else f"{b}pc" for b in per_class]
    else:
        params["finetune"]["fractions"] = list(params["split"]["label_fractions"])
    made = params["pretrain"]["methods"]
    order = ("scratch", "pca", "simclr", "autoencoder", "rotation", "inpainting", "vae", "gan")
    params["finetune"]["inits"] = [i for i in order if i in made]
    params["finetune"]["baselines"] = [i for i in ("pixels",) if i in made]
    semi = params["finetune"].get("semi", {})
    if "inits" in semi:
        semi["inits"] = [i for i in semi["inits"] if i in params["finetune"]["inits"]]
    if "fractions" in semi:
        budgets = [str(b) for b in params["finetune"]["fractions"]]
        semi["fractions"] = [f for f in semi["fractions"] if str(f) in budgets]
    return params


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def tiny_run_params(params: dict, data: Path, methods: list[str], modes: list[str]) -> dict:
    """``params`` (changed in place and returned) for a whole-pipeline run on the tiny data in
    ``data`` (IDX files, or the image folder of the ``project`` fixture) that takes minutes:
    ``methods`` for one epoch, ``modes`` with one seed at 100 % labels (one draw, as label
    fractions; no semi cells unless a test asks), and every figure small. Shared by the
    ``project`` fixture and tests/byte_identity.py, so both run the pipeline the same way."""
    params["data"]["local_path"] = str(data)
    params["model"].update(backbone="lenet5", width=8)
    params["pretrain"].update(methods=methods, epochs=1, batch_size=64)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["finetune"].update(
        modes=modes,
        seeds=[0],
        max_passes=1,
        min_steps=1,
        batch_size=64,
        min_steps_per_epoch=1,
    )
    use_label_fractions(params, [1.0])
    semi = params["finetune"].get("semi", {})
    for key in ("inits", "fractions"):  # no semi cell; kept as [], since dvc.yaml reads them
        if key in semi:  # (an older tree's params.yaml has neither: tests/byte_identity.py)
            semi[key] = []
    params["evaluate"]["bootstrap"] = 50
    params["visualize"].update(
        embedding_images=50,
        embeddings=["tsne"],
        deconv_images=16,
        deconv_channels=2,
        deconv_top=2,
        cam_examples=1,
    )
    params["visualize"]["toy"].update(samples=40, depths=[0, 1], widths=[4], steps=20)
    return sync_matrix(params)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder with its own MLflow store, as the stages run in the repo root."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PIPELINE_EXECUTION", raising=False)
    return work


def run_env() -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH (stage commands call `python`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PIPELINE_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run(cmd: list[str] | str, cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, returning its output; on failure the assertion shows what it printed."""
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=kw.pop("env", run_env()),
        capture_output=True,
        text=True,
        shell=isinstance(cmd, str),
        **kw,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


PROJECT_FILES = ("Snakefile", "rules", "dvc.yaml", "schemas", "pipeline", "envs", ".dvcignore")


#: Files in the project's unlabeled pool (:func:`write_tiny_pool`); none is a copy of a labeled
#: image, so pretraining learns from every one of them.
TINY_POOL_FILES = 36


def write_tiny_image_folder(folder: Path) -> Path:
    """An image folder of the tiny data: 500 8 x 8 grayscale PNGs in 4 class folders (named so
    that their sorted order is the label order), with one planted duplicate (image 1 is a copy of
    image 0, same class) so that the split's duplicate rule has work to do."""
    from PIL import Image

    images, labels = tiny_images(500, 4, 8, seed=1)
    images[1], labels[1] = images[0], labels[0]
    names = ("c0_dark", "c1_dim", "c2_bright", "c3_brightest")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / names[label] / f"{i:03d}.png")
    return folder


def write_tiny_pool(folder: Path) -> Path:
    """An unlabeled pool as people have one: TINY_POOL_FILES RGB PNGs of 12 x 10 pixels (another
    size and mode than the 8 x 8 grayscale labeled images), two folders deep."""
    from PIL import Image

    rng = np.random.default_rng(11)
    for i in range(TINY_POOL_FILES):
        where = folder / f"camera{i % 3}" / "day1"
        where.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(where / f"{i:02d}.png")
    return folder


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the pipeline project as a git + DVC repository (:func:`make_project`)."""
    return make_project(tmp_path)


def make_project(tmp: Path) -> Path:
    """``tmp``/project: a copy of the pipeline project as a git + DVC repository, configured for
    a tiny image folder plus an unlabeled pool (data.unlabeled_path), both beside it in ``tmp``,
    with the keys of the README's "Your own images, few labels" overlay
    (tests/test_own_images.py applies that overlay itself). A function as well as the
    ``project`` fixture, so that a module-scoped fixture can make one too."""
    root = tmp / "project"
    root.mkdir()
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    # gan: the method that steps its own optimizers goes through both runners too.
    methods = ["scratch", "simclr", "gan"]
    labeled = write_tiny_image_folder(tmp / "tiny_images")
    params = tiny_run_params(params_for("imagefolder"), labeled, methods, ["linear", "knn"])
    params["data"].update(
        image_size=8, channels=1, unlabeled_path=str(write_tiny_pool(tmp / "tiny_pool"))
    )
    # The README's per-class budgets and scarce validation set. One budget, all (the same labeled
    # images as the fraction 1.0 it replaces), keeps this run's cost: the README's [4, 25, all]
    # would triple the fine-tuning jobs. 4 of each class's ~10 validation images make its choices.
    params["split"].update(labels_per_class=["all"], label_fractions=None, val_labels_per_class=4)
    sync_matrix(params)
    write_params(root, params)
    shutil.copy2(REPO / ".gitignore", root / ".gitignore")
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the cache type we ship
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)
    return root
