"""What machine a benchmark ran on, recorded beside every number."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def describe(module: str) -> dict[str, Any]:
    """Date, CPU, core count, GPU (if any), library versions and the command that ran."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    cpu += f" ({_vector_units()})"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "command": " ".join(["python", "-m", module, *sys.argv[1:]]),
    }


def _vector_units() -> str:
    """What decides CPU training speed between machines of one kind: bf16 instructions (the
    pipeline trains in bf16 there, about 1.9x faster) or AVX2 only (float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "flags unknown"
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "avx512_bf16"
    return "AVX2, no avx512_bf16" if "avx2" in flags else "no AVX2"


def save_result(path: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's numbers as JSON (for benchmarks.report), when a path is given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
