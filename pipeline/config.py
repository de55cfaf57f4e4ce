"""The typed, validated view of params.yaml: one place that reads configuration.

Every stage and the Snakefile go through :func:`load` / :func:`check`, so a typo or an out-of-range
value is caught before any work starts and is reported as one line that names the key, the value and
what is allowed. Reading, schema validation and the wording of errors live in
:mod:`pipeline.params_yaml`; this module turns the validated mapping into dataclasses and checks
what spans sections (the study's matrix, policy names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import Field, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from pipeline import methods, paths
from pipeline.data import datasets

# The YAML and error layer; check, read_params and SCHEMA_PATH are re-exported as this module's
# public entry points (the Snakefile, the profile command and the tests use them from here).
from pipeline.params_yaml import (  # noqa: F401
    MAX_DEPTH,
    PARAMS_FILE,
    SCHEMA_PATH,
    ConfigError,
    check,
    listed,
    read_params,
)


class _Dataclass(Protocol):
    """Any dataclass instance, for the type of :func:`_typed` (typeshed's DataclassInstance is a
    type checker's module, not one that Python or the packaging test can import)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # Any: a field of any type


_T = TypeVar("_T", bound=_Dataclass)

#: The fine-tuning modes (docs/science.md §8, §9), the one list: the CLI's ``--mode`` and
#: Snakemake's ``{mode}`` wildcard read it; the schema's ``finetune.modes`` enum (LABEL_ONLY_MODES,
#: below) is tied to it by tests/test_registries.py (the schema is YAML, read before any module).
MODES: tuple[str, ...] = ("linear", "finetune", "knn", "semi")
#: Modes on the frozen encoder's features, the only ones a feature baseline (raw pixels) can run.
FROZEN_MODES: tuple[str, ...] = ("linear", "knn")
#: Modes that also train on unlabeled images, and so need some (docs/science.md §9). Their
#: cells are not in finetune.modes but finetune.semi.inits x finetune.semi.fractions: a semi cell
#: costs about ten fine-tuning cells on the CPU, so it runs only where it is asked for.
SEMI_SUPERVISED_MODES: tuple[str, ...] = ("semi",)
#: The modes finetune.modes may list, each run by every init at every fraction (the schema's
#: enum, tied to this by tests/test_registries.py).
LABEL_ONLY_MODES: tuple[str, ...] = tuple(m for m in MODES if m not in SEMI_SUPERVISED_MODES)


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    local_path: str | None
    unlabeled_path: str | None  # a folder of unlabeled images: the pool pretraining adds
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
    label_fractions: tuple[float, ...]  # ascending; empty when labels_per_class is set
    labels_per_class: tuple[int | str, ...] | None = None  # ascending, "all" last; or None
    label_draws: int = 1  # draws of the labeled subsets; seed i of finetune.seeds uses draw i
    val_labels_per_class: int | None = None  # None: the whole validation split makes choices

    @property
    def budgets(self) -> tuple[float | str, ...]:
        """What the split makes, smallest first: label fractions, or per-class keys (4pc, all)."""
        if self.labels_per_class is None:
            return self.label_fractions
        return tuple(paths.budget_key(b) for b in self.labels_per_class)

    def draw_of(self, seeds: tuple[int, ...], seed: int) -> int:
        """The draw of the labeled subsets that fine-tuning seed ``seed`` trains on: the seed's
        position in ``seeds`` when each seed draws its own (label_draws > 1), else draw 0."""
        return seeds.index(seed) if self.label_draws > 1 else 0


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
class TrainerConfig:
    precision: str  # auto | 32-true | bf16-mixed
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp

    @property
    def world_size(self) -> int:
        """Processes that train one job together."""
        return self.devices * self.num_nodes

    @property
    def distributed(self) -> bool:
        return self.strategy == "ddp" or self.world_size > 1


@dataclass(frozen=True)
class SemiConfig:
    """Mode ``semi``, FixMatch (docs/science.md §9): params.yaml's ``finetune.semi``."""

    threshold: float  # a weak view's confidence that makes its prediction a pseudo-label
    unlabeled_ratio: int  # mu: unlabeled images per labeled image in every step
    unlabeled_weight: float  # lambda_u
    weak_policy: str  # the weak views (and the labeled batch, as in the paper)
    strong_policy: str  # the strong views that learn from the pseudo-labels
    batch_size: int | None  # labeled images per step (None: finetune.batch_size)
    inits: tuple[str, ...]  # the semi cells: every init here at every budget of fractions
    fractions: tuple[float | str, ...]  # some of finetune.fractions, smallest first


@dataclass(frozen=True)
class FinetuneConfig:
    inits: tuple[str, ...]
    baselines: tuple[str, ...]
    baseline_modes: tuple[str, ...]
    modes: tuple[str, ...]
    fractions: tuple[float | str, ...]  # label fractions, or per-class budget keys (4pc, all)
    seeds: tuple[int, ...]
    max_passes: int
    min_steps: int
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
    semi: SemiConfig

    def cells(self) -> list[tuple[str, str, float | str]]:
        """Every (init, mode, fraction) job of the study, in three blocks (each one DVC matrix,
        since a matrix cannot leave a combination out): the inits in every mode of ``modes`` at
        every fraction; the feature baselines (raw pixels) in the frozen-encoder modes; the
        semi-supervised cells, ``semi.inits`` x ``semi.fractions``, which cost several
        fine-tuning cells each and so run only where asked. A semi cell may run at all labels:
        with no pool it learns from the labeled images' views as its unlabeled ones, as
        FixMatch's own setup does (docs/science.md §9)."""
        trained = [(i, m, f) for i in self.inits for m in self.modes for f in self.fractions]
        baselines = [
            (i, m, f) for i in self.baselines for m in self.baseline_modes for f in self.fractions
        ]
        semi = [(i, "semi", f) for i in self.semi.inits for f in self.semi.fractions]
        return trained + baselines + semi


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
    trainer: TrainerConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    visualize: VisualizeConfig
    tracking: TrackingConfig
    raw: dict[str, Any]  # the validated params with defaults filled in

    def section(self, dotted: str) -> object:
        """The raw value at a dotted key such as ``split`` or ``data.dataset``."""
        value: Any = self.raw  # Any: indexed one dotted part at a time, section by section
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
    _, params = read_params(path)
    return from_dict(params, source=str(path))


def from_dict(params: object, source: str = PARAMS_FILE) -> Config:
    """Validate a params mapping (as loaded from YAML, or Snakemake's ``config``) and type it."""
    _check_one_label_grid(params, source)
    _check_no_semi_mode(params, source)
    params = check(params, source)
    data, split = params["data"], params["split"]
    per_class = split.get("labels_per_class")
    config = Config(
        data=_typed(
            DataConfig,
            data,
            mirrors={name: tuple(urls) for name, urls in data["mirrors"].items()},
        ),
        split=_typed(
            SplitConfig,
            split,
            val_fraction=float(split["val_fraction"]),
            test_fraction=float(split["test_fraction"]),
            label_fractions=() if per_class else _ascending(split["label_fractions"]),
            labels_per_class=None if per_class is None else _per_class(per_class),
        ),
        augment=AugmentConfig(**params["augment"]),
        model=ModelConfig(**params["model"]),
        trainer=TrainerConfig(**params["trainer"]),
        pretrain=_pretrain(params["pretrain"]),
        finetune=_finetune(params["finetune"]),
        evaluate=EvaluateConfig(**params["evaluate"]),
        visualize=_typed(
            VisualizeConfig,
            params["visualize"],
            embeddings=tuple(params["visualize"]["embeddings"]),
        ),
        tracking=TrackingConfig(**params["tracking"]),
        raw=params,
    )
    _check_policy_names(config, source)
    _check_matrix(config, source)
    _check_world(config, source)
    _check_local_path(config, source)
    return config


def _typed(kind: type[_T], section: dict[str, Any], **converted: object) -> _T:
    """The dataclass ``kind`` from the keys of ``section`` that are its fields, with the
    ``converted`` values (tuples, floats) in place of the raw ones.

    The schema has already refused unknown keys and filled in defaults, so a field missing here
    is a bug in the dataclass, and a section's other keys (the per-method sections of pretrain,
    finetune's knn) are the caller's to convert.
    """
    names = {field.name for field in dataclasses.fields(kind)}
    return kind(**{key: value for key, value in section.items() if key in names} | converted)


def _ascending(fractions: list[float]) -> tuple[float, ...]:
    """Label fractions as floats, smallest first: the split draws its nested subsets in order."""
    return tuple(sorted(float(f) for f in fractions))


def _per_class(budgets: list[int | str]) -> tuple[int | str, ...]:
    """Per-class budgets smallest first, ``all`` last (the nesting order)."""
    return tuple(sorted(budgets, key=paths.budget_size))


def _budgets(fractions: list[float | str]) -> tuple[float | str, ...]:
    """finetune.fractions smallest first: floats for fractions, keys (4pc, all) for budgets."""
    typed = [f if paths.is_per_class(f) else float(f) for f in fractions]
    return tuple(sorted(typed, key=paths.budget_size))


def _check_one_label_grid(params: object, source: str) -> None:
    """split.label_fractions and split.labels_per_class are two ways to say one thing: the
    subsets would have two names each, so only one of them may be set (before defaults fill)."""
    split = params.get("split") if isinstance(params, dict) else None
    if not isinstance(split, dict):
        return
    if split.get("labels_per_class") is not None and split.get("label_fractions") is not None:
        raise ConfigError(
            f"{source}: split.label_fractions and split.labels_per_class are both set; keep "
            "one (labels_per_class for k labeled images per class, label_fractions for a share "
            "of each class) and remove or null the other"
        )


def _check_no_semi_mode(params: object, source: str) -> None:
    """Semi cells have their own lists (finetune.semi.inits, .fractions): in finetune.modes the
    mode would run for every init at every budget, which the schema's enum refuses in words
    that do not say where semi went (checked before the schema, like the label grid)."""
    finetune = params.get("finetune") if isinstance(params, dict) else None
    if not isinstance(finetune, dict):
        return
    for key in ("modes", "baseline_modes"):
        listed_modes = finetune.get(key)
        if isinstance(listed_modes, list):
            semi = [m for m in listed_modes if m in SEMI_SUPERVISED_MODES]
            if semi:
                raise ConfigError(
                    f"{source}: finetune.{key} has {semi[0]!r}, which is not a mode of the "
                    "matrix: semi cells are set by finetune.semi.inits and "
                    "finetune.semi.fractions (the inits and label budgets to run FixMatch at); "
                    f"remove {semi[0]!r} from finetune.{key} and list them there"
                )


FEATURE_BASELINES = methods.FEATURE_BASELINES


def _pretrain(section: dict[str, Any]) -> PretrainConfig:
    return _typed(
        PretrainConfig,
        section,
        methods=tuple(section["methods"]),
        optimizer=OptimizerConfig(**section["optimizer"]),
        warmup_epochs=float(section["warmup_epochs"]),
        options={name: section[name] for name in methods.NAMES},
    )


def _finetune(section: dict[str, Any]) -> FinetuneConfig:
    knn, semi = section["knn"], section["semi"]
    return _typed(
        FinetuneConfig,
        section,
        **{key: tuple(section[key]) for key in ("inits", "modes", "baselines", "baseline_modes")},
        fractions=_budgets(section["fractions"]),
        seeds=tuple(section["seeds"]),
        optimizer=OptimizerConfig(**section["optimizer"]),
        knn_ks=tuple(knn["ks"]),
        knn_temperatures=tuple(float(t) for t in knn["temperatures"]),
        semi=_typed(
            SemiConfig,
            semi,
            threshold=float(semi["threshold"]),
            unlabeled_weight=float(semi["unlabeled_weight"]),
            inits=tuple(semi["inits"]),
            fractions=_budgets(semi["fractions"]),
        ),
    )


def _check_local_path(config: Config, source: str) -> None:
    """A local dataset (one without published files, pipeline.data.datasets) needs its folder."""
    if datasets.SPECS[config.data.dataset].local and not config.data.local_path:
        raise ConfigError(
            f"{source}: data.local_path is empty but data.dataset is {config.data.dataset!r}: "
            "set data.local_path to the folder that holds the data"
        )


def _check_matrix(config: Config, source: str) -> None:
    """Fine-tuning asks only for label budgets the split makes (and draws of them for every
    seed) and encoders pretraining makes."""
    made = [paths.fraction_name(b) for b in config.split.budgets]
    per_class = config.split.labels_per_class is not None
    key = "split.labels_per_class" if per_class else "split.label_fractions"
    allowed = listed([b if per_class else f"{float(b):g}" for b in made], most=10)
    for fraction in config.finetune.fractions:
        name = paths.fraction_name(fraction)
        if name not in made:
            shown = name if paths.is_per_class(name) else f"{float(name):g}"
            raise ConfigError(
                f"{source}: finetune.fractions has {shown}, which the split stage does not "
                f"make; allowed: {allowed} ({key})"
            )
    draws, seeds = config.split.label_draws, len(config.finetune.seeds)
    if 1 < draws < seeds:
        raise ConfigError(
            f"{source}: split.label_draws is {draws} but finetune.seeds has {seeds} seeds, and "
            f"each seed trains on its own draw; set split.label_draws to {seeds} (or 1: every "
            "seed on the same labeled images)"
        )
    for init in config.finetune.inits:
        if init in FEATURE_BASELINES:
            raise ConfigError(
                f"{source}: finetune.inits has {init!r}, which has no weights to fine-tune; move "
                f"it to finetune.baselines (run in the modes of finetune.baseline_modes: "
                f"linear, knn)"
            )
    _check_semi_cells(config, source)
    for key, inits in (
        ("inits", config.finetune.inits),
        ("baselines", config.finetune.baselines),
        ("semi.inits", config.finetune.semi.inits),
    ):
        for init in inits:
            if init not in config.pretrain.methods:
                raise ConfigError(
                    f"{source}: finetune.{key} has {init!r} but pretrain.methods does not make "
                    f"that encoder; allowed: {', '.join(config.pretrain.methods)}"
                )


def _check_semi_cells(config: Config, source: str) -> None:
    """Semi cells start from an encoder with weights and run at budgets the study fine-tunes."""
    semi = config.finetune.semi
    for init in semi.inits:
        if init in FEATURE_BASELINES:
            raise ConfigError(
                f"{source}: finetune.semi.inits has {init!r}, which has no weights to "
                "fine-tune; semi cells train the whole encoder, so start them from a trained "
                "init (scratch or a pretraining method) and remove it from finetune.semi.inits"
            )
    names = [paths.fraction_name(f) for f in config.finetune.fractions]
    for fraction in semi.fractions:
        name = paths.fraction_name(fraction)
        if name not in names:
            shown = name if paths.is_per_class(name) else f"{float(name):g}"
            allowed = [n if paths.is_per_class(n) else f"{float(n):g}" for n in names]
            raise ConfigError(
                f"{source}: finetune.semi.fractions has {shown}, which is not in "
                f"finetune.fractions; allowed: {listed(allowed, most=10)}"
            )


def _check_world(config: Config, source: str) -> None:
    """Under DDP every process takes an equal share of the global batch, and a training job
    that asks for GPUs asks for one per process."""
    world = config.trainer.world_size
    devices = config.trainer.devices
    for key in ("pretrain", "finetune"):
        gpus = config.raw["resources"][key].get("gpus", 0)
        if gpus not in (0, devices):
            raise ConfigError(
                f"{source}: resources.{key}.gpus is {gpus} but trainer.devices is {devices}: "
                f"a training job runs one process per GPU; set gpus to {devices} (or 0 for CPUs)"
            )
        batch = getattr(config, key).batch_size
        if batch % world:
            raise ConfigError(
                f"{source}: {key}.batch_size is {batch}, which {world} processes "
                f"(trainer.devices x trainer.num_nodes) cannot share equally; make it a "
                f"multiple of {world}"
            )


def _check_policy_names(config: Config, source: str) -> None:
    """Every policy a stage asks for must exist in augment.policies."""
    known = config.augment.policies
    wanted = {
        "augment.offline_policy": config.augment.offline_policy,
        "pretrain.policy": config.pretrain.policy,
        "finetune.policy": config.finetune.policy,
    }
    # Only semi cells read their views.
    if any(mode in SEMI_SUPERVISED_MODES for _, mode, _ in config.finetune.cells()):
        wanted["finetune.semi.weak_policy"] = config.finetune.semi.weak_policy
        wanted["finetune.semi.strong_policy"] = config.finetune.semi.strong_policy
    wanted.update(
        {
            f"pretrain.{m}.policy": o["policy"]
            for m, o in config.pretrain.options.items()
            if "policy" in o
        }
    )
    for key, name in wanted.items():
        if name not in known:
            raise ConfigError(
                f"{source}: {key} = {name!r} is not a policy; must be one of "
                f"{listed(list(known), most=10)}"
            )
