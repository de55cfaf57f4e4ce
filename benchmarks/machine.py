"""What machine a benchmark ran on, recorded beside every number."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
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
