"""params.yaml fuzzed with hypothesis: every file validates or is rejected in one clear line.

The issue's promise is "never a traceback": whatever an edit, a merge or an editor does to
params.yaml, ``config.load`` returns a Config or raises ConfigError whose message is one non-empty
line, and the CLI prints it as ``error: ...`` and exits 2. Anything else that escapes is a bug.

Examples are derandomized and the database is off, so CI runs the same examples every time. To
hunt for new bugs, run more of them, drawn at random:
``PARAMS_FUZZ_EXAMPLES=3000 .venv/bin/pytest tests/test_params_fuzz.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from pipeline.config import MAX_DEPTH, Config, ConfigError, load
from tests.conftest import REPO, run

REAL_TEXT = (REPO / "params.yaml").read_text()
REAL = yaml.safe_load(REAL_TEXT)


def fuzz(examples: int) -> Any:
    """The CI profile: fixed examples, no deadline (the 2-core CI machine is slow), no database."""
    hunting = "PARAMS_FUZZ_EXAMPLES" in os.environ
    return settings(
        max_examples=int(os.environ.get("PARAMS_FUZZ_EXAMPLES", examples)),
        deadline=None,
        derandomize=not hunting,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- what the property checks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all examples: hypothesis reruns a test, tmp_path is made once per test."""
    return tmp_path_factory.mktemp("params-fuzz")


def outcome(content: str | bytes, folder: Path) -> str | Config:
    """Load ``content`` as a params file: the Config when it validates, else the one-line message.

    Any exception other than ConfigError propagates and fails the test with its traceback.
    """
    path = folder / "params.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    try:
        config = load(path)
    except ConfigError as err:
        message = str(err)
        assert message.strip(), "empty message"
        assert message.splitlines() == [message], f"not one line: {message!r}"
        assert len(message) < 500, f"too long for one line: {message!r}"
        assert "Traceback" not in message and "object at 0x" not in message, message
        note("rejected: not valid YAML" if "not valid YAML" in message else "rejected")
        return message
    assert_typed(config)
    note("validated")
    return config


def note(what: str) -> None:
    """Count outcomes for ``--hypothesis-show-statistics`` (how many examples got how far)."""
    if currently_in_test_context():
        event(what)


def assert_typed(config: Config) -> None:
    """A Config that loaded keeps its promises: the declared types, finite numbers, JSON raw."""
    json.dumps(config.raw, allow_nan=False)  # params_hash hashes this
    assert len(config.params_hash) == 64
    config.finetune.cells()
    for method in config.pretrain.methods:
        assert isinstance(config.pretrain.policy_for(method), str)
    for section in dataclasses.fields(config):
        if section.name != "raw":
            assert_fields(getattr(config, section.name), section.name)


def assert_fields(obj: Any, where: str) -> None:
    for field in dataclasses.fields(obj):
        value, kind, name = getattr(obj, field.name), str(field.type), f"{where}.{field.name}"
        if dataclasses.is_dataclass(value):
            assert_fields(value, name)
            continue
        items = value if kind.startswith("tuple[") else (value,)
        if kind.endswith("| None") and value is None:
            continue
        for item in items:
            if "str" in kind and type(item) is str:
                continue  # a str, or a union with str: a per-class budget (4pc, all)
            if "int" in kind and "float" not in kind:
                assert type(item) is int, (name, item)
            elif "float" in kind:
                assert type(item) in (int, float) and math.isfinite(item), (name, item)
            elif "bool" in kind:
                assert type(item) is bool, (name, item)
            elif "str" in kind and "dict" not in kind:
                assert type(item) is str, (name, item)


# --- the repository's params.yaml, and every place in it ------------------------------------


def nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """Every (path, value) in ``value``, the root included, parents before children."""
    found = [(path, value)]
    if isinstance(value, dict):
        for key, sub in value.items():
            found += nodes(sub, (*path, key))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            found += nodes(sub, (*path, index))
    return found


NODES = nodes(REAL)
LEAVES = [p for p, v in NODES if not isinstance(v, dict | list) or not v]  # {} and [] count
KEYS = [p for p, _ in NODES if p]  # deletable: a mapping's key or a list's element
MAPPINGS = [p for p, v in NODES if isinstance(v, dict)]  # where an unknown key can go
SECTIONS = [p for p, v in NODES if p and isinstance(v, dict | list)]
LEAF_VALUES = [v for p, v in NODES if p in LEAVES]


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def test_every_section_of_the_real_file_is_fuzzed():
    """The paths cover list elements and the nested sections, not only the top two levels."""
    leaves = {dotted(p) for p in LEAVES}
    for expected in (
        "augment.policies.ssl.random_resized_crop.scale.0",
        "augment.policies.none",
        "pretrain.simclr.temperature",
        "pretrain.scratch",
        "visualize.toy.depths.3",
        "finetune.knn.temperatures.2",
        "data.mirrors.fashion_mnist.0",
        "data.local_path",
    ):
        assert expected in leaves
    assert len(LEAVES) > 150 and ("augment", "policies") in SECTIONS


# --- values of every type --------------------------------------------------------------------

TRICKY_STRINGS = [
    "",
    " ",
    "yes",
    "no",
    "on",
    "off",
    "null",
    "~",
    "1e-3",
    "1.0e-3",
    "0x1F",
    "2020-01-01",
    ".nan",
    ".inf",
    "NaN",
    "ssl",
    "none",
    "supervised",
    "simclr",
    "vae",
    "idx",
    "imagefolder",
    "Ünïcödé 🙂",
    "a\nb",
    "\u2028",
    "\x00",
    "\t",
    "*alias",
    "&anchor",
    "!!int 3",
    "- x",
    "a: b",
    "'",
    '"',
    "{",
    "[",
    "#",
    "%",
    "@",
    "`",
    "x" * 300,
]
TRICKY_NUMBERS = [
    0,
    1,
    -1,
    2,
    3,
    2**31,
    2**32 - 1,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    10**30,
    -(10**30),
    10**400,
    0.0,
    -0.0,
    1.0,
    0.5,
    1e-300,
    5e-324,
    1.7976931348623157e308,
    256.0,
    math.nan,
    math.inf,
    -math.inf,
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(TRICKY_NUMBERS),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(TRICKY_STRINGS),
    st.sampled_from(LEAF_VALUES),  # right type, maybe the wrong key: reaches the cross-checks
)
keys = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["policy", "seed", "p", "1"]),
    st.integers(-2, 2),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)

#: Single-line YAML that is not a plain value: tags PyYAML cannot convert, aliases, nesting...
RAW_VALUES = [
    "!!int abc",
    "!!int ''",
    "!!int 0b",
    "!!float ''",
    "!!float x",
    "!!bool maybe",
    "!!timestamp nope",
    "2001-13-01",
    "2001-02-30 25:61:61",
    "!!binary '@@@'",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1, b: 2]",
    "!!pairs [a: 1, a: 2]",
    "!!python/object:os.system x",
    "!custom 1",
    "!!map [1]",
    "*undefined",
    "&a [*a]",
    "&a {x: *a}",
    "&a [1, [2, *a]]",
    "9" * 5000,
    "-" + "9" * 5000,
    "0x" + "f" * 5000,
    "0b" + "1" * 200,
    ":".join(["59"] * 2500),
    "1:20",
    "0o17",
    "017",
    "+.inf",
    "-.nan",
    ".NaN",
    "[" * 200 + "]" * 200,
    "{a: " * 60 + "1" + "}" * 60,
    "{a: {b: {c: [1, [2, [3]]]}}}",
    '"\\x00"',
    '"\\u2028"',
    "'unterminated",
    "[1, 2",
    "{a: 1, a: 2}",
    "{<<: [1]}",
    "? [a]",
    "{[a]: 1}",
    "|",
    ">",
    "---",
    "...",
    "%YAML 1.1",
    "@x",
    "`x",
    "\t1",
    "1 # comment",
    "-",
    "1:",
    "{1: a, a: 1}",
    "{on: 1, off: 2, yes: 3}",
    "{~: 1}",
    "{2020-01-01: x}",
    "{1.5: x}",
]
raw_values = st.sampled_from(RAW_VALUES) | st.text(max_size=30).filter(lambda t: "\n" not in t)

PLACEHOLDER = "FUZZ_PLACEHOLDER_1b7e"


def dump(doc: Any) -> str:
    """The document as YAML text; PyYAML writes back what it reads, nan and inf included."""
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10**6)


def with_raw(doc: Any, path: tuple[Any, ...], raw: str) -> str:
    """``doc`` as text with the value at ``path`` written as the raw YAML ``raw``."""
    doc = copy.deepcopy(doc)
    if path:
        get(doc, path[:-1])[path[-1]] = PLACEHOLDER
        return dump(doc).replace(PLACEHOLDER, raw, 1)
    return raw


# --- 1. mutations of the real params.yaml ----------------------------------------------------


@fuzz(400)
@given(path=st.sampled_from(LEAVES), value=values)
def test_a_leaf_with_any_value_validates_or_is_named(scratch, path, value):
    """Any value at any leaf: loads, or one line that names the key (or its section)."""
    check_leaf(path, value, scratch)


def check_leaf(path: tuple[Any, ...], value: Any, folder: Path) -> None:
    doc = copy.deepcopy(REAL)
    get(doc, path[:-1])[path[-1]] = value
    result = outcome(dump(doc), folder)
    if isinstance(result, Config):
        assert get(result.raw, path) == value  # what was written is what the stages get
    else:
        assert dotted(path[:-1]) in result, f"{dotted(path)} = {value!r}: {result}"


@st.composite
def nudged(draw: st.DrawFn) -> tuple[tuple[Any, ...], Any]:
    """A leaf and a value near the one it has: the same type, a neighbour, the other spelling.

    Arbitrary values are almost always rejected; these often validate, so the typed Config and
    the cross-checks (fractions, inits, policy names) see many valid files too.
    """
    path = draw(st.sampled_from(LEAVES))
    old = get(REAL, path)
    if isinstance(old, bool):
        near = st.booleans()
    elif isinstance(old, int):
        near = st.integers(old - 3, old + 3) | st.integers(0, 2**32) | st.just(float(old))
    elif isinstance(old, float):
        near = st.floats(0, 1) | st.sampled_from([old * 10, old / 10, int(old), 0.0, -old])
    elif isinstance(old, str):
        near = st.sampled_from([v for v in LEAF_VALUES if isinstance(v, str)] + [old.upper()])
    else:  # null, {} and []
        near = st.none() | st.integers(2, 1000) | st.just({}) | st.just([])
    return path, draw(near)


@fuzz(200)
@given(change=nudged())
def test_a_leaf_nudged_from_its_value_validates_or_is_named(scratch, change):
    check_leaf(*change, scratch)


@fuzz(150)
@given(path=st.sampled_from(LEAVES + SECTIONS), raw=raw_values)
def test_a_value_written_as_any_yaml_text_validates_or_is_one_line(scratch, path, raw):
    """Raw YAML at a real key: bad tags, dates, aliases, 5000-digit integers, deep nesting."""
    outcome(with_raw(REAL, path, raw), scratch)


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """The real document after one to four edits: delete, add unknown, replace a section."""
    doc = copy.deepcopy(REAL)
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["delete", "add", "section", "leaf"]))
        candidates = {"delete": KEYS, "add": MAPPINGS, "section": SECTIONS, "leaf": LEAVES}[edit]
        path = draw(st.sampled_from(candidates))
        try:
            parent, target = (get(doc, path[:-1]) if path else None), get(doc, path)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this place
        if path and not isinstance(parent, dict | list):
            continue  # a string replaced the section: "abc"[0] is no place in the file
        if edit == "delete":
            del parent[path[-1]]
        elif edit == "add" and isinstance(target, dict):
            target[draw(keys)] = draw(values)
        elif edit == "section":
            parent[path[-1]] = draw(scalars | st.lists(scalars, max_size=3))
        elif edit == "leaf":
            parent[path[-1]] = draw(values)
    return doc


@fuzz(250)
@given(doc=mutated())
def test_edits_anywhere_in_the_file_validate_or_are_one_line(scratch, doc):
    """Deleted keys, unknown keys at any level, whole sections replaced by scalars or lists."""
    outcome(dump(doc), scratch)


# --- 2. whole-file garbage -------------------------------------------------------------------

LINES = REAL_TEXT.splitlines(keepends=True)
FRAGMENTS = [
    "\t",
    "  ",
    "    x: 1",
    "- 1",
    "&a",
    "*a",
    "<<: *a",
    "? x",
    ": y",
    "---",
    "...",
    "{",
    "}",
    "[",
    "]",
    "'",
    '"',
    "#",
    "%TAG ! tag:x,2000:",
    "!!python/name:os.system",
    "\ufeff",
    "\x85",
    "\u2028",
    "\x00",
    "\x1b[31m",
    "\r",
    "key: value: x",
    "data:",
    "split: 5",
    "  seed: 1.0",
    "finetune: &f",
    "pretrain: *f",
    "x: &x [*x]",
]


@st.composite
def edited_text(draw: st.DrawFn) -> str:
    """The real file with a few lines deleted, duplicated, re-indented or replaced by junk."""
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["delete", "duplicate", "indent", "tab", "junk", "insert"]))
        junk = draw(st.sampled_from(FRAGMENTS) | st.text(max_size=20))
        if edit == "delete":
            del lines[i]
        elif edit == "duplicate":  # duplicate keys: PyYAML keeps the last one
            lines.insert(i, lines[i])
        elif edit == "indent":
            lines[i] = " " * draw(st.integers(0, 7)) + lines[i].lstrip(" ")
        elif edit == "tab":
            lines[i] = "\t" + lines[i].lstrip(" ")
        elif edit == "junk":
            lines[i] = lines[i].rstrip("\n") + junk + "\n"
        else:
            lines.insert(i, junk + "\n")
        if not lines:
            break
    return "".join(lines)


def nested(depth: int, opener: str) -> str:
    closer = {"[": "]", "{a: ": "}", "- ": ""}[opener]
    return opener * depth + "1" + closer * depth


def block_nested(depth: int) -> str:
    return "".join("  " * i + "a:\n" for i in range(depth)) + "  " * depth + "1\n"


def alias_bomb(width: int, levels: int, at_a_key: bool) -> str:
    """The billion laughs: each level refers ``width`` times to the one before."""
    items = ["&l0 [x]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    if at_a_key:
        return with_raw(REAL, ("split", "seed"), f"[{', '.join(items)}]")
    return "".join(f"k{i}: {item}\n" for i, item in enumerate(items))


SMALL_DOCUMENTS = [
    "",
    " ",
    "\n",
    "# only a comment\n",
    "~\n",
    "---\n",
    "---\n...\n",
    "[]",
    "{}",
    "null",
    "1",
    "true",
    "'text'",
    "- a\n- b\n",
    "data: {}\n---\nx: 1\n",
    "\ufeffdata: {}\n",
    "data:\n\tdataset: mnist\n",
    "a: 1\na: 2\n",
    "\x00",
    "\xff",
]
garbage = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.binary(max_size=40).map(lambda junk: REAL_TEXT.encode()[:500] + junk),
    values.map(dump),  # lists, scalars, mappings of anything: the wrong shape of document
    st.sampled_from(SMALL_DOCUMENTS),
    st.builds(nested, st.integers(1, 3000), st.sampled_from(["[", "{a: ", "- "])),
    st.builds(block_nested, st.integers(1, 400)),
    st.builds(alias_bomb, st.integers(2, 12), st.integers(2, 10), st.booleans()),
    edited_text(),
)


@fuzz(350)
@given(content=garbage)
def test_any_file_content_validates_or_is_one_line(scratch, content):
    """Arbitrary text and bytes, documents that are not mappings, deep nesting, aliases, tabs."""
    outcome(content, scratch)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"data:\n  dataset: \xc3\x28\n", "not UTF-8 text: byte 0xc3 at line 2, column 12"),
        ("[" * 5000 + "]" * 5000, f"nested more than {MAX_DEPTH} levels deep"),
        (with_raw(REAL, ("split", "seed"), "9" * 5000), "an integer of 5000 digits is too long"),
        (with_raw(REAL, ("split", "seed"), "!!int abc"), '"abc" cannot be read as an integer'),
        (with_raw(REAL, ("split", "seed"), "2001-13-01"), '"2001-13-01" cannot be read as a date'),
        (with_raw(REAL, ("finetune", "seeds"), "&s [0, *s]"), "finetune.seeds.1 contains itself"),
        (alias_bomb(9, 9, True), "holds more than 20000 values (a YAML alias counts each time"),
        (
            with_raw(REAL, ("augment", "policies", "none"), "{1: {}}"),
            "augment.policies.none has key 1, which YAML reads as an integer: keys must be names",
        ),
        (
            with_raw(REAL, ("pretrain", "batch_size"), "256.0"),
            "pretrain.batch_size = 256.0 is "
            "not allowed: must be of type integer (write 256, not 256.0)",
        ),
        (
            with_raw(REAL, ("finetune", "optimizer", "lr"), ".nan"),
            "finetune.optimizer.lr = .nan is not allowed: must be of type number (a finite number",
        ),
        (
            with_raw(REAL, ("finetune", "optimizer", "lr"), "1e-3"),
            'finetune.optimizer.lr = "1e-3"'
            " is not allowed: must be of type number (YAML reads 1e-3 as a string",
        ),
        (with_raw(REAL, ("pretrain", "warmup_epochs"), "1" + "0" * 30), "is too large"),
        (
            with_raw(REAL, ("split", "seed"), str(2**40)),
            "split.seed = 1099511627776 is not allowed: must be at most 4294967295",
        ),
        (REAL_TEXT + '"a\\nb": 1\n', 'unknown key "a\\nb"; allowed here: augment, data'),
        (
            REAL_TEXT.replace("scratch: {}", "scratch: {x: 1}"),
            "unknown key pretrain.scratch.x; allowed here: none (pretrain.scratch takes no keys)",
        ),
        ("- a\n", "expected a mapping of sections (data, split, ...), got a list"),
        ("", "expected a mapping of sections (data, split, ...), got null (nothing)"),
    ],
)
def test_crashes_the_fuzzer_found_are_now_one_clear_line(tmp_path, content, expected):
    """Each was a traceback before (or, for 256.0, .nan and seeds, a value that validated)."""
    result = outcome(content, tmp_path)
    assert not isinstance(result, Config), "it loaded"
    assert expected in result


# --- 3. end to end: the CLI prints one line and exits 2 -------------------------------------

CLI_CASES = {
    "invalid UTF-8": b"split:\n  seed: \xff\n",
    "a self-referencing alias": with_raw(REAL, ("finetune", "seeds"), "&s [0, *s]"),
    "nesting 5000 deep": "[" * 5000 + "]" * 5000,
    "a tag PyYAML cannot convert": with_raw(REAL, ("split", "seed"), "!!int abc"),
}


@pytest.mark.parametrize("content", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_check_params_prints_one_error_line_and_exits_2(tmp_path: Path, content: str | bytes):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run(
        ["python", "-m", "pipeline", "check-params", "--params", str(path)], tmp_path, check=False
    )
    assert_one_error_line(result, "error: ")


def test_a_folder_as_params_is_one_error_line(tmp_path: Path):
    result = run(
        ["python", "-m", "pipeline", "check-params", "--params", str(tmp_path)],
        tmp_path,
        check=False,
    )
    assert_one_error_line(result, f"error: {tmp_path}: is a folder")


def test_a_stage_stops_on_a_bad_params_file_before_any_work(tmp_path: Path):
    """The split stage reads params.yaml from the working folder, as the runners call it."""
    bad = with_raw(REAL, ("split", "labels_per_class"), "&f [4, *f]")
    (tmp_path / "params.yaml").write_text(bad)
    result = run(["python", "-m", "pipeline", "split"], tmp_path, check=False)
    assert_one_error_line(result, "error: params.yaml: split.labels_per_class.1 contains itself")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def assert_one_error_line(result: Any, start: str) -> None:
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, output
    assert "Traceback" not in result.stdout + result.stderr, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), output
