"""Reproducible study of self-supervised pretraining for label-scarce image classification."""

__version__ = "0.1.0"
