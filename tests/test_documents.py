"""policy.json, as the augment stage writes it and the training stages read it: one typed view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.documents import PolicyDocument
from pipeline.errors import MissingInputError

DOCUMENT = {"image_size": [8, 8], "channels": 1, "mean": [0.25], "std": [0.5],
            "policies": {"none": {}, "flip": {"hflip": {"p": 1.0}}}}  # fmt: skip


def write(root: Path, document: dict) -> None:
    folder = root / "data/augment/idx"
    folder.mkdir(parents=True)
    (folder / "policy.json").write_text(json.dumps(document))


def test_the_view_reads_the_augment_stages_file(workdir: Path):
    write(workdir, DOCUMENT)
    document = PolicyDocument.read("idx")
    assert document.raw == DOCUMENT
    assert (document.channels, document.image_size, document.shape) == (1, 8, [1, 8, 8])
    assert list(document.image_fields()) == ["in_channels", "image_size", "mean", "std"]
    assert document.policies["flip"] == {"hflip": {"p": 1.0}}


def test_its_normalizer_uses_the_training_splits_statistics(workdir: Path):
    write(workdir, DOCUMENT)
    images = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = PolicyDocument.read("idx").normalizer()(images)
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.25) / 0.5))


def test_a_missing_file_names_the_stage_that_makes_it(workdir: Path):
    with pytest.raises(MissingInputError, match=r"policy.json is missing.*pipeline augment"):
        PolicyDocument.read("idx")
