"""Self-supervised and generative objectives: SimCLR's NT-Xent and the VAE's negative ELBO.

The formulas are the ones in docs/science.md §7.2 and §7.6; tests/test_losses.py
checks them against brute-force loops and torch.distributions.

NT-Xent under DDP: the negatives of an anchor are the views of *every* image in the global batch,
so each rank gathers the (normalized) projections of all ranks. The gather keeps the gradient: in
the backward pass the gradient that every rank computes for a gathered row is summed and sent back
to the rank that owns the row (``gather_with_grad``). Each rank's loss is the mean over its own
anchors, so the mean of the ranks' losses is the single-process loss over the concatenated batch,
and because DDP *averages* parameter gradients over ranks, one DDP step equals one single-process
step on the full batch with the same learning rate, no rescaling of the loss needed
(tests/test_losses.py runs this with two real gloo processes).

Why a small autograd Function instead of ``torch.distributed.nn.functional.all_gather``: in the
pinned torch (2.14) that function emits a FutureWarning (deprecated in favour of the private
``torch.distributed._functional_collectives``). The Function below uses only the stable
``dist.all_gather`` / ``dist.all_reduce`` and has the same gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NORMALIZATIONS",
    "gather_with_grad",
    "gaussian_kl",
    "negative_elbo",
    "nt_xent",
    "nt_xent_negatives",
    "reparameterize",
]

NORMALIZATIONS: tuple[str, ...] = ("simclr", "pairs")
"""``simclr``: mean over the 2N anchors (Chen et al. 2020). ``pairs``: the course's mean over
positive pairs of l(x~, x^) + l(x^, x~), i.e. exactly 2x the ``simclr`` value."""


# --- distributed helpers ------------------------------------------------------------------------


def _distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns, for the local rows, the SUM over ranks of
    the gradients computed for them (every rank's loss uses every row)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: Tensor) -> Tensor:
        z = z.contiguous()
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z)
        ctx.rows = (dist.get_rank() * z.shape[0], (dist.get_rank() + 1) * z.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        # all_reduce (available on every backend) sums the full gradient, then each rank keeps
        # its own rows; it works in place, so it gets a copy, not autograd's buffer.
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start, stop = ctx.rows
        return total[start:stop]


def gather_with_grad(z: Tensor) -> Tensor:
    """Concatenate ``z`` from all ranks along dim 0 in rank order, keeping the gradient.

    The gradient of the result with respect to the local ``z`` is the sum over ranks of what each
    rank's loss sends back for these rows, which is what makes the gathered negatives train the
    encoder on every rank. All ranks must pass the same shape (equal per-rank batch sizes, as
    ``DistributedSampler`` gives). Returns ``z`` itself when torch.distributed is not initialized
    or the world size is 1.
    """
    if not _distributed():
        return z
    return _GatherWithGrad.apply(z)


# --- NT-Xent -----------------------------------------------------------------------------------


def _check_nt_xent_args(z1: Tensor, z2: Tensor, temperature: float, normalization: str) -> None:
    """Raise ValueError for inputs the formula has no meaning for."""
    if z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent: z1 and z2 must have the same shape (one row per image, two views), "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.ndim != 2 or z1.shape[0] == 0:
        raise ValueError(f"nt_xent: expected non-empty N x d projections, got {tuple(z1.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"nt_xent: temperature must be a finite number > 0, got {temperature}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"nt_xent: unknown normalization {normalization!r}; "
            f"allowed: {', '.join(NORMALIZATIONS)}"
        )


def _anchor_targets(
    n_local: int, n_global: int, offset: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Column of each anchor's own view and of its positive among the 2 * n_global candidates.

    Anchors are [z1_local; z2_local]; candidates are [z1_global; z2_global], where this rank's
    rows start at ``offset``. Anchor z1[i] is candidate offset + i and its positive z2[i] is
    candidate n_global + offset + i; for anchor z2[i] the two swap.
    """
    own = torch.arange(n_local, device=device) + offset
    self_col = torch.cat([own, own + n_global])
    positive_col = torch.cat([own + n_global, own])
    return self_col, positive_col


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    normalization: str = "simclr",
    gather: bool = True,
) -> Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020) as written in docs/science.md §7.2.

    ``z1[i]`` and ``z2[i]`` are the projections (N x d, any scale) of two augmented views of
    image i. With ``sim(a, b) = a.b / (|a| |b|)`` and temperature t, the loss of anchor a with
    positive p is ``-log(exp(sim(a,p)/t) / (exp(sim(a,p)/t) + sum_n exp(sim(a,n)/t)))``, the
    negatives n being every view in the batch except a and p (2N - 2 of them). With ``gather``
    and an initialized process group the batch is the global one (2 * N * world_size - 2
    negatives, see ``nt_xent_negatives``); each rank returns the loss of its local anchors, so
    the mean over ranks is the single-process loss on the concatenated batch.

    ``normalization``: ``"simclr"`` (default) averages over the 2N anchors as in the paper;
    ``"pairs"`` is the course's average over positive pairs of l(x~, x^) + l(x^, x~), 2x larger.

    Computed as a cross-entropy over cosine logits with each anchor's own column set to -inf
    (log-sum-exp, stable for small t), in float32 or wider even under autocast: bf16/fp16 cosine
    similarities divided by a small t lose the differences the loss is made of.
    """
    _check_nt_xent_args(z1, z2, temperature, normalization)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a1 = F.normalize(z1.to(dtype), dim=1)
        a2 = F.normalize(z2.to(dtype), dim=1)
        c1, c2 = (gather_with_grad(a1), gather_with_grad(a2)) if gather else (a1, a2)
        n_local, n_global = a1.shape[0], c1.shape[0]
        offset = _rank() * n_local if gather else 0
        logits = torch.cat([a1, a2]) @ torch.cat([c1, c2]).T / temperature
        self_col, positive_col = _anchor_targets(n_local, n_global, offset, logits.device)
        is_self = F.one_hot(self_col, 2 * n_global).bool()
        loss = F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive_col)
    return 2 * loss if normalization == "pairs" else loss


def nt_xent_negatives(n_local: int, gather: bool = True) -> int:
    """Negatives per anchor that ``nt_xent`` uses for ``n_local`` images per rank right now:
    ``2 * n_local * world_size - 2`` (world size 1 when not distributed or ``gather`` is False).

    Worth logging: the number of negatives, not the per-device batch, is what SimCLR's results
    depend on, and it silently changes with the number of devices.
    """
    if n_local < 1:
        raise ValueError(f"nt_xent_negatives: n_local must be >= 1, got {n_local}")
    world = _world_size() if gather else 1
    return 2 * n_local * world - 2


# --- VAE ---------------------------------------------------------------------------------------


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, in closed form:
    ``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` over all dimensions but the first (batch).

    Closed form rather than a Monte-Carlo estimate: exact, and no extra variance in the ELBO.
    """
    if mu.shape != logvar.shape:
        raise ValueError(
            f"gaussian_kl: mu and logvar must have the same shape, "
            f"got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )
    terms = 1 + logvar - mu.pow(2) - logvar.exp()
    return -0.5 * terms.flatten(1).sum(dim=1)


def negative_elbo(
    reconstruction: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    beta: float = 1.0,
    decoder_std: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The VAE objective of docs/science.md §7.6, ``E_q[ln p(x|z)] - KL(q(z|x) || p(z))``, negated
    so that it is minimized, averaged over the batch. Returns ``(loss, reconstruction_nll, kl)``
    with ``loss = reconstruction_nll + beta * kl``.

    The decoder is Gaussian, ``p(x|z) = N(reconstruction, decoder_std^2 I)``, so the NLL of a
    sample with D values is ``0.5 * sum((x - x_hat)^2) / decoder_std^2
    + 0.5 * D * log(2 pi decoder_std^2)``. The constant is kept so that the value is a true
    (single-sample) bound on -ln p(x) and comparable across decoder_std; decoder_std is the knob
    that balances reconstruction against the KL (as beta does, from the other side).
    """
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"negative_elbo: reconstruction and target must have the same shape, "
            f"got {tuple(reconstruction.shape)} and {tuple(target.shape)}"
        )
    if not (math.isfinite(decoder_std) and decoder_std > 0):
        raise ValueError(f"negative_elbo: decoder_std must be finite and > 0, got {decoder_std}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"negative_elbo: beta must be finite and >= 0, got {beta}")
    squared = (target - reconstruction).pow(2).flatten(1).sum(dim=1)
    log_norm = 0.5 * target[0].numel() * math.log(2 * math.pi * decoder_std**2)
    nll = (0.5 * squared / decoder_std**2 + log_norm).mean()
    kl = gaussian_kl(mu, logvar).mean()
    return nll + beta * kl, nll, kl


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sample ``z = mu + exp(0.5 * logvar) * eps`` with ``eps ~ N(0, I)``.

    The reparameterization trick: the randomness sits in eps, so gradients reach mu and logvar.
    ``generator`` makes the draw reproducible; it must live on mu's device (the global RNG of
    that device is used when it is None).
    """
    if mu.shape != logvar.shape:
        raise ValueError(
            f"reparameterize: mu and logvar must have the same shape, "
            f"got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps
