"""profile: merge a profile (an overlay of params keys, such as params.gpu.yaml) into params.yaml.

``python -m pipeline profile params.gpu.yaml`` is not a stage. A profile holds only the keys that
differ from params.yaml; applying it writes them into params.yaml, so that Snakemake, ``dvc repro``
and ``dvc exp run -S key=value`` all read one file and no runner needs to know about profiles.
Mappings merge key by key; lists and values replace. The comments of params.yaml are kept
(ruamel.yaml's round trip), and the result is validated before anything is written.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, check, read_params
from pipeline.io import write_text

if TYPE_CHECKING:  # ruamel.yaml is imported only when a profile is applied
    from ruamel.yaml import YAML


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``profile``; ``--params`` (the file to write) is added by the CLI."""
    parser.add_argument("overlay", type=Path, help="the profile to apply, e.g. params.gpu.yaml")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the keys that would change and write nothing"
    )


def main(args: argparse.Namespace) -> int:
    """Apply ``args.overlay`` to ``args.params`` and list what changed."""
    target = Path(args.params)
    text, changes = apply(target, args.overlay)
    for key, old, new in changes:
        print(f"{key}: {old!r} -> {new!r}")
    if not changes:
        print(f"{target} already has every value of {args.overlay}")
    elif not args.dry_run:
        write_text(target, text)
        print(f"{target}: {len(changes)} value(s) from {args.overlay}")
    return 0


def apply(target: Path, overlay_path: Path) -> tuple[str, list[tuple[str, object, object]]]:
    """The text of ``target`` with ``overlay_path`` merged in, and the (key, old, new) changes.

    Raises ConfigError, naming the key, when the overlay has a key params.yaml lacks (a typo
    would otherwise be ignored) or when the merged params are invalid.
    """
    _, overlay = read_params(overlay_path)
    if not isinstance(overlay, dict):
        raise ConfigError(
            f"{overlay_path}: a profile is a mapping of params.yaml keys; "
            f"this file holds {type(overlay).__name__}"
        )
    base_text, _ = read_params(target)  # a broken params.yaml is reported as usual
    yaml = _round_trip()
    document = yaml.load(base_text)
    changes = list(_merge(document, overlay, overlay_path, target, ()))
    out = io.StringIO()
    yaml.dump(document, out)
    check(_plain(document), source=f"{target} with {overlay_path}")
    return out.getvalue(), changes


def _merge(
    base: MutableMapping[str, Any],  # Any: ruamel's round-trip values, read and replaced
    overlay: dict,
    source: Path,
    target: Path,
    prefix: tuple[str, ...],
) -> Iterator[tuple[str, object, object]]:
    """Write ``overlay`` into ``base`` in place, yielding each changed leaf."""
    for key, value in overlay.items():
        where = ".".join((*prefix, str(key)))
        if key not in base:
            raise ConfigError(
                f"{source}: {where} is not a key of {target}; a profile may only "
                "change existing keys (check its spelling)"
            )
        old = base[key]
        if isinstance(value, dict) != isinstance(old, dict):
            kind = "a mapping" if isinstance(old, dict) else "a single value or list"
            raise ConfigError(f"{source}: {where} must be {kind}, as in {target}")
        if isinstance(value, dict):
            yield from _merge(old, value, source, target, (*prefix, str(key)))
        elif (before := _plain(old)) != value:
            _replace(base, key, value)
            yield where, before, value


def _replace(mapping: MutableMapping[str, Any], key: str, value: object) -> None:
    """Set a value; a list is refilled in place so the comment below it stays below it."""
    old = mapping[key]
    if isinstance(value, list) and isinstance(old, list) and old:
        trailing = old.ca.items.pop(len(old) - 1, None)
        old[:] = value
        if trailing is not None and value:
            old.ca.items[len(value) - 1] = trailing
        return
    mapping[key] = value


def _plain(value: object) -> object:
    """ruamel's commented containers as plain lists and dicts, for comparing and printing."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _round_trip() -> YAML:
    """A ruamel.yaml round trip set to params.yaml's layout, so an unchanged file is unchanged."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml
