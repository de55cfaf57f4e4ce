"""Typed views of the JSON documents stages hand each other, read without importing torch.

The augment stage writes ``policy.json``: the resolved augmentation policies, the image shape
they were resolved for and the training split's normalization statistics. Pretraining,
fine-tuning and the report read it through :class:`PolicyDocument`, so a key is spelled once
and a missing file is one error that names the stage to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import paths
from pipeline.errors import MissingInputError
from pipeline.io import read_json


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
        return {"in_channels": self.channels, "image_size": self.image_size, "mean": self.mean,
                "std": self.std}  # fmt: skip

    def normalizer(self, policy: str | None = None) -> Any:
        """A BatchAugment for ``policy`` (None: normalization only), on the CPU."""
        from pipeline.augment import from_policy_document

        return from_policy_document(self.raw, policy)
