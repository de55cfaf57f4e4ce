"""The repository's documents stand on their own (issue 24).

Someone who clones the repository must be able to follow every reference in it. No file may
point to a document that lives outside the repository (the team's notes), and every citation of
the form ``docs/science.md §N.M`` must name a section that docs/science.md has.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCIENCE = REPO / "docs" / "science.md"

#: Names of documents outside the repository. Spelt in two parts so this file, which the scan
#: also reads, does not match itself.
OUTSIDE = ("SCIENCE" + ".md", "shared" + "/")
#: ``docs/science.md §7.2`` (also at a line break inside a docstring or comment).
CITATION = re.compile(r"docs/science\.md\s+§\s*(\d+(?:\.\d+)*)")
#: ``## 7. Title`` or ``### 7.2 Title``: the numbered headings of docs/science.md.
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s+\S", re.M)
#: Folders that hold outputs, caches or installed packages, never the project's own text.
NOT_SOURCE = {
    ".git",
    ".venv",
    ".snakemake",
    ".dvc",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "pipeline.egg-info",
    "data",
    "models",
    "metrics",
    "mlartifacts",
    "checkpoints",
    "reports",
}


def repository_files(root: Path) -> list[Path]:
    """The files of the repository: tracked or new but not ignored, as git sees them.

    Why git: ignored folders (data, models, the virtual environment) hold files that are not the
    project's text. Outside a git checkout (an unpacked archive) the tree is walked instead,
    leaving out the folders in NOT_SOURCE.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return [p for p in _walk(root) if p.is_file()]
    return [root / name for name in listed.split("\0") if name and (root / name).is_file()]


def _walk(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink():
            if path.name not in NOT_SOURCE:
                yield from _walk(path)
        else:
            yield path


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (images, arrays)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(files: list[Path], root: Path) -> list[str]:
    """``path:line: name`` for every mention of a document outside the repository."""
    found = []
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for name in OUTSIDE:
                if name in line:
                    found.append(f"{path.relative_to(root)}:{number}: {name}")
    return found


def sections(science: str) -> list[str]:
    """The section numbers of docs/science.md's headings, in order ("7", "7.2", ...)."""
    return HEADING.findall(science)


def broken_citations(files: list[Path], root: Path, known: set[str]) -> list[str]:
    """``path:line: §N`` for every citation of a section that docs/science.md does not have."""
    broken = []
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        for match in CITATION.finditer(text):
            if match.group(1) not in known:
                line = text.count("\n", 0, match.start()) + 1
                broken.append(f"{path.relative_to(root)}:{line}: §{match.group(1)}")
    return broken


def citations(files: list[Path]) -> list[str]:
    """Every cited section number, with repeats."""
    return [m.group(1) for p in files if (t := text_of(p)) for m in CITATION.finditer(t)]


@pytest.fixture(scope="module")
def files() -> list[Path]:
    return repository_files(REPO)


def test_no_file_refers_to_a_document_outside_the_repository(files: list[Path]):
    assert len(files) > 50  # the scan sees the project (pipeline/, tests/, docs/ ...)
    found = outside_references(files, REPO)
    assert not found, (
        "these lines name documents that are not in the repository; cite the section of "
        "docs/science.md (or another file in the repository) instead:\n" + "\n".join(found)
    )


def test_every_science_citation_names_a_section_that_exists(files: list[Path]):
    known = set(sections(SCIENCE.read_text()))
    cited = citations(files)
    # The docstrings of the losses, methods, backbones and fine-tuning cite it: the scan finds them.
    assert len(cited) >= 15 and {"7.2", "7.7", "8.4"} <= set(cited)
    broken = broken_citations(files, REPO, known)
    assert not broken, (
        "these citations name sections that docs/science.md does not have; fix the number "
        "or add the section:\n" + "\n".join(broken)
    )


def test_science_sections_are_numbered_once_and_in_order():
    numbers = sections(SCIENCE.read_text())
    assert len(numbers) == len(set(numbers)), "a section number is used twice"
    keys = [tuple(int(part) for part in n.split(".")) for n in numbers]
    assert keys == sorted(keys), f"sections out of order: {numbers}"
    top = [k[0] for k in keys if len(k) == 1]
    assert top == list(range(1, len(top) + 1)), f"top-level sections skip a number: {top}"
    for key in keys:  # a subsection belongs to a section that exists
        assert len(key) == 1 or key[:-1] in keys, f"§{'.'.join(map(str, key))} has no parent"


def test_the_fixmatch_section_names_its_params_and_its_paper():
    science = SCIENCE.read_text()
    heading = re.search(r"^## (\d+)\. Semi-supervised learning \(FixMatch\)$", science, re.M)
    assert heading is not None
    body = science[heading.end() :].split("\n## ", 1)[0]
    assert "finetune.semi" in body and "Sohn" in body and "2020" in body and "2001.07685" in body


def test_readme_lists_the_science_document():
    assert "docs/science.md" in (REPO / "README.md").read_text()


def test_the_checks_catch_a_planted_outside_reference_and_a_wrong_section(tmp_path: Path):
    """The scan is not vacuous: a file that names an outside note, or cites a section that does
    not exist, is reported with its line."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/science.md").write_text("## 2. Data\n\n### 2.1 Splits\n")
    module = tmp_path / "module.py"
    module.write_text(
        '"""Splits (docs/science.md §2.1), duplicates (docs/science.md\n§2.2)."""\n'
        f"# see {OUTSIDE[0]} and /work/{OUTSIDE[1]}notes.md\n"
    )
    image = tmp_path / "figure.png"
    image.write_bytes(b"\x89PNG\0" + OUTSIDE[0].encode())  # binary files are not text
    files = repository_files(tmp_path)  # not a git checkout: the walk
    assert sorted(p.name for p in files) == ["figure.png", "module.py", "science.md"]
    known = set(sections((tmp_path / "docs/science.md").read_text()))
    assert known == {"2", "2.1"}
    assert broken_citations(files, tmp_path, known) == ["module.py:1: §2.2"]
    assert outside_references(files, tmp_path) == [
        f"module.py:3: {OUTSIDE[0]}",
        f"module.py:3: {OUTSIDE[1]}",
    ]
