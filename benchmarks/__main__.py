"""One entry point: measure everything and write BENCHMARKS.md (``make benchmarks``).

python -m benchmarks [--only augment,pretrain,methods,cpu,peer,pipeline]

Each benchmark's numbers go to benchmarks/results/<name>.json, then benchmarks.report turns
every result there into BENCHMARKS.md. Run it on a quiet machine: the numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import report

BENCHMARKS = ("augment", "pretrain", "methods", "cpu", "peer", "pipeline")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {BENCHMARKS}")
    for name in chosen:
        print(f"== benchmarks.{name}", file=sys.stderr, flush=True)
        module = __import__(f"benchmarks.{name}", fromlist=["main"])
        module.main(["--json", str(report.RESULTS / f"{name}.json")])
    report.main()


if __name__ == "__main__":
    main()
