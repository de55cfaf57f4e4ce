"""README, "Your own images, few labels": its overlay, applied as a new user would apply it.

The section's ```yaml block is read from README.md itself, so the test follows the text: its two
folders are pointed at the tiny labeled folder and pool the ``project`` fixture generates, and
the real ``python -m pipeline profile`` merges it into a fresh clone's params.yaml. No stage runs
(the ``project`` fixture's own Snakemake run, in tests/test_runners.py, already uses the same
keys); the merged params must pass the checks every stage makes and give Snakemake the cells the
README promises.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import load
from pipeline.profile import apply
from tests.conftest import REPO, run

SECTION = "## Your own images, few labels"
#: The keys the README tells the user to set, and nothing else.
README_KEYS = {
    "data": {"dataset", "local_path", "unlabeled_path", "image_size", "channels"},
    "split": {"labels_per_class", "val_labels_per_class"},
    "finetune": {"fractions"},
}


def readme_section() -> str:
    """The text of the README's section, up to the next ``## `` heading."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def readme_overlay() -> dict:
    """The section's one ```yaml block, parsed."""
    blocks = re.findall(r"^```yaml\n(.*?)^```$", readme_section(), re.M | re.S)
    assert len(blocks) == 1, f"{SECTION} should hold one yaml block, has {len(blocks)}"
    return yaml.safe_load(blocks[0])


def test_the_readme_overlay_sets_only_the_keys_it_explains():
    overlay = readme_overlay()
    assert {section: set(keys) for section, keys in overlay.items()} == README_KEYS
    assert overlay["data"]["dataset"] == "imagefolder"
    # finetune.fractions names the same budgets as split.labels_per_class: 4 -> 4pc, all -> all.
    budgets = overlay["split"]["labels_per_class"]
    assert overlay["finetune"]["fractions"] == [b if b == "all" else f"{b}pc" for b in budgets]
    section = readme_section()
    assert "make run PROFILE=my-images.yaml" in section and "git checkout params.yaml" in section


def test_make_run_with_a_profile_merges_it_before_it_runs():
    """What the README says of ``make run PROFILE=...``, from make's own plan (nothing runs)."""
    plan = run(["make", "-n", "run", "PROFILE=my-images.yaml"], REPO).stdout
    merge = plan.find('python -m pipeline profile "my-images.yaml"')
    assert 0 <= merge < plan.find("snakemake --cores all"), plan


def test_the_readme_overlay_on_a_fresh_clone_gives_the_study_it_describes(project: Path):
    generated = yaml.safe_load((project / "params.yaml").read_text())["data"]
    labeled, pool = generated["local_path"], generated["unlabeled_path"]
    assert Path(labeled, "c0_dark").is_dir() and any(Path(pool).rglob("*.png"))
    overlay = readme_overlay()
    overlay["data"].update(local_path=labeled, unlabeled_path=pool)
    # The tiny data (4 classes of about 90 training and 10 validation images) takes the README's
    # budgets and validation size as they are; only the folders change.
    (project / "my-images.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    shutil.copy2(REPO / "params.yaml", project / "params.yaml")  # what a fresh clone holds

    out = run(["python", "-m", "pipeline", "profile", "my-images.yaml"], project).stdout
    assert "data.unlabeled_path: None -> " in out, out  # added: params.yaml leaves it out
    assert run(["python", "-m", "pipeline", "check-params"], project).stdout.strip() == (
        "params.yaml: ok"
    )
    merged = yaml.safe_load((project / "params.yaml").read_text())
    for section, keys in README_KEYS.items():
        for key in keys:
            assert merged[section][key] == overlay[section][key], f"{section}.{key}"
    config = load(project / "params.yaml")
    assert config.split.labels_per_class == tuple(overlay["split"]["labels_per_class"])
    assert config.split.val_labels_per_class == overlay["split"]["val_labels_per_class"]
    assert config.split.label_fractions == ()
    # Snakemake (which validates params.yaml first) plans one fine-tuning job per cell at
    # exactly the README's budgets.
    plan = run(["snakemake", "-n"], project).stdout
    budgets = set(re.findall(r"^    wildcards: .*fraction=([\w.]+)", plan, re.M))
    assert budgets == set(overlay["finetune"]["fractions"]), plan[-2000:]
    run(["python", "-m", "pipeline", "profile", "my-images.yaml"], project)  # applied twice
    assert yaml.safe_load((project / "params.yaml").read_text()) == merged


@pytest.fixture
def fresh_params(tmp_path: Path) -> Path:
    """A copy of the repository's params.yaml, as a fresh clone holds it."""
    return Path(shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml"))


def test_a_key_params_yaml_leaves_at_its_default_is_added_where_the_schema_declares_it(
    fresh_params: Path, tmp_path: Path
):
    """What lets the README's overlay set data.unlabeled_path, which params.yaml leaves out."""
    assert "unlabeled_path" not in yaml.safe_load(fresh_params.read_text())["data"]
    profile = tmp_path / "profile.yaml"
    profile.write_text("data:\n  unlabeled_path: /pool\n")
    text, changes = apply(fresh_params, profile)
    assert changes == [("data.unlabeled_path", None, "/pool")]
    data = list(yaml.safe_load(text)["data"])
    assert data.index("unlabeled_path") == data.index("local_path") + 1  # the schema's order
    # One line more, every other line (comments and blank lines too) as it was.
    lines = text.splitlines()
    lines.remove("  unlabeled_path: /pool")
    assert lines == fresh_params.read_text().splitlines()
    profile.write_text("data:\n  unlabeled_path: null\n")  # the default: nothing to write
    assert apply(fresh_params, profile) == (fresh_params.read_text(), [])


def test_choosing_one_label_grid_nulls_the_other_and_keeps_its_comments(
    fresh_params: Path, tmp_path: Path
):
    """split.label_fractions and split.labels_per_class are exclusive: a profile that sets the
    one params.yaml does not use switches grids, whichever params.yaml uses."""
    params = yaml.safe_load(fresh_params.read_text())
    split = params["split"]
    if split.get("labels_per_class") is not None:
        other, cells = "labels_per_class", [0.1, 1.0]
        profile_text = "split:\n  label_fractions: [0.1, 1.0]\n"
    else:
        other, cells = "label_fractions", ["4pc", "all"]
        profile_text = "split:\n  labels_per_class: [4, all]\n"
    profile_text += f"finetune:\n  fractions: {cells}\n"
    if params["finetune"].get("semi", {}).get("fractions"):  # semi cells at budgets of the grid
        profile_text += "  semi:\n    fractions: []\n"
    profile = tmp_path / "profile.yaml"
    profile.write_text(profile_text)
    text, changes = apply(fresh_params, profile)
    assert (f"split.{other}", split[other], None) in changes
    merged = tmp_path / "merged.yaml"
    merged.write_text(text)
    config = load(merged)  # every check a stage makes: one grid, fine-tuned budgets it makes
    assert getattr(config.split, other) in (None, ())
    assert config.split.budgets == tuple(cells) == config.finetune.fractions
    comments = [line for line in fresh_params.read_text().splitlines() if line.strip()[:1] == "#"]
    assert comments == [line for line in text.splitlines() if line.strip()[:1] == "#"]
