"""profile: merge a profile (an overlay of params keys, such as params.gpu.yaml) into params.yaml.

``python -m pipeline profile params.gpu.yaml`` is not a stage. A profile holds only the keys that
differ from params.yaml; applying it writes them into params.yaml, so that Snakemake, ``dvc repro``
and ``dvc exp run -S key=value`` all read one file and no runner needs to know about profiles.
Mappings merge key by key; lists and values replace. A key that params.yaml leaves out (to keep
its schema default, such as data.unlabeled_path) may be set too: it is added where the schema
declares it. split.label_fractions and split.labels_per_class are exclusive, so a profile that
sets one nulls the other. The comments of params.yaml are kept (ruamel.yaml's round trip), and
the result is validated before anything is written.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, check, read_params
from pipeline.io import write_text
from pipeline.params_yaml import schema

if TYPE_CHECKING:  # ruamel.yaml is imported only when a profile is applied
    from ruamel.yaml import YAML
    from ruamel.yaml.tokens import CommentToken


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

    Raises ConfigError, naming the key, when the overlay has a key that neither params.yaml
    nor its schema knows (a typo would otherwise be ignored) or when the merged params are
    invalid.
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
    changes = list(_merge(document, overlay, overlay_path, target, (), schema()))
    changes += _one_label_grid(document, overlay)
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
    declared: dict[str, Any],  # Any: the schema of ``base``, parsed JSON Schema
) -> Iterator[tuple[str, object, object]]:
    """Write ``overlay`` into ``base`` in place, yielding each changed leaf."""
    known = declared.get("properties", {})
    for key, value in overlay.items():
        where = ".".join((*prefix, str(key)))
        if key not in base:
            if key not in known:
                raise ConfigError(
                    f"{source}: {where} is not a key of {target} or of its schema; a profile "
                    "may only change existing keys (check its spelling)"
                )
            yield from _add(base, key, value, known, where)
            continue
        old = base[key]
        if isinstance(value, dict) != isinstance(old, dict):
            kind = "a mapping" if isinstance(old, dict) else "a single value or list"
            raise ConfigError(f"{source}: {where} must be {kind}, as in {target}")
        if isinstance(value, dict):
            sub = _resolved(known.get(key, {}))
            yield from _merge(old, value, source, target, (*prefix, str(key)), sub)
        elif (before := _plain(old)) != value:
            _replace(base, key, value)
            yield where, before, value


def _add(
    base: MutableMapping[str, Any],
    key: str,
    value: object,
    known: dict[str, Any],  # Any: the schema's properties of ``base``
    where: str,
) -> Iterator[tuple[str, object, object]]:
    """Add ``key``, which params.yaml leaves to its schema default, unless ``value`` is that
    default; it goes after the keys the schema declares before it, so the file keeps its order."""
    default = _resolved(known[key]).get("default")
    if value == default:
        return
    order = list(known)
    earlier = [i for i, k in enumerate(base) if k in order and order.index(k) < order.index(key)]
    position = earlier[-1] + 1 if earlier else 0
    above = _last_comment(base) if position == len(base) else None
    if above is not None and above.value.endswith("\n\n") and not isinstance(value, dict):
        above.value = above.value[:-1]  # the blank line before the next section moves below
        value = _with_blank_line_below(base, key, value)
    base.insert(position, key, value)  # ruamel's CommentedMap.insert
    yield where, default, value


def _last_comment(node: object) -> CommentToken | None:
    """The comment token after the last line of ``node`` (a round-trip mapping or list), where
    ruamel keeps the comments and the blank line that come before the next key."""
    if not isinstance(node, dict | list) or not node or not hasattr(node, "ca"):
        return None
    last = list(node)[-1] if isinstance(node, dict) else len(node) - 1
    value = node[last]
    if isinstance(value, dict | list) and value:
        return _last_comment(value)
    entry = node.ca.items.get(last)
    return entry[2 if isinstance(node, dict) else 0] if entry else None


def _with_blank_line_below(
    mapping: Any,  # Any: ruamel's CommentedMap, whose comments (.ca) typeshed does not know
    key: str,
    value: object,
) -> object:
    """``value`` (to be set at ``mapping[key]``) followed by a blank line: a single value's
    end-of-line comment holds it, a list's last item's."""
    from ruamel.yaml.comments import CommentedSeq
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    blank = CommentToken("\n\n", CommentMark(0), None)
    if isinstance(value, list) and value:
        value = CommentedSeq(value)
        value.ca.items[len(value) - 1] = [blank, None]
    else:
        mapping.ca.items[key] = [None, None, blank, None]
    return value


def _resolved(declared: dict[str, Any]) -> dict[str, Any]:
    """A schema entry with its local ``$ref`` followed (the seeds and fractions are refs)."""
    if "$ref" not in declared:
        return declared
    target: dict[str, Any] = schema()
    for part in declared["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in declared.items() if k != "$ref"}}


#: The two exclusive ways to say which labels fine-tuning gets (pipeline/config.py).
LABEL_GRIDS = ("label_fractions", "labels_per_class")


def _one_label_grid(
    document: MutableMapping[str, Any], overlay: dict
) -> list[tuple[str, object, object]]:
    """Null the label grid the overlay did not set when it set the other: params.yaml may hold
    only one, and a profile that chooses per-class budgets means them instead of the fractions
    (or the other way round). Returns the (key, old, new) change, if any."""
    chosen = overlay.get("split") if isinstance(overlay.get("split"), dict) else {}
    split = document.get("split", {})
    for mine, other in (LABEL_GRIDS, LABEL_GRIDS[::-1]):
        if chosen.get(mine) is not None and other not in chosen and split.get(other) is not None:
            before = _plain(split[other])
            _replace(split, other, None)
            return [(f"split.{other}", before, None)]
    return []


def _replace(mapping: MutableMapping[str, Any], key: str, value: object) -> None:
    """Set a value; a list is refilled in place so the comment below it stays below it, and a
    list replaced by a single value or an empty one hands that comment to its key."""
    old = mapping[key]
    commented = isinstance(old, list) and old and hasattr(old, "ca")  # as read, not as added
    trailing = old.ca.items.pop(len(old) - 1, None) if commented else None
    if isinstance(value, list) and isinstance(old, list) and old and value:
        old[:] = value
        if trailing is not None:
            old.ca.items[len(value) - 1] = trailing
        return
    mapping[key] = value  # a single value, or an empty list (written [])
    if trailing is not None and not isinstance(value, dict):
        mapping.ca.items[key] = [None, None, trailing[0], None]


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
