"""Write BENCHMARKS.md from benchmarks/results/*.json (generated: do not edit BENCHMARKS.md).

python -m benchmarks.report
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path("benchmarks/results")
OUT = Path("BENCHMARKS.md")
NOTES = Path("benchmarks/tuning.md")


def _augment(result: dict) -> list[str]:
    m = result["machine"]
    rows = [
        ("Fashion-MNIST 28×28×1", "BatchAugment (ours, batched)", result["batched_img_s"]),
        ("Fashion-MNIST 28×28×1", "kornia.augmentation (batched)", result["kornia_img_s"]),
        ("Fashion-MNIST 28×28×1", "torchvision v2 per-sample, DataLoader 2 workers",
         result["per_sample_img_s"]),
        ("CIFAR-shaped 32×32×3", "BatchAugment (ours, batched)", result["cifar_batched_img_s"]),
        ("CIFAR-shaped 32×32×3", "kornia.augmentation (batched)", result["cifar_kornia_img_s"]),
    ]  # fmt: skip
    lines = [
        "## Augmentation throughput (`benchmarks/augment.py`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · "
        f"torch {m['torch']}",
        "",
        f"Command: `{m['command']}`. Policy: `augment.policies.ssl` from params.yaml; batch "
        f"{result['batch_size']}, {result['threads']} threads, best of {result['rounds']} rounds "
        f"of {result['batches']} batches, same process.",
        "",
        "| images | method | images/s |",
        "|---|---|---:|",
        *(f"| {shape} | {method} | {value:,.0f} |" for shape, method, value in rows),
        "",
        f"**Batched vs per-sample: {result['ratio']:.1f}×** (target ≥ 10×). "
        f"Ours vs kornia: {result['batched_img_s'] / result['kornia_img_s']:.1f}× on 28×28×1, "
        f"{result['cifar_batched_img_s'] / result['cifar_kornia_img_s']:.1f}× on 32×32×3.",
        "",
    ]
    return lines


def _pretrain(result: dict) -> list[str]:
    """SimCLR training throughput, ours vs per-sample loading (benchmarks/pretrain.py).

    GPU-only keys (utilization, ResNet-18 width 64) appear when the run had CUDA.
    """
    m = result["machine"]
    model = f"{result['backbone']} w{result['width']}, batch {result['batch_size']}"
    util = {"ours": result.get("gpu_util_ours_pct"),
            "per_sample": result.get("gpu_util_per_sample_pct")}  # fmt: skip
    rows = [
        ("ours: uint8 data on the device, BatchAugment views (`PretrainModule.objective`)",
         model, result["ours_img_s"], util["ours"]),
        ("per-sample torchvision v2, two views in `__getitem__`, DataLoader "
         f"{result['workers']} workers", model, result["per_sample_img_s"], util["per_sample"]),
    ]  # fmt: skip
    if "model_only_img_s" in result:
        rows.append(("model step alone on precomputed views (ceiling for both)", model,
                     result["model_only_img_s"], None))  # fmt: skip
    for resnet in result.get("resnet18", []):
        rows.append((f"ours, ResNet-18 (for information; {resnet['steps']} steps, 1 round)",
                     f"resnet18 w{resnet['width']}, batch {resnet['batch_size']}",
                     resnet["img_s"], resnet.get("gpu_util_pct")))  # fmt: skip
    with_util = any(row[3] is not None for row in rows)
    header = "| method | model | images/s |" + (" GPU util |" if with_util else "")
    rule = "|---|---|---:|" + ("---:|" if with_util else "")

    def line(method: str, model: str, value: float, gpu: float | None) -> str:
        text = f"| {method} | {model} | {value:,.0f} |"
        if with_util:
            text += " – |" if gpu is None else f" {gpu:.0f} % |"
        return text

    target = result.get("target_ratio", 3.0)
    verdict = "met" if result["ratio"] >= target else "not met"
    ceiling = ""
    if "model_only_img_s" in result:
        ceiling = (f" The model step alone runs at {result['model_only_img_s']:,.0f} images/s, "
                   f"{result['model_only_img_s'] / result['per_sample_img_s']:.1f}× the "
                   "per-sample pipeline: no input pipeline can beat that ratio.")  # fmt: skip
    simclr = result.get("simclr", {})
    return [
        "## SimCLR pretraining throughput (`benchmarks/pretrain.py`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · "
        f"torch {m['torch']}",
        "",
        f"Command: `{m['command']}`. One SimCLR training step end to end (two views, encoder, "
        f"projection head, NT-Xent t={simclr.get('temperature', '?')}, backward, "
        f"{result.get('optimizer', '?')} step) on {result['data']} 28×28×1 with "
        f"`augment.policies.ssl`, on {result['device']} ({result['precision']}); images/s count "
        f"each source image once. {result['threads']} threads, best of {result['rounds']} rounds "
        f"of {result['steps']} steps after {result['warmup_steps']} warm-up steps, same process.",
        "",
        header,
        rule,
        *(line(*row) for row in rows),
        "",
        f"**Ours vs per-sample: {result['ratio']:.1f}×** (target ≥ {target:g}×: {verdict})."
        + ceiling,
        "",
    ]


def _pipeline(result: dict) -> list[str]:
    """The default pipeline from a clean clone: stage costs, re-runs, quality targets."""
    m = result["machine"]
    targets = result["targets"]
    total = result["total_seconds"]
    minutes_ok = total / 60 <= targets["minutes"]
    rows = [f"| {stage} | {c['jobs']} | {c['seconds']:,.0f} | {c['slowest_job_seconds']:,.1f} | "
            f"{c['peak_rss_mb']:,.0f} |" for stage, c in result["stages"].items()]  # fmt: skip
    reruns = result["reruns"]
    jobs = ", ".join(f"{rule} {count}" for rule, count in reruns["param_change_jobs"].items())
    q = result["quality"]

    def row(label: str, chosen: dict | None, target: float) -> str:
        if chosen is None:
            return f"| {label} | – | – | ≥ {100 * target:g} % | not measured |"
        low, high = chosen["ci"]
        verdict = "met" if chosen["test"] >= target else "not met"
        return (f"| {label} | {chosen['cell']} (val {100 * chosen['val']:.2f} %) | "
                f"{100 * chosen['test']:.2f} % [{100 * low:.1f}, {100 * high:.1f}] | "
                f"≥ {100 * target:g} % | {verdict} |")  # fmt: skip

    gain = q.get("one_percent_gain")
    pre, scratch = q.get("one_percent_pretrained"), q.get("one_percent_scratch")
    gain_row = "| 1 % labels: best pretrained − best scratch | – | – | ≥ 5 points | not measured |"
    if gain is not None:
        gain_row = (f"| 1 % labels: best pretrained − best scratch | {pre['cell']} vs "
                    f"{scratch['cell']} | {100 * pre['test']:.2f} % − {100 * scratch['test']:.2f}"
                    f" % = {100 * gain:+.2f} points | ≥ {100 * targets['one_percent_gain']:g} "
                    f"points | {'met' if gain >= targets['one_percent_gain'] else 'not met'} |")
    return [
        "## The default pipeline from a clean state (`benchmarks/pipeline.py`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · "
        f"torch {m['torch']} · commit `{result['commit'][:12]}`",
        "",
        f"Command: `{m['command']}`: a fresh `git clone` of the committed state, `snakemake "
        f"--cores {result['cores']}` with the default params.yaml (Fashion-MNIST from Debian's "
        "package). Per stage, from each job's MLflow run: process time (imports included, summed "
        "over the stage's jobs), the slowest job, and the largest peak resident memory of a job.",
        "",
        "| stage | jobs | process time (s) | slowest job (s) | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"**Whole pipeline, download to report: {total:,.0f} s ({total / 60:.1f} min)** "
        f"(target ≤ {targets['minutes']:g} min: {'met' if minutes_ok else 'not met'}).",
        "",
        "| re-run | seconds |",
        "|---|---:|",
        f"| `snakemake`, nothing changed | {reruns['snakemake_noop_seconds']:.1f} |",
        f"| `dvc repro`, nothing changed (after `dvc commit`) | {reruns['dvc_noop_seconds']:.1f} |",
        f"| `snakemake` after `{reruns['param_change']}` ({jobs} jobs) | "
        f"{reruns['param_change_seconds']:,.0f} |",
        "",
        "Quality on the test split (mean over seeds), every choice made on validation:",
        "",
        "| target | chosen on validation | test accuracy [95 % CI] | target | |",
        "|---|---|---|---|---|",
        row("100 % labels, fine-tuned", q.get("full_finetuned"), targets["full_finetuned"]),
        row("10 % labels, best pretrained init", q.get("tenth_pretrained"),
            targets["tenth_pretrained"]),
        gain_row,
        "",
        "Every cell (test accuracy %, mean ± std over seeds [95 % bootstrap interval]):",
        "",
        *result.get("summary_markdown", "").strip().splitlines(),
        "",
    ]


SECTIONS = {"augment": _augment, "pretrain": _pretrain, "pipeline": _pipeline}


def main(argv: list[str] | None = None) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` (`make benchmarks`) from `benchmarks/results/*.json`."
        " Do not edit by hand.",
        "",
    ]
    for name, render in SECTIONS.items():
        path = RESULTS / f"{name}.json"
        if path.is_file():
            lines += render(json.loads(path.read_text()))
    if NOTES.is_file():  # the hand-kept record of what was tried, after the measured tables
        lines += [NOTES.read_text().strip(), ""]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
