"""Weighted k-nearest-neighbour classification on encoder features (cosine similarity).

The pretraining monitor and the kNN baseline of the study (docs/science.md §8.3: cosine similarity,
k and temperature chosen on validation). Each of the k nearest training features votes for its
class with weight ``exp(sim / temperature)``, as in Wu et al. 2018 (instance discrimination).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _vote(
    similarity: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int
) -> torch.Tensor:
    """Class scores of each query row: every neighbour (``labels``, its ``similarity``) votes for
    its class with weight ``exp(similarity / temperature)``."""
    weights = (similarity / temperature).exp()
    votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
    return votes.scatter_add_(1, labels, weights)


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_queries x num_classes); argmax is the prediction.

    Queries are processed in chunks so the similarity matrix never exceeds chunk x N_bank.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got {k=}, {temperature=}")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        query = F.normalize(queries[start : start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        scores.append(_vote(similarity, bank_labels[index], temperature, num_classes))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> float:
    """Fraction of queries whose weighted kNN vote is their label."""
    scores = knn_scores(bank, bank_labels, queries, k, temperature, num_classes)
    return (scores.argmax(1) == query_labels).float().mean().item()


def knn_sweep(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: tuple[int, ...] | list[int],
    temperatures: tuple[float, ...] | list[float],
    num_classes: int,
    chunk: int = 1024,
) -> dict[tuple[int, float], float]:
    """Accuracy of every (k, temperature) pair, from one similarity pass.

    Why: choosing k and the temperature on validation used to redo the N_queries x N_bank
    similarity and its top-k for each of the pairs (12 by default), most of the kNN cells' time
    with a 54k-image bank. The top-max(k) neighbours are found once; a smaller k is a prefix of
    them (``topk`` is sorted), and a temperature only re-weights them. Equal to
    ``knn_accuracy`` for every pair (tested).
    """
    if not ks or not temperatures or min(ks) < 1 or min(temperatures) <= 0:
        raise ValueError(f"ks must be >= 1 and temperatures > 0, got {ks=}, {temperatures=}")
    bank = F.normalize(bank.float(), dim=1)
    deepest = min(max(ks), bank.shape[0])
    correct = {(k, t): 0 for k in ks for t in temperatures}
    for start in range(0, queries.shape[0], chunk):
        query = F.normalize(queries[start : start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(deepest, dim=1)
        neighbours = bank_labels[index]
        truth = query_labels[start : start + chunk]
        for k in ks:
            kk = min(k, deepest)
            for t in temperatures:
                votes = _vote(similarity[:, :kk], neighbours[:, :kk], t, num_classes)
                correct[(k, t)] += int((votes.argmax(1) == truth).sum())
    total = max(1, queries.shape[0])
    return {pair: hits / total for pair, hits in correct.items()}


def best_knn(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: tuple[int, ...] | list[int],
    temperatures: tuple[float, ...] | list[float],
    num_classes: int,
) -> tuple[float, int, float]:
    """``(accuracy, k, temperature)`` of the best pair on these queries (validation).

    Ties keep the smaller k, then the larger temperature: the smoother, simpler vote. The same
    rule serves the pretraining monitor and the kNN cells, so an encoder's monitor number and
    its kNN cell at 100 % labels with the same bank are the same measurement.
    """
    scores = knn_sweep(bank, bank_labels, queries, query_labels, ks, temperatures, num_classes)
    (k, t), accuracy = max(scores.items(), key=lambda item: (item[1], -item[0][0], item[0][1]))
    return accuracy, k, t
