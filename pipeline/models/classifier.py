"""Classifiers of the study and their files: encoder + linear head, or encoder + kNN bank.

A fine-tuning job writes ``models/finetune/<init>-<mode>-<fraction>/model.json`` (how to rebuild
the classifier: encoder description, classes, image size, normalization) and one
``seed<k>.pt`` state_dict per seed. Every classifier maps normalized float N x C x H x W images
to class probabilities, so evaluation and prediction treat them alike.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import MissingInputError
from pipeline.io import atomic_dir, write_bytes, write_json
from pipeline.models.knn import knn_scores


class LinearClassifier(nn.Module):
    """``softmax(W · dropout(encoder(x)) + b)``: the linear probe and the fine-tuned network."""

    def __init__(
        self, encoder: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.0
    ):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).float().softmax(dim=1)

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Probabilities from ``encoder(x)`` computed elsewhere (evaluation shares them)."""
        return self.head(self.dropout(features)).float().softmax(dim=1)


class KNNClassifier(nn.Module):
    """Weighted kNN on frozen encoder features; probabilities are the normalized votes."""

    def __init__(
        self,
        encoder: nn.Module,
        bank: torch.Tensor,
        bank_labels: torch.Tensor,
        k: int,
        temperature: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.register_buffer("bank", bank)
        self.register_buffer("bank_labels", bank_labels)
        self.register_buffer("k", torch.tensor(k))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.encoder(x))

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Probabilities from ``encoder(x)`` computed elsewhere (evaluation shares them)."""
        votes = knn_scores(
            self.bank,
            self.bank_labels,
            features.float(),
            int(self.k),
            float(self.temperature),
            self.num_classes,
        )
        return votes / votes.sum(dim=1, keepdim=True).clamp(min=1e-12)


def save(folder: Path, description: dict[str, Any], states: dict[int, dict]) -> None:
    """Write model.json and one seed<k>.pt per seed into ``folder``, atomically.

    Seeds that share one state (a kNN cell has no randomness: every seed is the same bank) share
    one file, the first seed's: a 100 % kNN bank of raw pixels is 170 MB, once is enough.
    """
    with atomic_dir(Path(folder)) as tmp:
        files: dict[str, str] = {}
        written: dict[int, str] = {}
        for seed, state in sorted(states.items()):
            if id(state) not in written:
                buffer = io.BytesIO()
                torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
                written[id(state)] = f"seed{seed}.pt"
                write_bytes(tmp / written[id(state)], buffer.getvalue())
            files[str(seed)] = written[id(state)]
        write_json(tmp / "model.json", {**description, "files": files})


def load(folder: Path, seed: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier of one seed (the first when None) in eval mode, and its description.

    Weights are read with ``torch.load(weights_only=True)``. A folder that is not one of ours,
    or a missing or corrupt file, raises MissingInputError naming it.
    """
    from pipeline.documents import EncoderDescription
    from pipeline.models.encoders import build_from_description

    folder = Path(folder)
    remedy = "make it with the finetune stage (python -m pipeline finetune ...)"
    try:
        description = json.loads((folder / "model.json").read_text())
        files = description["files"]
        kind = description["mode"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MissingInputError(
            f"{folder} is not a classifier of this pipeline (model.json: {err}); expected a "
            f"folder under models/finetune/; {remedy}"
        ) from None
    key = str(seed) if seed is not None else sorted(files, key=int)[0]
    if key not in files:
        raise MissingInputError(f"{folder} has no seed {seed}; it has seeds {', '.join(files)}")
    path = folder / files[key]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MissingInputError(f"{path} is missing or corrupt ({reason}); {remedy}") from None
    where = folder / "model.json"
    encoder_description = EncoderDescription.from_dict(description["encoder"], where)
    encoder = build_from_description(encoder_description, where)
    num_classes = len(description["classes"])
    if kind == "knn":
        model: nn.Module = KNNClassifier(
            encoder,
            torch.zeros_like(state["bank"]),
            torch.zeros_like(state["bank_labels"]),
            1,
            1.0,
            num_classes,
        )
    else:
        model = LinearClassifier(
            encoder, encoder_description.feature_dim, num_classes, description.get("dropout", 0.0)
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise MissingInputError(
            f"{path} does not fit {folder / 'model.json'} ({str(err).splitlines()[0]}); {remedy}"
        ) from None
    return model.eval(), description
