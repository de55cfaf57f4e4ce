"""Behaviour of pipeline.models.losses: NT-Xent (single process and real 2-process DDP) and the
VAE objective.

NT-Xent is checked against a brute-force double loop over docs/science.md §7.2's formula in float64,
and the distributed path against the single-process loss and optimizer step on the concatenated
batch, with two gloo processes on the CPU.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributions import Normal, kl_divergence
from torch.nn.parallel import DistributedDataParallel

from pipeline.models.losses import (
    gather_with_grad,
    gaussian_kl,
    negative_elbo,
    nt_xent,
    nt_xent_negatives,
    reparameterize,
)

# --- reference implementation --------------------------------------------------------------------


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm_a = math.sqrt(math.fsum(x * x for x in a))
    norm_b = math.sqrt(math.fsum(y * y for y in b))
    return dot / (norm_a * norm_b)


def brute_force_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float, normalization: str) -> float:
    """The l(x~, x^) of docs/science.md §7.2, looping over anchors and negatives, in Python floats.

    Views 0..N-1 are z1 (image i), views N..2N-1 are z2 (image i - N). The negatives of an anchor
    are the views of the other images, i.e. every view but the anchor and its positive.
    """
    views = z1.double().tolist() + z2.double().tolist()
    n = len(z1)

    def image(view: int) -> int:
        return view % n

    def loss_of(anchor: int, positive: int) -> float:
        numerator = math.exp(cosine(views[anchor], views[positive]) / t)
        negatives = 0.0
        for other in range(2 * n):
            if image(other) != image(anchor):
                negatives += math.exp(cosine(views[anchor], views[other]) / t)
        return -math.log(numerator / (numerator + negatives))

    if normalization == "pairs":
        return sum(loss_of(i, n + i) + loss_of(n + i, i) for i in range(n)) / n
    anchors = [loss_of(i, n + i) for i in range(n)] + [loss_of(n + i, i) for i in range(n)]
    return sum(anchors) / (2 * n)


def random_pair(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g, dtype=dtype)  # correlated, like two views
    return z1, z2


# --- NT-Xent, one process ------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["simclr", "pairs"])
@pytest.mark.parametrize(
    ("n", "d", "t"), [(1, 3, 0.5), (2, 2, 1.0), (5, 4, 0.1), (8, 16, 0.5), (7, 3, 0.05)]
)
def test_nt_xent_matches_brute_force_loop(n: int, d: int, t: float, normalization: str) -> None:
    z1, z2 = random_pair(n, d, seed=n * 100 + d)
    expected = brute_force_nt_xent(z1, z2, t, normalization)
    assert nt_xent(z1, z2, t, normalization).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # float32 inputs are computed in float32: same value to float32 precision
    got32 = nt_xent(z1.float(), z2.float(), t, normalization)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_pairs_is_twice_simclr() -> None:
    z1, z2 = random_pair(6, 5, seed=3)
    simclr = nt_xent(z1, z2, 0.2, normalization="simclr")
    assert nt_xent(z1, z2, 0.2, normalization="pairs").item() == pytest.approx(2 * simclr.item())
    assert nt_xent(z1, z2, 0.2).item() == simclr.item()  # simclr is the default


def test_aligned_views_with_far_apart_negatives_reach_the_minimum() -> None:
    """sim is in [-1, 1], so l >= log(1 + (2N - 2) exp(-2/t)) for every input; N = 2 antipodal
    images with identical views reach it, orthogonal images with identical views come within
    (2N - 2) exp(-1/t) of 0, and collapsed projections (all images alike) are far worse."""
    t = 0.1
    e = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)  # the bound is 4e-9: float64
    antipodal = torch.cat([e, -e])
    bound = math.log(1 + 2 * math.exp(-2 / t))
    assert nt_xent(antipodal, antipodal.clone(), t).item() == pytest.approx(bound, rel=1e-4)

    n = 4
    orthogonal = torch.eye(n, dtype=torch.float64)
    aligned = nt_xent(orthogonal, 3 * orthogonal, t).item()
    assert aligned == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / t)), rel=1e-4)
    assert aligned < 1e-3

    random_z1, random_z2 = random_pair(n, n, seed=4)
    assert nt_xent(random_z1, random_z2, t).item() >= math.log(1 + 6 * math.exp(-2 / t))

    # every image has the same projection as every other: all similarities are 1
    collapsed = torch.ones(n, n, dtype=torch.float64)
    assert nt_xent(collapsed, collapsed.clone(), t).item() == pytest.approx(math.log(2 * n - 1))
    assert nt_xent(collapsed, collapsed.clone(), t).item() > aligned + 1


def test_identical_rows_for_different_images_raise_the_loss() -> None:
    z1, z2 = random_pair(5, 8, seed=5)
    before = nt_xent(z1, z2, 0.2)
    z1_dup, z2_dup = z1.clone(), z2.clone()
    z1_dup[1], z2_dup[1] = z1[0], z2[0]  # image 1 now looks like image 0: a hard negative
    assert nt_xent(z1_dup, z2_dup, 0.2) > before


def test_gradient_reaches_both_views() -> None:
    z1, z2 = random_pair(4, 6, seed=6, dtype=torch.float32)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    nt_xent(z1, z2, 0.5).backward()
    for grad in (z1.grad, z2.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_invariant_to_rescaling_each_row() -> None:
    """Cosine similarity: any positive scale per row leaves the loss unchanged."""
    z1, z2 = random_pair(6, 4, seed=7)
    scale = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.01
    expected = nt_xent(z1, z2, 0.3)
    assert nt_xent(z1 * scale, z2 * 1e3, 0.3).item() == pytest.approx(expected.item(), rel=1e-10)


def test_stable_for_small_temperature() -> None:
    z1, z2 = random_pair(6, 4, seed=8)
    t = 1e-3  # logits up to 1000: exp would overflow without log-sum-exp
    loss = nt_xent(z1, z2, t)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(brute_force_log_domain(z1, z2, t), rel=1e-8)


def brute_force_log_domain(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The brute-force loss with a max-shift, for temperatures where exp() overflows."""
    views = z1.double().tolist() + z2.double().tolist()
    n = len(z1)
    total = 0.0
    for anchor in range(2 * n):
        positive = (anchor + n) % (2 * n)
        logits = [cosine(views[anchor], views[k]) / t for k in range(2 * n) if k != anchor]
        top = max(logits)
        log_denominator = top + math.log(math.fsum(math.exp(x - top) for x in logits))
        total += log_denominator - cosine(views[anchor], views[positive]) / t
    return total / (2 * n)


def test_float32_under_autocast() -> None:
    """bf16 cosine logits at t = 0.1 would be off by ~1e-2; the loss must ignore autocast."""
    z1, z2 = random_pair(8, 32, seed=9, dtype=torch.float32)
    expected = nt_xent(z1, z2, 0.1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = nt_xent(z1, z2, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_single_process_gather_is_a_no_op() -> None:
    z1, z2 = random_pair(4, 3, seed=10)
    assert gather_with_grad(z1) is z1
    assert nt_xent(z1, z2, 0.5, gather=True).item() == nt_xent(z1, z2, 0.5, gather=False).item()
    assert nt_xent_negatives(4) == 6
    assert nt_xent_negatives(4, gather=False) == 6


@pytest.mark.parametrize(
    ("z1_shape", "z2_shape", "t", "normalization", "message"),
    [
        ((4, 3), (5, 3), 0.5, "simclr", "same shape"),
        ((4, 3), (4, 2), 0.5, "simclr", "same shape"),
        ((4,), (4,), 0.5, "simclr", "N x d"),
        ((0, 3), (0, 3), 0.5, "simclr", "non-empty"),
        ((4, 3), (4, 3), 0.0, "simclr", "temperature"),
        ((4, 3), (4, 3), -0.1, "simclr", "temperature"),
        ((4, 3), (4, 3), math.nan, "simclr", "temperature"),
        ((4, 3), (4, 3), 0.5, "mean", "allowed: simclr, pairs"),
    ],
)
def test_nt_xent_rejects_bad_arguments(
    z1_shape: tuple, z2_shape: tuple, t: float, normalization: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        nt_xent(torch.randn(z1_shape), torch.randn(z2_shape), t, normalization)


def test_nt_xent_negatives_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="n_local"):
        nt_xent_negatives(0)


# --- NT-Xent, two real DDP processes -------------------------------------------------------------

N_LOCAL, IN_DIM, OUT_DIM, WORLD = 4, 6, 5, 2
DDP_LR, DDP_T = 0.5, 0.2


def ddp_inputs() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A fixed global batch (two views of WORLD * N_LOCAL images) and the Linear's initial state."""
    g = torch.Generator().manual_seed(2024)
    x1 = torch.randn(WORLD * N_LOCAL, IN_DIM, generator=g)
    x2 = x1 + 0.5 * torch.randn(WORLD * N_LOCAL, IN_DIM, generator=g)
    torch.manual_seed(11)
    state = {k: v.clone() for k, v in torch.nn.Linear(IN_DIM, OUT_DIM).state_dict().items()}
    return x1, x2, state


def project(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> tuple:
    """Both views in one forward pass (one DDP forward per backward), split back into z1, z2."""
    return model(torch.cat([x1, x2])).split(len(x1))


def ddp_worker(rank: int, store: str, out_dir: str) -> None:
    """One rank: its half of the batch, gathered NT-Xent, one backward + SGD step under DDP."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        x1, x2, state = ddp_inputs()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        linear = torch.nn.Linear(IN_DIM, OUT_DIM)
        linear.load_state_dict(state)
        model = DistributedDataParallel(linear)
        optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
        z1, z2 = project(model, x1[rows], x2[rows])
        loss = nt_xent(z1, z2, DDP_T, gather=True)
        with torch.no_grad():
            local_loss = nt_xent(z1, z2, DDP_T, gather=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result = {
            "world_size": dist.get_world_size(),
            "negatives": nt_xent_negatives(N_LOCAL),
            "negatives_local": nt_xent_negatives(N_LOCAL, gather=False),
            "loss": loss.item(),
            "local_loss": local_loss.item(),
            "state": {k: v.detach().clone() for k, v in linear.state_dict().items()},
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, timeout_s: float = 120.0) -> list[dict]:
    """Spawn WORLD processes that rendezvous through a file store; fail instead of hanging."""
    context = mp.start_processes(
        ddp_worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {timeout_s} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def single_process_step(gather_halves: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    """The reference: one SGD step on the full batch, same lr, loss NOT rescaled.

    Why no rescaling: each rank's loss is the mean over its own 2 * N_LOCAL anchors, so
    mean_r(L_r) is the full-batch loss L. Gathering sums into rank r's rows the gradients that
    every rank's loss sends them, so rank r's parameter gradient is sum_r' dL_r'/dtheta restricted
    to its own rows, and DDP's AVERAGE over ranks gives (1/W) sum_r' dL_r'/dtheta = dL/dtheta.

    ``gather_halves=False`` is what DDP without gathering would do: each half is its own batch.
    """
    x1, x2, state = ddp_inputs()
    linear = torch.nn.Linear(IN_DIM, OUT_DIM)
    linear.load_state_dict(state)
    optimizer = torch.optim.SGD(linear.parameters(), lr=DDP_LR)
    if gather_halves:
        loss = nt_xent(*project(linear, x1, x2), DDP_T)
    else:
        halves = zip(x1.split(N_LOCAL), x2.split(N_LOCAL), strict=True)
        loss = torch.stack([nt_xent(*project(linear, a, b), DDP_T) for a, b in halves]).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), {k: v.detach().clone() for k, v in linear.state_dict().items()}


def test_ddp_gathered_negatives_match_single_process(tmp_path: Path) -> None:
    ranks = run_two_ranks(tmp_path)
    x1, x2, initial = ddp_inputs()
    full_loss, full_state = single_process_step()

    # (a) every anchor sees the other rank's views: 4 * N_LOCAL - 2 = 14 negatives, not 6
    for result in ranks:
        assert result["world_size"] == WORLD
        assert result["negatives"] == 2 * N_LOCAL * WORLD - 2 == 14
        assert result["negatives_local"] == 2 * N_LOCAL - 2 == 6

    # (b) the mean of the ranks' losses is the loss on the concatenated batch ...
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    assert mean_loss == pytest.approx(full_loss, abs=1e-5)
    # ... and without gathering each rank's loss is its own half's (fewer negatives, lower loss)
    for rank, result in enumerate(ranks):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        linear = torch.nn.Linear(IN_DIM, OUT_DIM)
        linear.load_state_dict(initial)
        with torch.no_grad():
            half = nt_xent(*project(linear, x1[rows], x2[rows]), DDP_T).item()
        assert result["local_loss"] == pytest.approx(half, abs=1e-5)
        assert result["local_loss"] < result["loss"]

    # (c) one DDP step == one single-process step on the full batch, on both ranks
    for result in ranks:
        for name, value in full_state.items():
            torch.testing.assert_close(result["state"][name], value, atol=1e-5, rtol=0)
    # the check has teeth: the step is large, and gathering changes it far beyond the tolerance
    _, ungathered_state = single_process_step(gather_halves=False)
    moved = (full_state["weight"] - initial["weight"]).abs().max()
    gap = (full_state["weight"] - ungathered_state["weight"]).abs().max()
    assert moved > 1e-2
    assert gap > 1e-3


# --- VAE -----------------------------------------------------------------------------------------


def vae_batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64)
    reconstruction = target + 0.2 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return reconstruction, target, mu, logvar


def test_gaussian_kl_matches_torch_distributions() -> None:
    _, _, mu, logvar = vae_batch()
    std = torch.exp(0.5 * logvar)
    expected = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert torch.all(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)


@pytest.mark.parametrize("decoder_std", [1.0, 0.3])
def test_negative_elbo_nll_is_the_gaussian_decoder_log_likelihood(decoder_std: float) -> None:
    reconstruction, target, mu, logvar = vae_batch()
    loss, nll, kl = negative_elbo(reconstruction, target, mu, logvar, decoder_std=decoder_std)
    log_p = Normal(reconstruction, decoder_std).log_prob(target).flatten(1).sum(1)
    torch.testing.assert_close(nll, -log_p.mean())
    torch.testing.assert_close(kl, gaussian_kl(mu, logvar).mean())
    torch.testing.assert_close(loss, nll + kl)


def test_beta_scales_only_the_kl() -> None:
    batch = vae_batch(seed=1)
    loss1, nll1, kl1 = negative_elbo(*batch, beta=1.0)
    loss4, nll4, kl4 = negative_elbo(*batch, beta=4.0)
    loss0, nll0, _ = negative_elbo(*batch, beta=0.0)
    assert nll1 == nll4 == nll0
    assert kl1 == kl4
    torch.testing.assert_close(loss4 - loss1, 3 * kl1)
    torch.testing.assert_close(loss0, nll0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"beta": -1.0}, "beta"), ({"decoder_std": 0.0}, "decoder_std")],
)
def test_negative_elbo_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        negative_elbo(*vae_batch(), **kwargs)
    reconstruction, target, mu, logvar = vae_batch()
    with pytest.raises(ValueError, match="same shape"):
        negative_elbo(reconstruction[:, :, :2], target, mu, logvar)


def test_reparameterize_is_reproducible_with_a_generator() -> None:
    mu, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    first = reparameterize(mu, logvar, torch.Generator().manual_seed(5))
    again = reparameterize(mu, logvar, torch.Generator().manual_seed(5))
    other = reparameterize(mu, logvar, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_reparameterize_samples_have_the_encoder_mean_and_std() -> None:
    n = 200_000
    mu = torch.tensor([0.5, -2.0, 3.0]).expand(n, 3)
    logvar = torch.tensor([0.0, -1.0, 1.5]).expand(n, 3)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(7))
    torch.testing.assert_close(z.mean(0), mu[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.exp(0.5 * logvar[0]), atol=0.02, rtol=0)


def test_reparameterize_passes_gradients_to_mu_and_logvar() -> None:
    mu = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    reparameterize(mu, logvar, torch.Generator().manual_seed(8)).pow(2).sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    assert logvar.grad.abs().sum() > 0
