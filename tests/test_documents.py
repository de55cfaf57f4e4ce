"""policy.json, as the augment stage writes it and the training stages read it: one typed view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.documents import EncoderDescription, PolicyDocument
from pipeline.errors import MissingInputError

DOCUMENT = {
    "image_size": [8, 8],
    "channels": 1,
    "mean": [0.25],
    "std": [0.5],
    "policies": {"none": {}, "flip": {"hflip": {"p": 1.0}}},
}


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


ENCODER = {
    "method": "simclr",
    "kind": "backbone",
    "backbone": {
        "name": "lenet5",
        "width": 4,
        "activation": "relu",
        "dropout": 0.0,
        "batch_norm": True,
    },
    "in_channels": 1,
    "image_size": 8,
    "feature_dim": 16,
    "mean": [0.25],
    "std": [0.5],
    "dataset": "idx",
    "dataset_checksum": "abc",
}


def test_an_encoder_json_round_trips_through_its_view():
    description = EncoderDescription.from_dict(ENCODER, "encoder.json")
    assert (description.kind, description.feature_dim, description.input_dim) == (
        "backbone",
        16,
        None,
    )
    assert description.as_dict() == ENCODER  # no input_dim key where there is none
    pca = {**ENCODER, "method": "pca", "kind": "pca", "backbone": None, "input_dim": 64}
    assert EncoderDescription.from_dict(pca, "encoder.json").as_dict() == pca


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"feature_dim": None}, "missing feature_dim"),
        ({"kind": "gpt"}, "kind 'gpt' is not one of backbone, pca, pixels"),
        ({"kind": "pca"}, "a pca encoder needs input_dim"),
    ],
)
def test_an_encoder_json_this_pipeline_did_not_write_is_named(change: dict, problem: str):
    raw = {k: v for k, v in {**ENCODER, **change}.items() if v is not None}
    with pytest.raises(
        MissingInputError,
        match=f"models/x/encoder.json is not an encoder "
        f"description this pipeline wrote \\({problem}",
    ):
        EncoderDescription.from_dict(raw, "models/x/encoder.json")


def test_the_encoders_normalizer_uses_the_statistics_it_was_trained_on():
    normalize = EncoderDescription.from_dict(ENCODER, "encoder.json").normalizer()
    out = normalize(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    assert torch.allclose(out, torch.full_like(out, -0.5))
