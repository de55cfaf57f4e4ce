"""Every pretraining method at equal epochs: validation kNN and probe accuracy, and seconds.

    python -m benchmarks.methods [--epochs N] [--methods a,b,...] [--json OUT]
                                 [--params FILE] [--root DIR]

Why: the study compares encoders, and a new method (the GAN) is only worth a place in the
default run if its features are competitive at the same cost. This runs the real pretrain stage
(pipeline.stages.pretrain.run) on the default dataset and params.yaml, with only
``pretrain.epochs`` and ``pretrain.methods`` changed, one method after another in one process,
in a scratch folder that links the prepared data, split and policy of this checkout (run
``make run`` or the download, split and augment stages first). The numbers are the stage's own
final monitors (metrics/pretrain/<method>.json): kNN with the best k and temperature on
validation, and the online linear probe. Seconds are wall-clock for the whole stage (data
loading, training, monitors and pictures), on however many threads torch uses by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import describe, save_result

REPO = Path(__file__).resolve().parent.parent
TRAINED = ("simclr", "autoencoder", "rotation", "inpainting", "vae", "gan")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--methods", default=",".join(TRAINED))
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
    from pipeline.stages import pretrain

    rows = []
    with tempfile.TemporaryDirectory(prefix="methods-bench-") as work:
        for part in ("prepared", "splits", "augment"):
            (Path(work) / "data" / part).mkdir(parents=True)
            (Path(work) / "data" / part / dataset).symlink_to(root / "data" / part / dataset)
        before = os.getcwd()
        os.chdir(work)
        for method in methods:
            start = time.perf_counter()
            metrics = pretrain.run(config, method=method)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "method": method,
                    "epochs": args.epochs,
                    "seconds": round(seconds, 1),
                    "val_knn_acc": metrics["val_knn_acc"],
                    "val_probe_acc": metrics.get("val_probe_acc"),
                    "final": metrics,
                    "curve": Path(f"metrics/pretrain/{method}.csv").read_text(),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        os.chdir(before)
    print("| method | epochs | val kNN | val probe | seconds |\n|---|---|---|---|---|")
    for r in rows:
        probe = r["val_probe_acc"]
        print(
            f"| {r['method']} | {r['epochs']} | {100 * r['val_knn_acc']:.2f} % | "
            f"{'' if probe is None else f'{100 * probe:.2f} %'} | {r['seconds']:.0f} |"
        )
    save_result(
        out, {"machine": describe("benchmarks.methods"), "epochs": args.epochs, "rows": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
