"""Loading a pretrained encoder written by the pretrain stage, safely and with clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from pipeline import paths
from pipeline.documents import EncoderDescription
from pipeline.errors import MissingInputError
from pipeline.models.backbones import BackboneConfig, build_backbone
from pipeline.models.pretrain import PCAEncoder, PixelsEncoder


def load_encoder(method: str, folder: Path | None = None) -> tuple[nn.Module, EncoderDescription]:
    """The encoder pretrained by ``method`` and its description (encoder.json).

    The weights are read with ``torch.load(weights_only=True)``: a file that holds anything but
    tensors is refused. A missing, corrupt or mismatched file raises MissingInputError naming the
    file and the command that makes it.
    """
    folder = Path(folder) if folder is not None else paths.pretrain_dir(method)
    remedy = f"run the pretrain stage (python -m pipeline pretrain --method {method}) to make it"
    description_path, weights_path = folder / "encoder.json", folder / "encoder.pt"
    try:
        raw = json.loads(description_path.read_text())
    except (OSError, ValueError) as err:
        raise MissingInputError(
            f"{description_path} is missing or unreadable ({err}); {remedy}"
        ) from None
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MissingInputError(
            f"{weights_path} is missing, corrupt or not a plain state_dict ({reason}); {remedy}"
        ) from None
    description = EncoderDescription.from_dict(raw, description_path)
    encoder = build_from_description(description, description_path)
    try:
        encoder.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise MissingInputError(
            f"{weights_path} does not fit the encoder described in {description_path} ({first}); "
            f"{remedy}"
        ) from None
    return encoder, description


def build_from_description(description: EncoderDescription, where: Path) -> nn.Module:
    """An untrained encoder with the architecture an encoder.json describes."""
    try:
        if description.kind == "pca":
            return PCAEncoder(description.input_dim, description.feature_dim)
        if description.kind == "pixels":
            return PixelsEncoder(description.feature_dim)
        config = BackboneConfig(**description.backbone)
        return build_backbone(config, description.in_channels, description.image_size)
    except (KeyError, TypeError, ValueError) as err:
        raise MissingInputError(
            f"{where} is not an encoder description this pipeline wrote ({err})"
        ) from None


def encode(
    encoder: nn.Module, normalize: nn.Module, images: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """Float32 features of uint8 N x C x H x W images: normalized, in chunks, without grad.

    Chunks bound the memory of a forward pass over a whole split (54,000 images).
    """
    with torch.no_grad():
        parts = [
            encoder(normalize(images[i : i + chunk])).float()
            for i in range(0, images.shape[0], chunk)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, getattr(encoder, "feature_dim", 0))
