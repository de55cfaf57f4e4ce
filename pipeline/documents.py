"""Typed views of the JSON documents stages hand each other, read without importing torch.

The augment stage writes ``policy.json``: the resolved augmentation policies, the image shape
they were resolved for and the training split's normalization statistics. Pretraining,
fine-tuning and the report read it through :class:`PolicyDocument`, so a key is spelled once
and a missing file is one error that names the stage to run. The pretrain stage writes each
``encoder.json``, read through :class:`EncoderDescription` by fine-tuning, evaluation and the
report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import paths
from pipeline.errors import MissingInputError
from pipeline.io import read_json

if TYPE_CHECKING:  # torch is imported only where a normalizer is built: the CLI reads documents
    from pathlib import Path

    from pipeline.augment import BatchAugment


@dataclass(frozen=True)
class PolicyDocument:
    """The augment stage's policy.json. ``raw`` is the file's content, as hashed into keys."""

    raw: dict[str, Any]

    @classmethod
    def read(cls, dataset: str) -> PolicyDocument:
        path = paths.augment_dir(dataset) / "policy.json"
        try:
            return cls(read_json(path))
        except (OSError, ValueError) as err:
            raise MissingInputError(
                f"{path} is missing or unreadable ({err}); run the augment stage "
                "(python -m pipeline augment) to make it"
            ) from None

    @property
    def channels(self) -> int:
        return self.raw["channels"]

    @property
    def image_size(self) -> int:
        """The side of the (square) images the policies were resolved for."""
        return self.raw["image_size"][0]

    @property
    def shape(self) -> list[int]:
        """C x H x W of the images the policies were resolved for."""
        return [self.channels, *self.raw["image_size"]]

    @property
    def mean(self) -> list[float]:
        return self.raw["mean"]

    @property
    def std(self) -> list[float]:
        return self.raw["std"]

    @property
    def policies(self) -> dict[str, dict[str, Any]]:
        return self.raw["policies"]

    def image_fields(self) -> dict[str, Any]:
        """What an encoder's description records about its input, in the order it is written."""
        return {
            "in_channels": self.channels,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
        }

    def normalizer(self, policy: str | None = None) -> BatchAugment:
        """A BatchAugment for ``policy`` (None: normalization only), on the CPU."""
        from pipeline.augment import from_policy_document

        return from_policy_document(self.raw, policy)


#: The kinds of encoder an encoder.json can describe (pipeline.models.encoders builds each).
ENCODER_KINDS = ("backbone", "pca", "pixels")


@dataclass(frozen=True)
class EncoderDescription:
    """An encoder.json: what the pretrain stage trained and how to rebuild it for its weights.

    Fine-tuning copies it into each classifier's model.json (under ``encoder``), so a classifier
    folder rebuilds without the pretrain stage's outputs. ``backbone`` holds the BackboneConfig
    fields (None for PCA and pixels); ``input_dim`` is PCA's only.
    """

    method: str
    kind: str
    backbone: dict[str, Any] | None
    in_channels: int
    image_size: int
    feature_dim: int
    mean: list[float]
    std: list[float]
    dataset: str
    dataset_checksum: str
    input_dim: int | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: Path) -> EncoderDescription:  # Any: parsed JSON, checked
        """The view of a parsed encoder.json; anything else is an error naming ``where``."""
        fields = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        problem = None
        if not isinstance(raw, dict):
            problem = f"expected a mapping, got {type(raw).__name__}"
        elif missing := [name for name in required if name not in raw]:
            problem = f"missing {', '.join(missing)}"
        elif raw["kind"] not in ENCODER_KINDS:
            problem = f"kind {raw['kind']!r} is not one of {', '.join(ENCODER_KINDS)}"
        elif raw["kind"] == "pca" and "input_dim" not in raw:
            problem = "a pca encoder needs input_dim"
        if problem:
            raise MissingInputError(
                f"{where} is not an encoder description this pipeline wrote ({problem})"
            )
        return cls(**{name: raw[name] for name in fields if name in raw})

    def as_dict(self) -> dict[str, Any]:
        """The JSON document; ``input_dim`` only where there is one, as the stage wrote it."""
        raw = dataclasses.asdict(self)
        if raw["input_dim"] is None:
            del raw["input_dim"]
        return raw

    def normalizer(self) -> BatchAugment:
        """Normalization with the statistics the encoder was trained on, on the CPU."""
        from pipeline.augment import BatchAugment

        return BatchAugment(
            {}, (self.image_size, self.image_size), self.in_channels, self.mean, self.std
        )
