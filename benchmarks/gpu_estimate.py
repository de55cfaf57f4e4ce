"""The GPU profile's time on one GPU, estimated where none is lent: FLOPs of every part / a rate.

    python -m benchmarks.gpu_estimate [--tflops 150] [--jobs-at-once 4] [--data FILE] [--json OUT]

Why: ``params.gpu.yaml`` must fit the whole GPU study in an hour on one H200, and
``benchmarks/gpu.py`` measures that only on a GPU machine, which is lent now and then. Until it
is, this sizes the profile from what can be counted exactly on any machine:

- the FLOPs of one training step of every trained method of the profile, counted by
  ``torch.utils.flop_counter`` on the real ``PretrainModule.objective`` + backward (teacher,
  decoders and heads included) at the profile's model and image size, per source image;
- the encoder's forward FLOPs per image, for the monitors, the validation passes, the frozen
  features and the kNN cells; a fine-tuning step is 3 forwards per labeled image (forward and
  backward), a FixMatch step ``3 (1 + 2 mu)`` (labeled, weak and strong views in one batch);
- the steps: each cell's budget from the same ``cell_budget`` the GPU check uses (the pipeline's
  ``finetune.budget`` on the real split of the packed data), the pretraining epochs' steps;
- the per-job fixed cost (interpreter, imports, CUDA initialization), measured here in a fresh
  process as ``benchmarks.gpu.fixed_cost`` does;

then divides the FLOPs by an assumed sustained rate and adds them up with the same
``benchmarks.gpu.extrapolate`` the GPU check uses. The rate is the weak link: 150 TFLOP/s is
15 % of an H200's dense bf16 peak (989 TFLOP/s), what ResNet-18 training on small images
typically sustains in eager PyTorch (BENCHMARKS.md, "GPU profile size"); the report also gives
the totals at half and twice the rate. The counter sees matrix products and convolutions only
(no batch norm, activations or augmentation), and each optimizer step is charged
``--step-overhead-ms`` of launch and loop overhead.
``--jobs-at-once``: Snakemake on one machine runs as many jobs as its cores allow
(``resources.*.cpus`` each, 4 in the GPU profile: 4 jobs on 16 cores), all on the one GPU, so
their start-ups overlap and the GPU's work does not: the bound is
``max(GPU work, (GPU work + start-ups) / jobs)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu
from benchmarks.machine import describe, save_result

RESULT = Path("benchmarks/results/gpu_estimate.json")
H200_BF16_TFLOPS = 989.0  # dense, NVIDIA's datasheet


def _flops(fn: Any) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def forward_flops(ctx: gpu.Context, count: int = 4) -> float:
    """The profile encoder's forward FLOPs per image."""
    encoder = ctx.encoder().eval()
    channels, size = ctx.shape
    with torch.no_grad():
        return _flops(lambda: encoder(torch.zeros(count, channels, size, size))) / count


def step_flops(ctx: gpu.Context, method: str, count: int = 4) -> float:
    """One training step of ``method`` per source image: its objective and the backward."""
    from pipeline.methods._registry import IMPLEMENTATIONS
    from pipeline.models.pretrain import PretrainModule

    module = PretrainModule(**ctx.pretrain_kwargs(method))
    images = ctx.images[:count]
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss, _, _ = module.objective(images, generator)
        loss.backward()

    flops = _flops(step)
    if hasattr(IMPLEMENTATIONS[method], "training_step"):
        flops *= 2  # D's step on real and fake, then G's through D: about twice the objective's
    return flops / count


def cell_passes(ctx: gpu.Context, forward: float, rate: float, overhead: float) -> dict:
    """Every (budget, mode) of the plan: its epochs cap and one epoch's seconds at ``rate``."""
    ft = ctx.params["finetune"]
    mu = ft["semi"]["unlabeled_ratio"]
    val = len(ctx.split.val)
    fractions: dict[str, Any] = {}
    for _, mode, fraction in ctx.plan.cells:
        modes = fractions.setdefault(fraction, {"modes": {}})["modes"]
        if mode in modes:
            continue
        subset = len(ctx.split.subsets[fraction])
        features_s = forward * (subset + val) / rate
        if mode == "knn":
            modes[mode] = {"features_s": features_s, "knn_s": 0.0}
            continue
        _, cap = gpu.cell_budget(ctx, fraction, mode)
        batch = min(gpu.finetune_batch(ft, mode), subset)
        per_image = {"linear": 0.0, "finetune": 3.0, "semi": 3.0 * (1 + 2 * mu)}[mode]
        step_s = per_image * forward * batch / rate + overhead
        val_s = 0.0 if mode == "linear" else forward * val / rate  # linear: on the features
        modes[mode] = {
            "batch_size": batch,
            "steps_per_epoch": cap.steps_per_epoch,
            "max_epochs": cap.max_epochs,
            "step_s": step_s,
            "val_s": val_s,
            "pass_s": cap.steps_per_epoch * step_s + val_s,
            "features_s": features_s if mode == "linear" else 0.0,
        }
    return {"fractions": fractions}


def estimate(
    ctx: gpu.Context,
    tflops: float,
    overhead_ms: float,
    at_once: int,
    fixed: dict[str, Any] | None = None,
) -> dict:
    """The extrapolation at ``tflops``; ``fixed``: a job's start-up measured already (else now)."""
    rate, overhead = tflops * 1e12, overhead_ms / 1000
    pre = ctx.params["pretrain"]
    forward = forward_flops(ctx)
    monitor = forward * (min(pre["monitor"]["knn_max_train"], len(ctx.split.train)))
    monitor += forward * len(ctx.split.val)
    methods = {}
    per_image = {}
    for method in gpu.measured_methods(ctx.params):
        per_image[method] = step_flops(ctx, method)
        step_s = per_image[method] * pre["batch_size"] / rate + overhead
        methods[method] = {
            "lightning_img_s": pre["batch_size"] / step_s,
            "lightning_val_s": monitor / rate,
        }
    passes = cell_passes(ctx, forward, rate, overhead)
    fixed = gpu.fixed_cost(ctx) if fixed is None else fixed
    result = gpu.extrapolate(ctx, {"methods": methods}, passes, fixed, gpu.pca_fit_seconds(ctx))
    work = result["parts_s"]["pretrain"] + result["parts_s"]["finetune"]
    result["at_once"] = at_once
    result["at_once_s"] = max(work, result["total_s"] / at_once)
    result["flops"] = {"encoder_forward_per_image": forward, "step_per_image": per_image}
    result["fixed_cost"] = fixed
    return result


def context(data: Path | None, root: Path, sizes: gpu.Sizes = gpu.FULL) -> gpu.Context:
    """The GPU check's Context (the profile's full sizes by default), on the CPU: nothing is
    trained, only counted."""
    images = gpu.load_images(data, sizes)
    plan = gpu.resolve_plan(gpu.PARAMS, gpu.PROFILE, images.plan, str(data))
    params = gpu.sized(plan.params, sizes)
    split = gpu.split_of(images, params)
    document = gpu.policy_document(images.train_images[split.train], params)
    return gpu.Context(
        plan,
        params,
        sizes,
        torch.device("cpu"),
        "32-true",
        torch.from_numpy(images.train_images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(images.train_labels.astype("int64")),
        split,
        document,
        root,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=150.0, help="assumed sustained rate")
    parser.add_argument("--step-overhead-ms", type=float, default=2.0)
    parser.add_argument("--jobs-at-once", type=int, default=4)
    parser.add_argument("--data", type=Path, default=gpu.DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as root:
        ctx = context(args.data, Path(root))
        fixed = gpu.fixed_cost(ctx)  # one measurement for the three rates
        runs = {
            str(tflops): estimate(ctx, tflops, args.step_overhead_ms, args.jobs_at_once, fixed)
            for tflops in (args.tflops / 2, args.tflops, args.tflops * 2)
        }
    central = runs[str(args.tflops)]
    result = {
        "machine": describe("benchmarks.gpu_estimate"),
        "tflops": args.tflops,
        "peak_tflops": H200_BF16_TFLOPS,
        "step_overhead_ms": args.step_overhead_ms,
        "estimate": central,
        "band_h": {
            k: {"one_at_a_time": v["total_h"], "at_once": v["at_once_s"] / 3600}
            for k, v in runs.items()
        },
    }
    save_result(args.json, result)
    print(json.dumps({k: v for k, v in central.items() if k != "how"}, indent=1))
    print(json.dumps(result["band_h"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
