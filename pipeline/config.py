"""The typed, validated view of params.yaml: one place that reads configuration.

Every stage and the Snakefile go through :func:`load` / :func:`check`, so a typo or an out-of-range
value is caught before any work starts and is reported as one line that names the key, the value and
what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "params.schema.yaml"
PARAMS_FILE = "params.yaml"

#: Datasets that come from a local folder (data.local_path) instead of mirrors.
LOCAL_DATASETS = ("idx", "imagefolder")


class ConfigError(PipelineError, ValueError):
    """A problem with params.yaml, worded for the user in one line."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    local_path: str | None
    image_size: int
    channels: int
    on_bad_image: str
    mirrors: dict[str, tuple[str, ...]]

    def mirrors_for(self, dataset: str) -> tuple[str, ...]:
        """The mirror list of ``dataset``; a clear error when params.yaml has none."""
        if dataset not in self.mirrors:
            raise ConfigError(
                f"params.yaml: data.mirrors.{dataset} is missing: list at least one place "
                f"(URL or folder) to fetch {dataset} from"
            )
        return self.mirrors[dataset]


@dataclass(frozen=True)
class SplitConfig:
    seed: int
    val_fraction: float
    test_fraction: float
    label_fractions: tuple[float, ...]  # ascending


@dataclass(frozen=True)
class AugmentConfig:
    seed: int
    preview_images: int
    preview_views: int
    offline_copies: int
    offline_policy: str
    policies: dict[str, dict[str, Any]]  # as written in params.yaml; augment.resolve_policy fills


@dataclass(frozen=True)
class ModelConfig:
    backbone: str
    width: int
    depth: int
    activation: str
    leaky_relu_slope: float
    init: str
    dropout: float
    batch_norm: bool


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool


@dataclass(frozen=True)
class PretrainConfig:
    methods: tuple[str, ...]
    seed: int
    epochs: int
    batch_size: int
    max_images: int | None
    policy: str
    optimizer: OptimizerConfig
    warmup_epochs: float
    monitor: dict[str, Any]
    options: dict[str, dict[str, Any]]  # the per-method sections (simclr, vae, ...)

    def policy_for(self, method: str) -> str:
        """The augment policy a method trains with: its own ``policy`` key, else the common one."""
        return self.options.get(method, {}).get("policy", self.policy)


@dataclass(frozen=True)
class FinetuneConfig:
    inits: tuple[str, ...]
    modes: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    patience: int
    min_steps_per_epoch: int
    max_images: int | None
    batch_size: int
    policy: str
    optimizer: OptimizerConfig
    encoder_lr_scale: float
    l1: float
    dropout: float
    label_smoothing: float
    multitask_weight: float
    knn_ks: tuple[int, ...]
    knn_temperatures: tuple[float, ...]

    def cells(self) -> list[tuple[str, str, float]]:
        """Every (init, mode, fraction) job of the matrix."""
        return [(i, m, f) for i in self.inits for m in self.modes for f in self.fractions]


@dataclass(frozen=True)
class EvaluateConfig:
    bootstrap: int
    seed: int
    ece_bins: int


@dataclass(frozen=True)
class VisualizeConfig:
    seed: int
    embedding_images: int
    embeddings: tuple[str, ...]
    cam_examples: int
    deconv_channels: int
    deconv_top: int
    deconv_images: int
    toy: dict[str, Any]


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str


@dataclass(frozen=True)
class Config:
    data: DataConfig
    split: SplitConfig
    augment: AugmentConfig
    model: ModelConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    visualize: VisualizeConfig
    tracking: TrackingConfig
    raw: dict[str, Any]  # the validated params with defaults filled in

    def section(self, dotted: str) -> Any:
        """The raw value at a dotted key such as ``split`` or ``data.dataset``."""
        value: Any = self.raw
        for part in dotted.split("."):
            value = value[part]
        return value

    @property
    def params_hash(self) -> str:
        """A stable hash of all params; part of the pipeline id that tags every tracked run."""
        canonical = json.dumps(self.raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load(path: str | Path = PARAMS_FILE) -> Config:
    """Read, validate and type params.yaml. Raises ConfigError with one readable line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found; run from the repository root or pass --params PATH"
        ) from None
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return from_dict(params, source=str(path))


def from_dict(params: Any, source: str = PARAMS_FILE) -> Config:
    """Validate a params mapping (as loaded from YAML, or Snakemake's ``config``) and type it."""
    params = check(params, source)
    data = params["data"]
    split = params["split"]
    augment = params["augment"]
    config = Config(
        data=DataConfig(
            dataset=data["dataset"],
            local_path=data["local_path"],
            image_size=data["image_size"],
            channels=data["channels"],
            on_bad_image=data["on_bad_image"],
            mirrors={name: tuple(urls) for name, urls in data["mirrors"].items()},
        ),
        split=SplitConfig(
            seed=split["seed"],
            val_fraction=float(split["val_fraction"]),
            test_fraction=float(split["test_fraction"]),
            label_fractions=tuple(sorted(float(f) for f in split["label_fractions"])),
        ),
        augment=AugmentConfig(
            seed=augment["seed"],
            preview_images=augment["preview_images"],
            preview_views=augment["preview_views"],
            offline_copies=augment["offline_copies"],
            offline_policy=augment["offline_policy"],
            policies=augment["policies"],
        ),
        model=ModelConfig(**params["model"]),
        pretrain=_pretrain(params["pretrain"]),
        finetune=_finetune(params["finetune"]),
        evaluate=EvaluateConfig(**params["evaluate"]),
        visualize=VisualizeConfig(**{**params["visualize"],
                                     "embeddings": tuple(params["visualize"]["embeddings"])}),
        tracking=TrackingConfig(experiment=params["tracking"]["experiment"]),
        raw=params,
    )
    _check_policy_names(config, source)
    _check_matrix(config, source)
    if config.data.dataset in LOCAL_DATASETS and not config.data.local_path:
        raise ConfigError(
            f"{source}: data.local_path is empty but data.dataset is {config.data.dataset!r}: "
            "set data.local_path to the folder that holds the data"
        )
    return config


_METHOD_SECTIONS = ("scratch", "simclr", "autoencoder", "rotation", "inpainting", "vae", "pca")


def _pretrain(section: dict[str, Any]) -> PretrainConfig:
    return PretrainConfig(
        methods=tuple(section["methods"]),
        seed=section["seed"],
        epochs=section["epochs"],
        batch_size=section["batch_size"],
        max_images=section["max_images"],
        policy=section["policy"],
        optimizer=OptimizerConfig(**section["optimizer"]),
        warmup_epochs=float(section["warmup_epochs"]),
        monitor=section["monitor"],
        options={name: section[name] for name in _METHOD_SECTIONS},
    )


def _finetune(section: dict[str, Any]) -> FinetuneConfig:
    knn = section["knn"]
    fields = {k: v for k, v in section.items() if k not in ("knn", "optimizer")}
    return FinetuneConfig(
        **{**fields, "inits": tuple(fields["inits"]), "modes": tuple(fields["modes"]),
           "fractions": tuple(sorted(float(f) for f in fields["fractions"])),
           "seeds": tuple(fields["seeds"])},
        optimizer=OptimizerConfig(**section["optimizer"]),
        knn_ks=tuple(knn["ks"]),
        knn_temperatures=tuple(float(t) for t in knn["temperatures"]),
    )  # fmt: skip


def _check_matrix(config: Config, source: str) -> None:
    """Fine-tuning asks only for label fractions the split makes and encoders pretraining makes."""
    made = set(config.split.label_fractions)
    allowed = ", ".join(f"{f:g}" for f in sorted(made))
    for fraction in config.finetune.fractions:
        if fraction not in made:
            raise ConfigError(
                f"{source}: finetune.fractions has {fraction:g}, which the split stage does not "
                f"make; allowed: {allowed} (split.label_fractions)"
            )
    for init in config.finetune.inits:
        if init not in config.pretrain.methods:
            raise ConfigError(
                f"{source}: finetune.inits has {init!r} but pretrain.methods does not make that "
                f"encoder; allowed: {', '.join(config.pretrain.methods)}"
            )


def _check_policy_names(config: Config, source: str) -> None:
    """Every policy a stage asks for must exist in augment.policies."""
    known = config.augment.policies
    wanted = {
        "augment.offline_policy": config.augment.offline_policy,
        "pretrain.policy": config.pretrain.policy,
        "finetune.policy": config.finetune.policy,
    }
    wanted.update(
        {f"pretrain.{m}.policy": o["policy"] for m, o in config.pretrain.options.items()
         if "policy" in o}
    )  # fmt: skip
    for key, name in wanted.items():
        if name not in known:
            raise ConfigError(
                f"{source}: {key} = {name!r} is not a policy; must be one of {', '.join(known)}"
            )


def check(params: Any, source: str = PARAMS_FILE) -> dict[str, Any]:
    """Validate against the JSON schema and return a copy with defaults filled in.

    The Snakefile calls this on Snakemake's ``config`` so both runners reject the same mistakes
    with the same words.
    """
    import copy

    from jsonschema.exceptions import best_match

    schema = _schema()
    if not isinstance(params, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (data, split, ...), got "
            f"{type(params).__name__}"
        )
    params = copy.deepcopy(params)
    _fill_defaults(schema, params)
    error = best_match(_validator(schema).iter_errors(params))
    if error is not None:
        raise ConfigError(f"{source}: {_describe(error)}")
    return params


def _schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _validator(schema: dict[str, Any]) -> Any:
    """Draft 2020-12 plus ``orderedRange``: a ``[min, max]`` pair must have min <= max."""
    from jsonschema import Draft202012Validator, ValidationError, validators

    def ordered_range(validator: Any, enabled: bool, instance: Any, schema: Any) -> Any:
        if (
            enabled
            and isinstance(instance, list)
            and len(instance) == 2
            and all(isinstance(v, int | float) for v in instance)
            and instance[0] > instance[1]
        ):
            yield ValidationError(f"{instance} has min > max")

    def written_as_float(validator: Any, enabled: bool, instance: Any, schema: Any) -> Any:
        # JSON Schema counts 1.0 as an integer; YAML's 1 and 1.0 differ, and the spelling names
        # files (DVC renders 1 as "1" but Python's float as "1.0").
        if enabled and isinstance(instance, int) and not isinstance(instance, bool):
            yield ValidationError(f"{instance} is an integer")

    extended = validators.extend(
        Draft202012Validator,
        {"orderedRange": ordered_range, "writtenAsFloat": written_as_float},
    )
    return extended(schema)


def _fill_defaults(schema: dict[str, Any], instance: dict[str, Any], root: Any = None) -> None:
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


def _describe(error: Any) -> str:
    """One line for a jsonschema error: the dotted key, the value, what is allowed."""
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    value = error.instance
    rule = error.validator
    arg = error.validator_value
    if rule == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        extra = sorted(set(value) - set(error.schema.get("properties", {})))
        prefix = f"{key}." if error.absolute_path else ""
        names = ", ".join(f"{prefix}{e}" for e in extra)
        return f"unknown key {names}; allowed here: {allowed}"
    if rule == "required":
        missing = [k for k in arg if k not in value]
        prefix = f"{key}." if error.absolute_path else ""
        return f"missing key {prefix}{missing[0]}"
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
    what = allowed() if allowed else error.message
    return f"{key} = {json.dumps(value)} is not allowed: must be {what}"
