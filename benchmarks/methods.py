"""Every pretraining method at equal epochs (and at equal time): validation kNN, probe, seconds.

    python -m benchmarks.methods [--epochs N] [--methods a,b,...] [--json OUT]
                                 [--params FILE] [--root DIR] [--equal-time METHOD]

Why: the study compares encoders, and a new method (the GAN) is only worth a place in the
default run if its features are competitive at the same cost. This runs the real pretrain stage
(pipeline.stages.pretrain.run) on the default dataset and params.yaml, with only
``pretrain.epochs`` and ``pretrain.methods`` changed, one method after another in one process,
in a scratch folder that links the prepared data, split and policy of this checkout (run
``make run`` or the download, split and augment stages first). The numbers are the stage's own
final monitors (metrics/pretrain/<method>.json): kNN with the best k and temperature on
validation, and the online linear probe. Seconds are wall-clock for the whole stage (data
loading, training, monitors and pictures), on however many threads torch uses by default; CPU
seconds are the process's (all threads), which other processes on the machine barely change.

``--equal-time METHOD`` adds a second row for every other method: trained for the epochs that
take it as many CPU seconds as METHOD took at ``--epochs`` (a slower method gets fewer epochs,
with its schedule over those epochs). BYOL against SimCLR is the case it was written for: BYOL
runs its encoder a third time per step (the teacher), so equal epochs favour it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import describe, save_result
from pipeline.methods import TRAINED

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--methods", default=",".join(TRAINED))
    parser.add_argument(
        "--equal-time",
        default=None,
        metavar="METHOD",
        help="also train every other method for the CPU seconds METHOD took (one of --methods)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO,
        help="the checkout whose data/ (prepared, splits, augment) is used",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    methods = args.methods.split(",")
    if args.equal_time and args.equal_time not in methods:
        parser.error(f"--equal-time {args.equal_time}: it must be one of --methods")
    out = args.json.resolve() if args.json else None  # before the chdir below

    from pipeline.config import from_dict, load

    base = load(args.params)
    raw = json.loads(json.dumps(base.raw))
    raw["pretrain"].update(
        methods=sorted(set(raw["pretrain"]["methods"]) | set(methods)), epochs=args.epochs
    )
    config = from_dict(raw)
    dataset = config.data.dataset
    missing = [
        p
        for p in (f"data/prepared/{dataset}", f"data/splits/{dataset}", f"data/augment/{dataset}")
        if not (root / p).exists()
    ]
    if missing:
        print(
            f"error: {', '.join(missing)} missing; run `make run` (or the download, split and "
            "augment stages) first",
            file=sys.stderr,
        )
        return 1
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="methods-bench-") as work:
        for part in ("prepared", "splits", "augment"):
            (Path(work) / "data" / part).mkdir(parents=True)
            (Path(work) / "data" / part / dataset).symlink_to(root / "data" / part / dataset)
        before = os.getcwd()
        os.chdir(work)
        for method in methods:
            rows.append(_train(config, method, args.epochs, "equal epochs"))
        if args.equal_time:
            reference = next(r for r in rows if r["method"] == args.equal_time)
            for row in list(rows):
                if row["method"] == args.equal_time:
                    continue
                epochs = max(1, round(args.epochs * reference["cpu_seconds"] / row["cpu_seconds"]))
                rows.append(_train(config, row["method"], epochs, f"{args.equal_time}'s time"))
        os.chdir(before)
    print("| method | budget | epochs | val kNN | val probe | seconds | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        probe = r["val_probe_acc"]
        print(
            f"| {r['method']} | {r['budget']} | {r['epochs']} | {100 * r['val_knn_acc']:.2f} % | "
            f"{'' if probe is None else f'{100 * probe:.2f} %'} | {r['seconds']:.0f} | "
            f"{r['cpu_seconds']:.0f} |"
        )
    save_result(
        out, {"machine": describe("benchmarks.methods"), "epochs": args.epochs, "rows": rows}
    )
    return 0


def _train(config: Any, method: str, epochs: int, budget: str) -> dict[str, Any]:
    """Run the real pretrain stage for ``epochs``; its final monitors, seconds and curve."""
    from pipeline.config import from_dict
    from pipeline.stages import pretrain

    raw = json.loads(json.dumps(config.raw))
    raw["pretrain"]["epochs"] = epochs
    start, cpu = time.perf_counter(), time.process_time()
    metrics = pretrain.run(from_dict(raw), method=method)
    row = {
        "method": method,
        "budget": budget,
        "epochs": epochs,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "val_knn_acc": metrics["val_knn_acc"],
        "val_probe_acc": metrics.get("val_probe_acc"),
        "final": metrics,
        "curve": Path(f"metrics/pretrain/{method}.csv").read_text(),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
