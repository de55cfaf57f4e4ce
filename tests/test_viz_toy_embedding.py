"""Toy decision boundaries and 2-D embeddings: the pictures' numbers mean what they claim.

Thresholds were measured (seed 0, 400 points, 300 Adam steps at lr 0.01): moons 0.2 noise gives
0.978 for relu depth 2 width 16 and 0.875 for the linear model; circles 0.1 noise gives 1.000 for
relu depth 2 and 0.497 for identity depth 4. UMAP is imported (slowly) in one test only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.viz import embedding, toy

STEPS, LR = 300, 0.01


def _png_variance(path: Path) -> float:
    with Image.open(path) as image:
        return float(np.asarray(image.convert("L"), dtype=np.float64).std())


def _blobs(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters in 32-D (distinct directions, so L2 keeps them apart)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 32)) * 3.0
    labels = np.arange(n) % classes
    return (centres[labels] + rng.normal(size=(n, 32))).astype(np.float32), labels


# ---------------------------------------------------------------------------------- make_toy


@pytest.mark.parametrize("name", toy.TOY_DATASETS)
def test_make_toy_shapes_balance_and_standardization(name: str) -> None:
    X, y = toy.make_toy(name, 301, 0.1, seed=0)
    assert X.shape == (301, 2) and X.dtype == np.float32
    assert y.shape == (301,) and y.dtype == np.int64
    assert set(np.unique(y)) == {0, 1}
    assert abs(int((y == 0).sum()) - int((y == 1).sum())) <= 1
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(X.std(axis=0), 1.0, atol=1e-4)


@pytest.mark.parametrize("name", toy.TOY_DATASETS)
def test_make_toy_is_fixed_by_its_seed(name: str) -> None:
    X, y = toy.make_toy(name, 200, 0.2, seed=3)
    X2, y2 = toy.make_toy(name, 200, 0.2, seed=3)
    X3, _ = toy.make_toy(name, 200, 0.2, seed=4)
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    assert not np.allclose(X, X3)


def test_make_toy_rejects_an_unknown_name_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="moons, circles, spirals"):
        toy.make_toy("swiss_roll", 100, 0.1, seed=0)
    with pytest.raises(ValueError, match="noise"):
        toy.make_toy("moons", 100, -0.1, seed=0)


# ------------------------------------------------------------------------------------ fit_toy


def test_depth_and_nonlinearity_matter_on_moons() -> None:
    X, y = toy.make_toy("moons", 400, 0.2, seed=0)
    _, deep = toy.fit_toy(X, y, 2, 16, "relu", STEPS, LR, seed=0)
    _, linear = toy.fit_toy(X, y, 0, 16, "relu", STEPS, LR, seed=0)
    assert deep >= 0.95
    assert linear < 0.9


def test_identity_activation_buys_nothing_on_circles() -> None:
    X, y = toy.make_toy("circles", 400, 0.1, seed=0)
    _, relu = toy.fit_toy(X, y, 2, 16, "relu", STEPS, LR, seed=0)
    _, identity = toy.fit_toy(X, y, 4, 16, "identity", STEPS, LR, seed=0)
    assert relu >= 0.95
    assert identity <= 0.75


def test_fit_toy_is_deterministic_given_the_seed() -> None:
    X, y = toy.make_toy("spirals", 200, 0.2, seed=0)
    mesh = np.random.default_rng(0).uniform(-2, 2, size=(500, 2))
    first, acc1 = toy.fit_toy(X, y, 2, 8, "tanh", 50, LR, seed=5)
    second, acc2 = toy.fit_toy(X, y, 2, 8, "tanh", 50, LR, seed=5)
    other, _ = toy.fit_toy(X, y, 2, 8, "tanh", 50, LR, seed=6)
    assert acc1 == acc2
    assert np.array_equal(first.probability(mesh), second.probability(mesh))
    assert not np.allclose(first.probability(mesh), other.probability(mesh))


def test_fit_toy_rejects_bad_settings() -> None:
    X, y = toy.make_toy("moons", 50, 0.1, seed=0)
    with pytest.raises(ValueError, match="identity"):
        toy.fit_toy(X, y, 2, 8, "swish", 10, LR, seed=0)
    with pytest.raises(ValueError, match="y must hold"):
        toy.fit_toy(X, y + 1, 2, 8, "relu", 10, LR, seed=0)


def test_decision_boundary_grid_layout_and_figure(tmp_path: Path) -> None:
    X, y = toy.make_toy("moons", 100, 0.2, seed=0)
    results = toy.decision_boundary_grid(X, y, [0, 2], [4, 8], "relu", 20, LR, seed=0)
    placed = [(r["row"], r["column"], r["depth"], r["width"], r["activation"]) for r in results]
    # depth 0 once; the contrast row has only the identity net since depth 0 is in the grid.
    assert placed == [
        (0, 0, 0, 0, "none"),
        (1, 0, 2, 4, "relu"),
        (1, 1, 2, 8, "relu"),
        (2, 0, 2, 8, "identity"),
    ]
    # Linear(2, 2) = 6; 2 -> 4 -> 4 -> 2 = 12 + 20 + 10.
    assert [r["parameters"] for r in results[:2]] == [6, 42]
    for r in results:
        assert r["probability"].shape == (toy.MESH_POINTS, toy.MESH_POINTS)
        assert r["probability"].min() >= 0.0 and r["probability"].max() <= 1.0
        assert 0.0 <= r["accuracy"] <= 1.0
    path = toy.decision_boundary_figure(results, X, y, tmp_path / "toy.png", "moons")
    assert _png_variance(path) > 10.0


# -------------------------------------------------------------------------------------- embed


@pytest.mark.parametrize(("method", "blobs_seed"), [("tsne", 0), ("umap", 1)])
def test_an_embedding_is_deterministic_and_separates_blobs(method: str, blobs_seed: int) -> None:
    features, labels = _blobs(240, 4, seed=blobs_seed)
    points = embedding.embed(features, method, seed=0)
    assert points.shape == (240, 2) and np.isfinite(points).all()
    assert np.array_equal(points, embedding.embed(features, method, seed=0))
    assert embedding.embedding_quality(points, labels) >= 0.9


def test_embed_works_on_a_handful_of_points() -> None:
    features, _ = _blobs(10, 2, seed=2)
    assert embedding.embed(features, "tsne", seed=0).shape == (10, 2)


def test_embed_rejects_an_unknown_method_and_bad_features() -> None:
    features, _ = _blobs(20, 2, seed=0)
    with pytest.raises(ValueError, match="tsne, umap"):
        embedding.embed(features, "pca", seed=0)
    features[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        embedding.embed(features, "tsne", seed=0)


def test_embedding_quality_is_near_chance_for_random_labels() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(2000, 2))
    labels = rng.integers(0, 4, size=2000)
    chance = float(sum((np.bincount(labels) / 2000) ** 2))
    assert abs(embedding.embedding_quality(points, labels) - chance) < 0.05


def test_embedding_quality_of_pure_and_of_mixed_neighbourhoods() -> None:
    points = np.array([[0, 0], [0, 1], [1, 0], [100, 100], [100, 101], [101, 100]], float)
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert embedding.embedding_quality(points, labels, k=2) == 1.0
    # Alternating labels inside each cluster: each point has one same-label neighbour of two,
    # or none (the odd one out).
    mixed = np.array([0, 1, 0, 1, 0, 1])
    assert embedding.embedding_quality(points, mixed, k=2) == pytest.approx(4 / 12)


def test_embedding_figure_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 12  # beyond 10 classes: tab20
    panels = [(f"method {i} · t-SNE", rng.normal(size=(300, 2)) + labels[:, None]) for i in (1, 2)]
    names = [f"class {c}" for c in range(12)]
    path = embedding.embedding_figure(panels, labels, names, tmp_path / "emb.png", "embeddings")
    assert _png_variance(path) > 10.0
    with pytest.raises(ValueError, match="class names"):
        embedding.embedding_figure(panels, labels, names[:5], tmp_path / "bad.png", "bad")
