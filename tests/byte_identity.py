"""Not a test: run the tiny pipeline with two commits and compare their outputs byte by byte.

    python -m tests.byte_identity OLD_COMMIT [NEW_COMMIT]    (NEW: the working tree)

For refactors that must not change behaviour: a tiny IDX project with every method, init and
mode (one seed, one epoch) is run with `snakemake --cores 2` from each tree, and every file
under data/, metrics/ and models/ is compared. Takes about 7 minutes on 2 cores. Issue 14's
refactor matched on all 211 files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.conftest import (
    PROJECT_FILES,
    REPO,
    tiny_run_params,
    write_params,
    write_tiny_idx,
)

METHODS = [
    "scratch",
    "pixels",
    "pca",
    "simclr",
    "autoencoder",
    "rotation",
    "inpainting",
    "vae",
    "gan",
]


def project(root: Path, source: Path, data: Path) -> Path:
    root.mkdir()
    for name in PROJECT_FILES:
        if (source / name).is_dir():
            shutil.copytree(
                source / name, root / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        elif (source / name).exists():
            shutil.copy2(source / name, root / name)
    # Each tree with its own params.yaml: a newer one may hold keys the older schema refuses.
    params = yaml.safe_load((source / "params.yaml").read_text())
    params["data"]["dataset"] = "idx"
    params["pretrain"]["inpainting"]["mask_size"] = 4
    # finetune.inits follow the methods (every one but the pixels baseline): tiny_run_params
    # sets them with the rest of the matrix.
    modes = ["linear", "knn", "finetune"]
    write_params(root, tiny_run_params(params, data, METHODS, modes))
    return root


def hashes(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for top in ("data", "metrics", "models")
        for f in sorted((root / top).rglob("*"))
        if f.is_file()
    }


def tree(commit: str, where: Path) -> Path:
    where.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="byte-identity-"))
    data = write_tiny_idx(base / "tiny_idx")
    old = tree(argv[0], base / "old-src")
    new = tree(argv[1], base / "new-src") if len(argv) == 2 else REPO
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env['PATH']}"
    roots = {"old": project(base / "old", old, data), "new": project(base / "new", new, data)}
    for root in roots.values():
        subprocess.run(
            ["snakemake", "--cores", "2", "--quiet"],
            cwd=root,
            env=env,
            check=True,
            capture_output=True,
        )
    a, b = hashes(roots["old"]), hashes(roots["new"])
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    print(
        f"{len(a)} files old, {len(b)} new; only old: {sorted(a.keys() - b.keys())}; only new: "
        f"{sorted(b.keys() - a.keys())}; different: {differ}"
    )
    return 0 if a == b else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
