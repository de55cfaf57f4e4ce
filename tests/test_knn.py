"""Weighted kNN: the one-pass sweep over (k, temperature) equals scoring each pair alone."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.knn import knn_accuracy, knn_scores, knn_sweep


def test_the_sweep_equals_each_pair_scored_alone():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=generator)
    bank_labels = torch.randint(0, 5, (300,), generator=generator)
    bank = centres[bank_labels] + 0.9 * torch.randn(300, 16, generator=generator)
    query_labels = torch.randint(0, 5, (130,), generator=generator)
    queries = centres[query_labels] + 0.9 * torch.randn(130, 16, generator=generator)
    ks, temperatures = [1, 5, 20, 400], [0.03, 0.2, 1.0]
    swept = knn_sweep(bank, bank_labels, queries, query_labels, ks, temperatures, 5, chunk=50)
    assert set(swept) == {(k, t) for k in ks for t in temperatures}
    for (k, t), accuracy in swept.items():
        alone = knn_accuracy(bank, bank_labels, queries, query_labels, k, t, 5)
        assert accuracy == pytest.approx(alone, abs=1e-6), (k, t)
    assert len(set(swept.values())) > 1  # the pairs really differ on this data
    assert 0.4 < max(swept.values()) <= 1.0


def test_bad_k_or_temperature_is_refused():
    bank, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="ks must be >= 1"):
        knn_sweep(bank, labels, bank, labels, [0], [0.1], 2)
    with pytest.raises(ValueError, match="temperature > 0"):
        knn_scores(bank, labels, bank, 1, 0.0, 2)
