"""params.yaml as YAML, checked against its schema, every problem worded as one line.

The layer under :mod:`pipeline.config` (the typed view): reading the file (missing, unreadable,
not UTF-8), parsing it safely (no Python objects, no alias bombs, keys that are strings),
validating it against schemas/params.schema.yaml with defaults filled in, and turning a
jsonschema error into a line that names the key, the value, the rule and the fix.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import functools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline import methods
from pipeline.checks import is_int, is_real
from pipeline.data import datasets
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # jsonschema is imported only to validate: the CLI imports this module
    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "params.schema.yaml"
#: The module whose BUILDERS table is the one list of backbones (model.backbone).
BACKBONES_PATH = Path(__file__).resolve().parent / "models" / "backbones.py"


PARAMS_FILE = "params.yaml"


class ConfigError(PipelineError, ValueError):
    """A problem with params.yaml, worded for the user in one line."""


def read_params(path: str | Path) -> tuple[str, object]:
    """A params file's text and its plain data, every problem one ConfigError line."""
    path = Path(path)
    text = _read(path)
    return text, _parse(text, path)


def _read(path: Path) -> str:
    """The file's text: a missing, unreadable or non-UTF-8 file is one line, not a traceback."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found; run from the repository root or pass --params PATH"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; pass the params YAML file itself") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    except ValueError as err:  # a path with a NUL byte, from Python callers
        raise ConfigError(f"{str(path)!r}: cannot be read: {err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise ConfigError(
            f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}, column "
            f"{column} cannot be decoded; save the file as UTF-8"
        ) from None


def _parse(text: str, path: Path) -> object:
    """YAML to Python objects; any problem is one line that names the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.reader.ReaderError as err:
        line, column = _line_column(text, err.position)
        code = ord(err.character) if isinstance(err.character, str) else err.character
        character = f"U+{code:04X}" if isinstance(code, int) else "?"
        raise ConfigError(
            f"{path}: not valid YAML at line {line}, column {column}: character {character} "
            "(a control or special character) is not allowed; delete it"
        ) from None
    except yaml.MarkedYAMLError as err:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(err)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(str(err))}") from None


def _yaml_problem(err: yaml.MarkedYAMLError) -> str:
    """Where and what, with PyYAML's context after it: ``at line 5, column 3: expected <block end>,
    but found '-' (while parsing a block mapping at line 2)`` names both lines to look at.
    """
    mark, problem, context = err.problem_mark or err.context_mark, err.problem, err.context
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if problem and context:
        since = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
        problem = f"{problem} ({context}{since})"
    return f"{where}: {_one_line(problem or context or type(err).__name__)}"


def _line_column(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of a character offset."""
    return text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)


def _one_line(text: str) -> str:
    """Text from a library (PyYAML), joined onto one line: the CLI prints exactly one."""
    return " ".join(text.split()) or "(no details)"


#: Deeper than this is a mistake (params.yaml needs 6 levels) and would exhaust Python's stack.
MAX_DEPTH = 32


#: More values than this (aliases counted each time they are used) is a mistake or an alias bomb.
MAX_VALUES = 20_000


#: Integers go to numpy and torch, whose integers are 64-bit.
INT64 = (-(2**63), 2**63 - 1)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, guarded so that any text ends in a YAMLError with a position.

    The plain one recurses once per nesting level (``[[[[...`` is a RecursionError) and lets
    ValueError, KeyError, AttributeError or IndexError escape from scalars it cannot convert
    (``!!int abc``, ``2001-13-01``, ``!!bool maybe``, ``!!float ''``, a 5000-digit integer).
    """

    depth = 0

    def compose_node(
        self, parent: yaml.Node | None, index: int | yaml.Node | None
    ) -> yaml.Node | None:
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested more than {MAX_DEPTH} levels deep; params.yaml needs 6",
                self.peek_event().start_mark,
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> object:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, KeyError, AttributeError, IndexError, OverflowError):
            raise yaml.constructor.ConstructorError(
                None, None, _unreadable(node), node.start_mark
            ) from None


def _unreadable(node: yaml.Node) -> str:
    """Why a scalar cannot be read as the type its tag (written, or implied) asks for."""
    tag = str(node.tag).rsplit(":", 1)[-1]
    text = node.value if isinstance(node.value, str) else ""
    if tag == "int" and text.lstrip("+-").replace("_", "").isdigit():
        return f"an integer of {len(text)} digits is too long; integers must fit in 64 bits"
    kind = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "timestamp": "a date",
    }.get(tag, f"!!{tag}")
    return (
        f"{_show(text)} cannot be read as {kind} (tag !!{tag}); "
        "put the value in quotes if it is meant as a string"
    )


def check(params: object, source: str = PARAMS_FILE) -> dict[str, Any]:
    """Validate against the JSON schema and return a copy with defaults filled in.

    The Snakefile calls this on Snakemake's ``config`` so both runners reject the same mistakes
    with the same words.
    """
    from jsonschema.exceptions import best_match

    if not isinstance(params, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (data, split, ...), got {_kind(params)}"
        )
    _check_shape(params, (), _Walk(source))
    schema = _schema()
    params = copy.deepcopy(params)
    _fill_defaults(schema, params)
    _one_label_grid(params)
    error = best_match(_validator_class()(schema).iter_errors(params))
    if error is not None:
        raise ConfigError(f"{source}: {_describe(error)}")
    return params


def _one_label_grid(params: dict[str, Any]) -> None:
    """split.labels_per_class replaces label_fractions: the schema's default fractions must not
    fill in beside it (the checked params are checked again, by config.from_dict, and both set
    is an error there)."""
    split = params.get("split")
    if isinstance(split, dict) and split.get("labels_per_class") is not None:
        split["label_fractions"] = None


@dataclass
class _Walk:
    """State of one :func:`_check_shape` walk: containers open on the path, sizes of done ones."""

    source: str
    open: set[int] = field(default_factory=set)
    sizes: dict[int, int] = field(default_factory=dict)


def _check_shape(
    value: Any,  # Any: parsed YAML, compared once is_int (not a TypeGuard) passes it
    path: tuple[str | int, ...],
    walk: _Walk,
) -> int:
    """Reject what would break validation itself; return the number of values in ``value``.

    YAML aliases can make a value contain itself or expand to billions of values, keys can be
    numbers, booleans or null (``1:``, ``on:``, ``~:``), integers can be too long to print; the
    schema cannot say any of that in a line, and jsonschema, deepcopy and json would raise or
    hang. Shared values are counted once per use but walked once, so an alias bomb is cheap.
    """
    if is_int(value):
        if not INT64[0] <= value <= INT64[1]:
            raise ConfigError(
                f"{walk.source}: {_dotted(path)} = {_show(value)} is too large: integers must be "
                f"between {INT64[0]} and {INT64[1]}"
            )
        return 1
    if not isinstance(value, dict | list | tuple | set | frozenset):
        return 1
    if id(value) in walk.sizes:
        return walk.sizes[id(value)]
    if id(value) in walk.open:
        raise ConfigError(
            f"{walk.source}: {_dotted(path)} contains itself (a YAML alias inside its own "
            "anchor); write the value out"
        )
    if len(path) >= MAX_DEPTH:
        raise ConfigError(
            f"{walk.source}: {_dotted(path)} is nested more than {MAX_DEPTH} levels deep; "
            "params.yaml needs 6"
        )
    walk.open.add(id(value))
    total = 1
    for key, sub in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(value, dict) and not isinstance(key, str):
            raise ConfigError(f"{walk.source}: {_non_string_key(path, key)}")
        total += _check_shape(sub, (*path, key), walk)
        if total > MAX_VALUES:
            raise ConfigError(
                f"{walk.source}: {_dotted(path)} holds more than {MAX_VALUES} values (a YAML "
                "alias counts each time it is used); params.yaml needs a few hundred"
            )
    walk.open.discard(id(value))
    walk.sizes[id(value)] = total
    return total


def _non_string_key(path: tuple[str | int, ...], key: object) -> str:
    """Keys are names; YAML turns some plain words into other types (``on:`` is True)."""
    where = f"{_dotted(path)} has" if path else "the top level has"
    return (
        f"{where} key {_show(key)}, which YAML reads as {_kind(key)}: keys must be names "
        f"(strings); put it in quotes or rename it"
    )


def _kind(value: object) -> str:
    """What a YAML value is, in words: for messages about a value of the wrong kind."""
    if value is None:
        return "null (nothing)"
    kinds = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a mapping"),
        (dt.datetime, "a date and time"),
        (dt.date, "a date"),
        (bytes, "binary data"),
    )
    return next((word for cls, word in kinds if isinstance(value, cls)), type(value).__name__)


def schema() -> dict[str, Any]:
    """The schema params are validated against, with its lists of names filled in (a copy)."""
    return copy.deepcopy(_schema())


@functools.cache
def _schema() -> dict[str, Any]:
    """The parsed schema: read once per process (parsing it is most of a load's time).

    Lists of names come from their one source, filled in here: the methods from
    pipeline.methods (so a new method needs only its own section in the schema), the datasets
    and the datasets with mirrors from pipeline.data.datasets, the backbones from the table in
    pipeline/models/backbones.py.
    """
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    sections = schema["properties"]
    for section, key in (("pretrain", "methods"), ("finetune", "inits")):
        sections[section]["properties"][key]["items"] = {"enum": list(methods.NAMES)}
    data = sections["data"]["properties"]
    data["dataset"]["enum"] = list(datasets.NAMES)
    data["mirrors"]["properties"] = {
        name: {"$ref": "#/$defs/mirror_list"} for name in datasets.REMOTE
    }
    sections["model"]["properties"]["backbone"]["enum"] = backbone_names()
    return schema


def backbone_names() -> list[str]:
    """The keys of pipeline/models/backbones.py's BUILDERS table, read from its source.

    Importing that module imports torch, seconds in every process that only validates params
    (Snakemake's parse of the workflow, download, split, the CLI); the table is a dict display
    with string keys, so its keys are read without running the module.
    """
    tables = [
        node.value
        for node in ast.parse(BACKBONES_PATH.read_text()).body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.target.id == "BUILDERS"
    ]
    keys = tables[0].keys if len(tables) == 1 and isinstance(tables[0], ast.Dict) else []
    names = [key.value for key in keys if isinstance(key, ast.Constant)]
    if keys and len(names) == len(keys) and all(isinstance(name, str) for name in names):
        return names
    raise RuntimeError(
        f'{BACKBONES_PATH}: no annotated `BUILDERS: ... = {{"name": builder, ...}}` table with '
        "string keys at module level; the params schema reads the backbone names from it"
    )


@functools.cache
def _validator_class() -> type[Validator]:
    """Draft 2020-12 with YAML's types, plus ``orderedRange`` and ``writtenAsFloat``.

    JSON Schema counts 256.0 as an integer and .nan or .inf as numbers; the stages would get a
    float where they index or count, and NaN losses. Here an integer is written as one and a
    number is finite.
    """
    from jsonschema import Draft202012Validator, ValidationError, validators

    def ordered_range(
        validator: Validator, enabled: bool, instance: object, schema: Mapping[str, object]
    ) -> Iterator[ValidationError]:
        if (
            enabled
            and isinstance(instance, list)
            and len(instance) == 2
            and all(isinstance(v, int | float) for v in instance)
            and instance[0] > instance[1]
        ):
            yield ValidationError(f"{instance} has min > max")

    def written_as_float(
        validator: Validator, enabled: bool, instance: object, schema: Mapping[str, object]
    ) -> Iterator[ValidationError]:
        # YAML's 1 and 1.0 differ, and the spelling names files (DVC renders 1 as "1" but
        # Python's float as "1.0").
        if enabled and is_int(instance):
            yield ValidationError(f"{instance} is an integer")

    types = Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": lambda _, v: is_int(v), "number": lambda _, v: is_real(v)}
    )
    return validators.extend(
        Draft202012Validator,
        {"orderedRange": ordered_range, "writtenAsFloat": written_as_float},
        type_checker=types,
    )


def _fill_defaults(
    schema: dict[str, Any], instance: dict[str, Any], root: dict[str, Any] | None = None
) -> None:
    """Insert schema defaults for missing keys, recursively through nested objects.

    A missing section whose schema has properties is created, so its keys get their defaults too.
    """
    root = schema if root is None else root
    for key, sub in schema.get("properties", {}).items():
        sub = _deref(sub, root)
        if key not in instance:
            if "default" in sub:
                instance[key] = json.loads(json.dumps(sub["default"]))
            elif sub.get("type") == "object" and "properties" in sub:
                instance[key] = {}
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, instance[key], root)


def _deref(sub: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/$defs/name``), keeping sibling keywords such as default."""
    if "$ref" not in sub:
        return sub
    target = root
    for part in sub["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in sub.items() if k != "$ref"}}


def _describe(error: ValidationError) -> str:
    """One line for a jsonschema error: the dotted key, the value, what is allowed."""
    key = _dotted(error.absolute_path)
    value = error.instance
    rule = error.validator
    arg = error.validator_value
    prefix = f"{key}." if error.absolute_path else ""
    if rule == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = [k for k in value if k not in known]
        names = listed([f"{prefix}{_key(e)}" for e in extra])
        allowed = ", ".join(sorted(known)) or f"none ({key} takes no keys)"
        return f"unknown key {names}; allowed here: {allowed}"
    if rule == "required":
        missing = next(k for k in arg if k not in value)
        spec = _deref(error.schema.get("properties", {}).get(missing, {}), _schema())
        about = [spec.get("description"), "enum" in spec and _rule_text("enum", spec["enum"])]
        about = [a for a in about if a]
        return f"missing key {prefix}{missing}" + (f" ({': '.join(about)})" if about else "")
    if "propertyNames" in error.relative_schema_path:
        return f"{key} has key {_show(value)}, which is not allowed: keys must be {_rule(error)}"
    return f"{key} = {_show(value)} is not allowed: must be {_rule(error)}{_hint(error)}"


def _rule(error: ValidationError) -> str:
    """What the failed schema keyword allows, in words."""
    return _rule_text(error.validator, error.validator_value) or _one_line(error.message)[:200]


def _rule_text(rule: str, arg: Any) -> str | None:  # Any: its type depends on the keyword
    """What a schema keyword with argument ``arg`` allows, in words; None for other keywords."""
    allowed = {
        "enum": lambda: "one of " + ", ".join(json.dumps(v) for v in arg),
        "type": lambda: f"of type {arg if isinstance(arg, str) else ' or '.join(arg)}",
        "maximum": lambda: f"at most {arg}",
        "minimum": lambda: f"at least {arg}",
        "exclusiveMaximum": lambda: f"less than {arg}",
        "exclusiveMinimum": lambda: f"greater than {arg}",
        "minItems": lambda: f"a list of at least {arg} item(s)",
        "maxItems": lambda: f"a list of at most {arg} item(s)",
        "orderedRange": lambda: "a [min, max] range with min <= max",
        "not": lambda: "an odd number" if arg == {"multipleOf": 2} else f"not {arg}",
        "writtenAsFloat": lambda: "written as a float (1.0, not 1)",
        "pattern": lambda: f"a name matching {arg}",
        "uniqueItems": lambda: "a list without repeated items",
        "minLength": lambda: f"at least {arg} character(s) long",
    }.get(rule)
    return allowed() if allowed else None


def _hint(error: ValidationError) -> str:
    """Why YAML read the value as the wrong type, when it is one of its usual surprises."""
    if error.validator != "type":
        return ""
    value, wanted = error.instance, error.validator_value
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    numeric = wanted & {"number", "integer"}
    if isinstance(value, float) and not math.isfinite(value) and numeric:
        return " (a finite number, not .nan or .inf)"
    if isinstance(value, float) and "integer" in wanted:
        return f" (write {value:.0f}, not {value})" if value.is_integer() else ""
    if isinstance(value, str) and numeric and _SCIENTIFIC.fullmatch(value):
        return " (YAML reads 1e-3 as a string: write 1.0e-3)"
    if isinstance(value, str) and numeric and _looks_numeric(value):
        return " (a number in quotes is a string: remove the quotes)"
    if isinstance(value, bool | dt.date) and "string" in wanted:
        return f" (YAML reads this as {_kind(value)}: put it in quotes)"
    return ""


def _looks_numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


#: What YAML 1.1 (PyYAML, DVC) reads as a string but most people mean as a number: no dot.
_SCIENTIFIC = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _dotted(path: Iterable[str | int]) -> str:
    """A key path as written in messages: ``finetune.optimizer.lr``, ``split.label_fractions.0``."""
    return ".".join(_key(part) for part in path) or "(top level)"


def _key(part: object) -> str:
    """One key of a path: plain names as they are, odd ones quoted so the line stays readable."""
    if is_int(part):
        return str(part)  # a list index
    if isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
        return part
    return _show(part, limit=40)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,60}")


def listed(names: list[str], most: int = 5) -> str:
    """Names joined by commas; a long list is cut to its first few and a count."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _show(value: object, limit: int = 60) -> str:
    """A value as JSON, cut to ``limit`` characters: a message stays one short line.

    Written piece by piece, so a huge value (an alias bomb, a long list) costs only the piece
    that is shown.
    """
    text = ""
    for piece in _pieces(value):
        text += piece
        if len(text) > limit:
            return text[: limit - 3] + "..."
    return text


def _pieces(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        yield "{"
        for i, (key, sub) in enumerate(value.items()):
            yield f"{', ' if i else ''}{_scalar(key)}: "
            yield from _pieces(sub)
        yield "}"
    elif isinstance(value, list | tuple):
        yield "["
        for i, sub in enumerate(value):
            yield ", " if i else ""
            yield from _pieces(sub)
        yield "]"
    else:
        yield _scalar(value)


def _scalar(value: Any) -> str:  # Any: parsed YAML, int methods used once is_int passes it
    """One scalar: JSON for JSON's types (strings quoted and escaped), words for YAML's others."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if is_int(value) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, str):
        return _printable(json.dumps(value, ensure_ascii=False))
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return f"<{_kind(value)}>"


def _printable(text: str) -> str:
    """Non-printing characters escaped (U+2028 would break the line): the rest kept readable."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
