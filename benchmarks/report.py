"""Write BENCHMARKS.md from benchmarks/results/*.json (generated: do not edit BENCHMARKS.md).

python -m benchmarks.report
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

from pipeline import paths

RESULTS = Path("benchmarks/results")
OUT = Path("BENCHMARKS.md")
NOTES = Path("benchmarks/tuning.md")


def _augment(result: dict) -> list[str]:
    m = result["machine"]
    rows = [
        ("Fashion-MNIST 28×28×1", "BatchAugment (ours, batched)", result["batched_img_s"]),
        ("Fashion-MNIST 28×28×1", "kornia.augmentation (batched)", result["kornia_img_s"]),
        (
            "Fashion-MNIST 28×28×1",
            "torchvision v2 per-sample, DataLoader 2 workers",
            result["per_sample_img_s"],
        ),
        ("CIFAR-shaped 32×32×3", "BatchAugment (ours, batched)", result["cifar_batched_img_s"]),
        ("CIFAR-shaped 32×32×3", "kornia.augmentation (batched)", result["cifar_kornia_img_s"]),
    ]
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
    util = {
        "ours": result.get("gpu_util_ours_pct"),
        "per_sample": result.get("gpu_util_per_sample_pct"),
    }
    rows = [
        (
            "ours: uint8 data on the device, BatchAugment views (`PretrainModule.objective`)",
            model,
            result["ours_img_s"],
            util["ours"],
        ),
        (
            "per-sample torchvision v2, two views in `__getitem__`, DataLoader "
            f"{result['workers']} workers",
            model,
            result["per_sample_img_s"],
            util["per_sample"],
        ),
    ]
    if "model_only_img_s" in result:
        rows.append(
            (
                "model step alone on precomputed views (ceiling for both)",
                model,
                result["model_only_img_s"],
                None,
            )
        )
    for resnet in result.get("resnet18", []):
        rows.append(
            (
                f"ours, ResNet-18 (for information; {resnet['steps']} steps, 1 round)",
                f"resnet18 w{resnet['width']}, batch {resnet['batch_size']}",
                resnet["img_s"],
                resnet.get("gpu_util_pct"),
            )
        )
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
        ceiling = (
            f" The model step alone runs at {result['model_only_img_s']:,.0f} images/s, "
            f"{result['model_only_img_s'] / result['per_sample_img_s']:.1f}× the "
            "per-sample pipeline: no input pipeline can beat that ratio."
        )
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
    rows = [
        f"| {stage} | {c['jobs']} | {c['seconds']:,.0f} | {c['slowest_job_seconds']:,.1f} | "
        f"{c['peak_rss_mb']:,.0f} |"
        for stage, c in result["stages"].items()
    ]
    reruns = result.get("reruns")
    rerun_rows = ["Re-runs: not measured in this run (`--no-reruns`)."]
    if reruns is not None:
        jobs = ", ".join(f"{rule} {n}" for rule, n in reruns["param_change_jobs"].items())
        rerun_rows = [
            "| re-run | seconds |",
            "|---|---:|",
            f"| `snakemake`, nothing changed | {reruns['snakemake_noop_seconds']:.1f} |",
            "| `dvc repro`, nothing changed (after `dvc commit`) | "
            f"{reruns['dvc_noop_seconds']:.1f} |",
            f"| `snakemake` after `{reruns['param_change']}` ({jobs} jobs) | "
            f"{reruns['param_change_seconds']:,.0f} |",
        ]
    q = result["quality"]
    if "budgets" not in q:
        raise ValueError(
            "benchmarks/results/pipeline.json holds the quality keys of an older "
            "benchmarks/pipeline.py (full, tenth_ssl, one_percent_*); measure it again: python -m "
            "benchmarks.pipeline --json benchmarks/results/pipeline.json"
        )
    budgets = q["budgets"]

    def row(label: str, chosen: dict | None, target: float) -> str:
        if chosen is None:
            return f"| {label} | – | – | ≥ {100 * target:g} % | not measured |"
        low, high = chosen["ci"]
        verdict = "met" if chosen["test"] >= target else "not met"
        return (
            f"| {label} | {chosen['cell']} (val {100 * chosen['val']:.2f} %) | "
            f"{100 * chosen['test']:.2f} % [{100 * low:.1f}, {100 * high:.1f}] | "
            f"≥ {100 * target:g} % | {verdict} |"
        )

    gain, need_gain = q["smallest_gain"], targets["smallest_gain"]
    pre, base = q["smallest_ssl"], q["smallest_baseline"]
    gain_label = f"{_budget_words(budgets[0])}: best self-supervised − best baseline"
    gain_row = f"| {gain_label} | – | – | ≥ {100 * need_gain:g} points | not measured |"
    if gain is not None:
        gain_row = (
            f"| {gain_label} | {pre['cell']} vs {base['cell']} | {100 * pre['test']:.2f} % − "
            f"{100 * base['test']:.2f} % = {100 * gain:+.2f} points | ≥ {100 * need_gain:g} "
            f"points | {'met' if gain >= need_gain else 'not met'} |"
        )
    gains = q["gains"]
    need = targets["gain_step"]
    short = [m for m, g in gains.items() if m != "scratch-linear" and _short_of(g, need)]
    gains_row = (
        f"| every init × mode but scratch-linear: +{100 * need:g} points from "
        f"{_budget_words(budgets[0])} to the next budget, and more at every larger one | "
        f"{len(gains) - len(short)} of {len(gains)} cells | short: {', '.join(short) or 'none'} "
        f"| all | {'met' if gains and not short else 'not met'} |"
    )
    knn = q["knn"]
    margin, need_knn = knn["margin_over_pixels"], targets["knn"]
    knn_row = (
        f"| kNN: best self-supervised − raw pixels (validation) | – | – | ≥ {100 * need_knn:g} "
        "points | – |"
    )
    if margin is not None:
        per = knn["per_method"]
        knn_row = (
            f"| kNN: best self-supervised − raw pixels (validation monitor) | "
            f"{knn['best_ssl']} {100 * per[knn['best_ssl']]:.2f} % vs pixels "
            f"{100 * per['pixels']:.2f} % | {100 * margin:+.2f} points | ≥ "
            f"{100 * need_knn:g} points | {'met' if margin >= need_knn else 'not met'} |"
        )
    steps = [f"{a}->{b}" for a, b in pairwise(budgets)]
    step_header = " | ".join(
        f"{paths.budget_label(a)} → {paths.budget_label(b)}" for a, b in pairwise(budgets)
    )
    gain_lines = [
        f"| {m} | " + " | ".join(f"{100 * g[step]:+.2f}" for step in steps) + " |"
        for m, g in gains.items()
    ]
    answer_lines = [
        f"| {_budget_words(a['budget'])} | {a['ssl_cell']} {100 * a['ssl_accuracy']:.2f} % | "
        f"{a['baseline_cell']} {100 * a['baseline_accuracy']:.2f} % | "
        f"{_points(a['difference'], a['ci_low'], a['ci_high'])} |"
        for a in sorted(q["answer"].values(), key=lambda a: paths.budget_size(a["budget"]))
    ]
    second = _budget_words(budgets[-2]) if len(budgets) > 1 else "second-largest budget"
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
        *rerun_rows,
        "",
        "Quality on the test split (mean over seeds), every choice made on validation:",
        "",
        "| target | chosen on validation | test accuracy [95 % CI] | target | |",
        "|---|---|---|---|---|",
        row(f"{_budget_words(budgets[-1])}, best cell", q["largest"], targets["largest"]),
        row(
            f"{second}, best self-supervised or semi cell",
            q["second_ssl"],
            targets["second_ssl"],
        ),
        gain_row,
        gains_row,
        knn_row,
        "",
        "The study's answer (metrics/summary.json), per label budget: the best self-supervised "
        "or semi cell against the best baseline cell, both chosen on validation; the difference "
        "in test accuracy with its paired 95 % bootstrap interval over the test images:",
        "",
        "| labels | self-supervised or semi (test) | baseline (test) | difference [95 % CI] |",
        "|---|---|---|---|",
        *answer_lines,
        "",
        "Gains in test accuracy (points) with more labels, per init × mode:",
        "",
        f"| init-mode | {step_header} |",
        "|---|" + "---:|" * len(steps),
        *gain_lines,
        "",
        "Every cell (test accuracy %, mean ± std over seeds [95 % bootstrap interval]):",
        "",
        *result.get("summary_markdown", "").strip().splitlines(),
        "",
    ]


def _budget_words(budget: str) -> str:
    """A label budget inside a table cell: '1 % labels', '4 labels per class', 'all labels'."""
    label = paths.budget_label(budget)
    if label == "all":
        return "all labels"
    if paths.is_per_class(budget):
        return label.replace(" per", " labels per")
    return f"{label} labels"


def _short_of(steps: dict[str, float], need: float) -> bool:
    """Whether one init × mode misses the gain target: its first step up the grid gains less
    than ``need``, or a later step gains nothing (the steps in grid order, as pipeline.json
    keeps them)."""
    gained = list(steps.values())
    return bool(gained) and (gained[0] < need or any(g <= 0 for g in gained[1:]))


def _points(difference: float, low: float, high: float) -> str:
    """A difference of accuracies and its interval in points: '+1.24 points [+0.50, +2.00]'."""
    return f"{100 * difference:+.2f} points [{100 * low:+.2f}, {100 * high:+.2f}]"


def _cpu(result: dict) -> list[str]:
    """Training speed settings on this CPU, as ratios to float32/contiguous/eager at batch 128."""
    m = result["machine"]
    rows = []
    for r in result["finetune_step"]:
        layout = "channels-last" if r["channels_last"] else "contiguous"
        how = f"{'bf16 autocast' if r['bf16'] else 'float32'}, {layout}"
        if r["compiled"]:
            how += f", torch.compile (first steps {r['first_steps_s']:.0f} s)"
        rows.append(f"| {r['batch']} | {how} | {r['images_per_s']:,.0f} | {r['ratio']:.2f}× |")
    threads = result["threads"]
    simclr = result["simclr"]
    accuracy = result["accuracy"]
    return [
        "## CPU speed: precision, layout, compilation, threads, batch size (`benchmarks/cpu.py`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']}",
        "",
        f"Command: `{m['command']}`. One fine-tuning step of the default model (forward, "
        "cross-entropy, backward, AdamW) on random 28×28×1 batches; every row is the best of "
        "interleaved rounds in one process, the ratio against float32, contiguous, eager, 2 "
        "threads, batch 128.",
        "",
        "| batch | setting | images/s | ratio |",
        "|---:|---|---:|---:|",
        *rows,
        "",
        f"- **Threads:** one process with 2 threads: {threads['one_process_2_threads']:,.0f} "
        f"images/s; two 1-thread processes side by side: "
        f"{threads['two_processes_1_thread']:,.0f} images/s in all "
        f"({threads['two_processes_1_thread'] / threads['one_process_2_threads']:.2f}×).",
        f"- **SimCLR step** (the pipeline's module, two views): {simclr['float32']:,.0f} images/s "
        f"in float32, {simclr['bf16']:,.0f} under bf16 autocast "
        f"({simclr['bf16'] / simclr['float32']:.2f}×).",
        f"- **Equal accuracy:** the same seeded {result['accuracy_steps']}-step fine-tuning run "
        f"scored {100 * accuracy['float32_contiguous']:.2f} % in float32/contiguous and "
        f"{100 * accuracy['bf16_channels_last']:.2f} % in bf16/channels-last on 6,000 held-out "
        "training images.",
        "",
    ]


def _peer(result: dict) -> list[str]:
    """SimCLR through lightly beside ours, per second of training."""
    m = result["machine"]
    ours, peer = result["ours"], result["lightly"]
    rows = [
        f"| {name} | {p['seconds']:.0f} | {p['images']:,} | {100 * p['knn']:.2f} % |"
        for name, side in (("ours", ours), ("lightly", peer))
        for p in side["curve"]
    ]
    reached = result["ours_seconds_to_lightly_final"]
    ratio = result["time_ratio"]
    verdict = (
        "not reached"
        if reached is None
        else f"{reached:.0f} s, {ratio:.2f}× lightly's time (goal ≤ 0.5×: "
        f"{'met' if ratio <= 0.5 else 'not met'})"
    )
    return [
        "## SimCLR through lightly, side by side (`benchmarks/peer.py`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']}",
        "",
        f"Command: `{m['command']}`. The same backbone and projection head, batch "
        f"{result['batch_size']}, optimizer, training images and precision "
        f"({result['precision']}); lightly's `NTXentLoss` and `SimCLRTransform` (set to our policy "
        f"where its options reach) in a DataLoader with 2 workers, against our on-device path. "
        f"{result['seconds']:.0f} s of training each; kNN on the validation images (10,000-image "
        "bank, best k and temperature) every "
        f"{result['every']:.0f} s, with the clock stopped.",
        "",
        f"**Images/s: ours {ours['images_per_s']:,.0f}, lightly {peer['images_per_s']:,.0f} "
        f"({ours['images_per_s'] / peer['images_per_s']:.1f}×).** lightly's kNN after "
        f"{peer['curve'][-1]['seconds']:.0f} s: {100 * result['lightly_final_knn']:.2f} %; ours "
        f"reached it after {verdict}.",
        "",
        "| engine | seconds of training | images seen | validation kNN |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]


def _methods(result: dict) -> list[str]:
    """Every pretraining method through the real stage at equal epochs."""
    m = result["machine"]
    rows = []
    for r in sorted(result["rows"], key=lambda r: -r["val_knn_acc"]):
        probe = r.get("val_probe_acc")
        rows.append(
            f"| {r['method']} | {100 * r['val_knn_acc']:.2f} % | "
            f"{'' if probe is None else f'{100 * probe:.2f} %'} | {r['seconds']:.0f} |"
        )
    return [
        "## Every pretraining method at equal epochs (`benchmarks/methods.py`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']}",
        "",
        f"Command: `{m['command']}`. The pretrain stage itself on the default data and "
        f"params.yaml, {result['epochs']} epochs each, one method after another in one process; "
        "the final validation monitors (kNN: best k and temperature, 10,000-image bank; the online "
        "linear probe) and the stage's wall-clock seconds. For reference, the frozen baselines' "
        "kNN is in the pipeline section (pixels 84.53 %).",
        "",
        "| method | val kNN | val probe | seconds |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]


def _momentum(result: dict) -> list[str]:
    """BYOL against SimCLR at equal epochs and at equal CPU time (benchmarks/methods.py)."""
    m = result["machine"]
    rows = [
        f"| {r['method']} | {r['budget']} | {r['epochs']} | {100 * r['val_knn_acc']:.2f} % | "
        f"{100 * r['val_probe_acc']:.2f} % | {r['cpu_seconds']:,.0f} | {r['seconds']:,.0f} |"
        for r in result["rows"]
    ]
    return [
        "## A momentum teacher on the CPU: BYOL against SimCLR (`benchmarks/methods.py`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']}",
        "",
        f"Command: `{m['command']}`. The real pretrain stage on the default data and params.yaml "
        "(LeNet-5, batch 256, AdamW, the `ssl` views), each method's own section; the final "
        "validation monitors. BYOL goes into the CPU default only if it beats SimCLR's "
        "validation kNN within the same time.",
        *([result["note"]] if result.get("note") else []),
        "",
        "| method | budget | epochs | val kNN | val probe | CPU s | wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *([result["verdict"], ""] if result.get("verdict") else []),
    ]


def _scarce_tables(result: dict) -> list[str]:
    """Every cell (test accuracy [interval], seconds) and, per budget, the best of each kind."""
    from benchmarks.scarce import KINDS

    found = result["cells"]
    budgets = sorted({c["budget"] for c in found}, key=paths.budget_size)
    models = sorted({(c["init"], c["mode"]) for c in found})
    by_cell = {(c["init"], c["mode"], c["budget"]): c for c in found}

    def shown(cell: dict | None) -> str:
        if cell is None:
            return "—"
        low, high = cell["ci"]
        seconds = "" if cell["seconds"] is None else f" · {cell['seconds']:,.0f} s"
        return f"{100 * cell['test']:.2f} [{100 * low:.1f}, {100 * high:.1f}]{seconds}"

    header = " | ".join(_budget_words(b) for b in budgets)
    lines = [
        "Every cell: test accuracy % (mean over seeds) [mean of the seeds' 95 % bootstrap "
        "bounds] · the job's process seconds (all its seeds, imports included); — = not run.",
        "",
        f"| init | mode | {header} |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for init, mode in models:
        row = " | ".join(shown(by_cell.get((init, mode, b))) for b in budgets)
        lines.append(f"| {init} | {mode} | {row} |")
    best = result["best_by_kind"]
    lines += [
        "",
        "The best cell of each kind, chosen on validation (test accuracy % [interval], cell):",
        "",
        "| labels | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    for budget in budgets:
        chosen = best.get(budget, {})
        row = " | ".join(
            f"{shown({**chosen[k], 'seconds': None})} {chosen[k]['init']}-{chosen[k]['mode']}"
            if k in chosen
            else "—"
            for k in KINDS
        )
        lines.append(f"| {_budget_words(budget)} | {row} |")
    answer = result.get("answer") or {}
    if answer:
        lines += [
            "",
            "The product's answer (metrics/summary.json): best self- or semi-supervised cell "
            "minus best baseline, paired 95 % interval over the same test images:",
            "",
        ]
        for budget in sorted(answer, key=lambda b: paths.budget_size(answer[b]["budget"])):
            entry = answer[budget]
            lines.append(
                f"- {_budget_words(entry['budget'])}: {entry['ssl_cell']} vs "
                f"{entry['baseline_cell']}: "
                f"{_points(entry['difference'], entry['ci_low'], entry['ci_high'])}"
            )
    return lines + [""]


def _scarce(result: dict) -> list[str]:
    m = result["machine"]
    return [
        "## Scarce labels: every init × mode, semi included (`benchmarks/scarce.py study`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · "
        f"torch {m['torch']}",
        "",
        f"Command: `{m['command']}`, on the project `benchmarks.pipeline --keep` left (the "
        "default study), with the semi cells added; Snakemake ran only those, the evaluation and "
        f"the report ({result['rerun_seconds']:,.0f} s).",
        *([result["note"]] if result.get("note") else []),
        "",
        *_scarce_tables(result),
    ]


def _own_images(result: dict) -> list[str]:
    m = result["machine"]
    pool = result.get("pool") or {}
    overlay = json.dumps(result["overlay"])
    return [
        "## Your own images: Fashion-MNIST as a user's folders (`benchmarks/scarce.py own-images`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · "
        f"torch {m['torch']}",
        "",
        f"Command: `{m['command']}`: Fashion-MNIST's training split written as `labeled/<class>/` "
        "PNGs (100 a class) and `unlabeled/` (every other training image), README's overlay "
        f"with those paths, a fresh clone, `snakemake --cores 2`: {overlay}. Whole pipeline: "
        f"{result['total_seconds']:,.0f} s ({result['total_seconds'] / 60:.1f} min). Pool after "
        f"the split: {json.dumps(pool)}.",
        *([result["note"]] if result.get("note") else []),
        "",
        *_scarce_tables(result),
    ]


def _gpu(result: dict) -> list[str]:
    """The GPU check (benchmarks/gpu.py): the GPU tests, every method's speed against its
    ceiling, one fine-tuning pass per label budget, the GPU profile's cost and the mini-study.
    A part that failed shows its error instead of its table."""
    m = result["machine"]
    data, plan = result.get("data", {}), result.get("plan", {})
    lines = [
        "## GPU check (`benchmarks/gpu.py`, `make gpu-check`)",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · "
        f"torch {m['torch']}",
        "",
        f"Command: `{m['command']}`: {result.get('seconds', 0):.0f} s in all (limit "
        f"{result.get('limit_s', 0):.0f} s) on {result.get('device', '?')} "
        f"({result.get('precision', '?')}). Data: {data.get('source', '?')}, "
        f"{data.get('train', 0):,} training and {data.get('val', 0):,} validation images. "
        f"Plan: {plan.get('source', '?')}.",
        "",
    ]
    if result.get("smoke"):
        lines += [
            "**Smoke run** (tiny model and data on the CPU): it checks the code, not a GPU.",
            "",
        ]
    if not result.get("complete"):
        lines += ["**Incomplete run**: the check stopped before its last part.", ""]
    errors = result.get("errors", {})
    lines += [f"- **{part} failed**: `{error}`" for part, error in errors.items()]
    lines += [""] if errors else []
    return [
        *lines,
        *_gpu_tests(result.get("tests")),
        *_gpu_throughput(result.get("throughput")),
        *_gpu_finetune(result.get("finetune")),
        *_gpu_extrapolation(result.get("extrapolation")),
        *_gpu_mini_study(result.get("mini_study")),
    ]


def _gpu_tests(tests: dict | None) -> list[str]:
    if not tests:
        return []
    if "error" in tests:
        return [f"GPU tests (`{tests['command']}`): not run: {tests['error']}.", ""]
    failing = ", ".join(f"`{name}`" for name in tests["failing"]) or "none"
    return [
        f"GPU tests (`{tests['command']}`, {tests['seconds']:.0f} s): **{tests['passed']} "
        f"passed, {tests['failed']} failed, {tests['errors']} errors**, {tests['skipped']} "
        f"skipped. Failing: {failing}.",
        "",
    ]


def _gpu_throughput(speed: dict | None) -> list[str]:
    if not speed:
        return []
    goal = speed["goal_ratio"]

    def util(value: float | None) -> str:
        return "–" if value is None else f"{value:.0f} %"

    rows = [
        f"| {name} | {r['ours_img_s']:,.0f} | {r['ceiling_img_s']:,.0f} | "
        f"{r['ratio_to_ceiling']:.2f}× ({'met' if r['goal_met'] else 'not met'}) | "
        f"{r['lightning_img_s']:,.0f} | {r['lightning_val_s']:.1f} | "
        f"{util(r['gpu_util_ours_pct'])} | {_gib(r.get('lightning_peak_mib'))} |"
        for name, r in speed["methods"].items()
    ]
    through_trainer = [n for n, r in speed["methods"].items() if "Lightning" in r["ours_how"]]
    trainer_note = (
        f" {', '.join(through_trainer)}: ours and the ceiling through a Trainer (the method "
        "steps its own optimizers)."
        if through_trainer
        else ""
    )
    sample = speed["per_sample"]
    if "skipped" in sample:
        per_sample = f"Per-sample torchvision DataLoader: not measured ({sample['skipped']})."
    else:
        simclr = speed["methods"][sample["method"]]["ours_img_s"]
        per_sample = (
            f"SimCLR through a per-sample torchvision v2 DataLoader ({sample['workers']} "
            f"workers, two views in `__getitem__`): {sample['img_s']:,.0f} images/s (GPU "
            f"{util(sample['gpu_util_pct'])}); ours is {simclr / sample['img_s']:.1f}× that. "
            "Measured for SimCLR only: the other methods have no per-sample baseline to copy."
        )
    return [
        f"Pretraining speed, {speed['backbone']} w{speed['width']}, batch {speed['batch_size']}, "
        f"{speed['precision']}: images/s (source images), best of {speed['rounds']} rounds of "
        f"{speed['steps']} steps after {speed['warmup_steps']} warm-up steps. Ours: uint8 data "
        "on the device, `PretrainModule.objective`, backward, step; ceiling: "
        f"{speed['ceiling_how']} (goal: ours ≥ {goal:g}× ceiling); Lightning: "
        f"{speed['lightning_how']}.{trainer_note}",
        "",
        "| method | ours | ceiling | ours / ceiling | Lightning | validation (s) | GPU util | "
        "memory (GiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
        per_sample,
        "",
    ]


def _gpu_finetune(passes: dict | None) -> list[str]:
    if not passes:
        return []
    rows = []
    for fraction, entry in passes["fractions"].items():
        for mode, r in entry["modes"].items():
            if mode == "knn":
                rows.append(
                    f"| {_budget_words(fraction)} | knn | – | – | – | – | "
                    f"{r['features_s'] + r['knn_s']:.2f} (features and fit) | – |"
                )
                continue
            rows.append(
                f"| {_budget_words(fraction)} | {mode} | {r['batch_size']} | "
                f"{r['steps_per_epoch']} | {r['max_epochs']} | {1000 * r['step_s']:.1f} | "
                f"{r['pass_s']:.2f} | {_gib(r.get('peak_mib'))} |"
            )
    return [
        f"One fine-tuning pass per label budget and mode (the stage's FinetuneModule in a "
        f"Trainer, {passes['timed_steps']} timed steps, then one whole validation): a pass is "
        "its steps and that validation; a cell trains at most its cap of passes per seed.",
        "",
        "| labels | mode | batch | steps per pass | cap (passes) | ms per step | pass (s) | "
        "memory (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def _gib(mib: float | None) -> str:
    """Peak GPU memory in GiB; a dash where none was measured (the CPU)."""
    return "–" if mib is None else f"{mib / 1024:.1f}"


def _gpu_extrapolation(cost: dict | None) -> list[str]:
    if not cost:
        return []
    parts = cost["parts_s"]
    modes = ", ".join(f"{mode} {s / 3600:.1f} h" for mode, s in cost["finetune_by_mode_s"].items())
    methods = ", ".join(f"{m} {s / 60:.0f} min" for m, s in cost["pretrain_s"].items())
    return [
        f"**The GPU profile on this GPU, one job after another: {cost['total_h']:.1f} h** "
        f"({cost['job_count']} jobs: {cost['cells']} cells × {cost['seeds']} seeds, "
        f"{cost['epochs']} pretraining epochs of {cost['epoch_images']:,} images).",
        "",
        "| part | hours |",
        "|---|---:|",
        f"| pretraining ({methods}) | {parts['pretrain'] / 3600:.2f} |",
        f"| fine-tuning ({modes}) | {parts['finetune'] / 3600:.2f} |",
        f"| fixed cost, {cost['fixed_cost_s']:.1f} s per job | {parts['fixed'] / 3600:.2f} |",
        "",
        f"How: {cost['how']}",
        "",
    ]


def _gpu_mini_study(study: dict | None) -> list[str]:
    if not study:
        return []
    knn, cells = study["knn"], study["finetune"]
    stopped = " (stopped by its time box)" if study["stopped_by_deadline"] else ""
    words = _budget_words(study["fraction"])
    return [
        f"Mini-study ({study['budget_s']:.0f} s box, {study['seconds']:.0f} s): SimCLR "
        f"pretrained {study['epochs_run']} of {study['epochs_planned']} planned epochs"
        f"{stopped} in {study['pretrain_s']:.0f} s.",
        "",
        f"- Validation kNN: SimCLR features {100 * knn['simclr']['val_acc']:.2f} % vs raw "
        f"pixels {100 * knn['pixels']['val_acc']:.2f} % ({100 * study['knn_margin']:+.2f} "
        "points).",
        f"- Fine-tuning at {words} (one seed, validation accuracy of the best epoch): from "
        f"SimCLR {100 * cells['simclr']['val_acc']:.2f} % vs from scratch "
        f"{100 * cells['scratch']['val_acc']:.2f} % ({100 * study['finetune_margin']:+.2f} "
        "points).",
        "",
    ]


def _gpu_estimate(result: dict) -> list[str]:
    """The GPU profile's size from FLOP counts, until a GPU machine measures it."""
    m, cost = result["machine"], result["estimate"]
    band = ", ".join(
        f"{float(rate):.0f} TFLOP/s: {hours['at_once']:.2f} h ({hours['one_at_a_time']:.2f} h "
        "one at a time)"
        for rate, hours in result["band_h"].items()
    )
    lines = _gpu_extrapolation(cost)
    lines[0] = lines[0].replace("on this GPU", "on one H200, estimated")
    return [
        "## GPU profile size, estimated without a GPU (`benchmarks/gpu_estimate.py`)",
        "",
        f"{m['date']} · counted on {m['cpu']} · torch {m['torch']}",
        "",
        f"Command: `{m['command']}`. No GPU machine was lent, so params.gpu.yaml is sized from "
        "the FLOPs of every part, counted exactly on the real modules (every method's objective "
        "and backward, the encoder's forward for monitors, features and validation, each "
        "cell's step budget from the pipeline's own rule on the real split), divided by an "
        f"assumed sustained {result['tflops']:.0f} TFLOP/s ("
        f"{100 * result['tflops'] / result['peak_tflops']:.0f} % of the H200's dense bf16 "
        f"{result['peak_tflops']:.0f}), plus {result['step_overhead_ms']:.0f} ms per optimizer "
        "step and the per-job start-up measured here in a fresh process "
        f"({cost['fixed_cost']['import_s']:.1f} s of imports on this CPU). Snakemake runs "
        f"{cost['at_once']} jobs at once on a 16-core GPU machine (4 CPUs each), all on the "
        "one GPU: their start-ups overlap, their GPU work does not, so the estimate is "
        f"max(GPU work, everything / {cost['at_once']}): "
        f"**{cost['at_once_s'] / 60:.0f} min**. At half, the same and twice the rate: {band}. "
        "`make gpu-check` on a lent GPU replaces the assumed rate with measured ones.",
        "",
        *lines,
    ]


SECTIONS = {
    "augment": _augment,
    "pretrain": _pretrain,
    "methods": _methods,
    "momentum": _momentum,
    "cpu": _cpu,
    "peer": _peer,
    "pipeline": _pipeline,
    "scarce": _scarce,
    "own_images": _own_images,
    "gpu": _gpu,
    "gpu_estimate": _gpu_estimate,
}


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
