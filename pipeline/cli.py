"""Command line: ``python -m pipeline <stage> [--dataset NAME] [--params FILE] [--log FILE]``.

Both runners call exactly these commands. Heavy libraries (torch, lightning, mlflow) are imported
inside the stage that needs them, so ``--help`` and params errors answer at once. Errors meant for
the user (pipeline.errors.PipelineError, including params problems) print one line and exit 1
(2 for params.yaml). So does a write the disk refuses (full, over quota, over the file-size limit,
read-only): that is the machine's state, not a bug, and the user needs the path and what to do,
not a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from pipeline.config import PARAMS_FILE, ConfigError, load
from pipeline.errors import PipelineError
from pipeline.io import is_disk_error

log = logging.getLogger("pipeline")


def stage_names() -> list[str]:
    """Stage modules under pipeline/stages, in pipeline order (see PIPELINE_ORDER)."""
    import pkgutil

    import pipeline.stages

    found = {m.name for m in pkgutil.iter_modules(pipeline.stages.__path__)}
    return [s for s in PIPELINE_ORDER if s in found] + sorted(found - set(PIPELINE_ORDER))


#: The order stages are listed in ``--help``; execution order is the runners' business.
PIPELINE_ORDER = ("download", "split", "augment", "pretrain", "finetune", "evaluate", "visualize")

#: Commands that are not stages: modules pipeline.<name> with add_arguments(parser) and main(args).
TOOLS = ("predict", "compare", "profile", "cluster", "execution")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` stage module is imported (for its own options).

    Importing just that one keeps each stage's code dependencies exactly its own modules.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Run one stage of the self-supervised label-efficiency pipeline.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in stage_names():
        doc = _first_line(f"pipeline.stages.{name}") or name
        stage = commands.add_parser(name, help=doc, description=doc)
        stage.add_argument("--dataset", help="dataset to work on (default: data.dataset)")
        if name == selected:
            module = importlib.import_module(f"pipeline.stages.{name}")  # no torch at import
            if hasattr(module, "add_arguments"):
                module.add_arguments(stage)
        _common(stage)
    for name in TOOLS:
        doc = _first_line(f"pipeline.{name}") or name
        tool = commands.add_parser(name, help=doc, description=doc)
        if name == selected:  # imported only when run, so stages never load it
            importlib.import_module(f"pipeline.{name}").add_arguments(tool)
        _common(tool)
    check = commands.add_parser("check-params", help="validate params.yaml and exit")
    _common(check)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--log", type=Path, help="also append the log to this file")


def _first_line(module: str) -> str:
    """The first line of a stage module's docstring, read without importing the module."""
    spec = importlib.util.find_spec(module)
    text = Path(spec.origin).read_text() if spec and spec.origin else ""
    start = text.find('"""')
    return text[start + 3 :].split("\n", 1)[0].strip() if start >= 0 else ""


class _ConsoleFormatter(logging.Formatter):
    """Progress lines with a timestamp; errors as one plain ``error: ...`` line."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.ERROR and record.exc_info is None:
            return f"error: {record.getMessage()}"
        return super().format(record)


def _setup_logging(log_file: Path | None) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_ConsoleFormatter(fmt))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
        handlers[-1].setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    _setup_logging(args.log)
    try:
        if args.command in TOOLS:
            return importlib.import_module(f"pipeline.{args.command}").main(args)
        config = load(args.params)
        if args.command == "check-params":
            print(f"{args.params}: ok")
            return 0
        stage = importlib.import_module(f"pipeline.stages.{args.command}")
        extra = {
            k: v for k, v in vars(args).items() if k not in ("command", "dataset", "params", "log")
        }
        stage.run(config, dataset=args.dataset, **extra)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    except PipelineError as err:
        log.error("%s failed: %s", _what(args.command), err)
        return 1
    except OSError as err:
        if not is_disk_error(err):
            raise
        log.error("%s failed: %s", _what(args.command), disk_error_message(err))
        return 1
    except KeyboardInterrupt:
        log.error("%s stage interrupted; its outputs were left as they were", args.command)
        return 130
    return 0


def _what(command: str) -> str:
    return command if command in TOOLS else f"{command} stage"


_DISK_PROBLEMS = {
    errno.ENOSPC: ("no space left on device", "free space on that disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or raise the quota"),
    errno.EFBIG: (
        "file too large for the file-size limit (ulimit -f) or the file system",
        "raise the limit (ulimit -f unlimited) or use a file system that takes larger files",
    ),
    errno.EROFS: ("read-only file system", "make that file system writable"),
}


def disk_error_message(err: OSError) -> str:
    """One line for a write the disk refused: what, where, and what to do about it.

    The written path is ``filename2`` where an OSError has two (rename, copy: source, target).
    """
    problem, remedy = _DISK_PROBLEMS[err.errno]
    target = err.filename2 if err.filename2 is not None else err.filename
    where = f" while writing {os.fsdecode(target)}" if target is not None else ""
    return (
        f"{problem}{where}; {remedy}, or point the output elsewhere (link its folder to a "
        "larger disk), then run the stage again. Outputs are replaced only once complete, so "
        "the previous ones were left as they were"
    )
