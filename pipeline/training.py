"""What every training stage shares: the Trainer, its checkpoints and how they resume.

The pretrain and finetune stages both import this module; it holds no stage's logic, so a change
here re-runs both (the runners derive each stage's code dependencies from its imports) and a
change to one stage's module re-runs only that stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import third_party
from pipeline.config import Config, ConfigError
from pipeline.errors import MissingInputError
from pipeline.io import write_bytes

if TYPE_CHECKING:  # Lightning and torch are imported only to train: the Snakefile imports this
    import torch
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy

    from pipeline.config import TrainerConfig
    from pipeline.tracking import TrackedRun

log = logging.getLogger(__name__)


def make_trainer(
    config: Config,
    tracked: TrackedRun,
    epochs: int,
    steps_per_epoch: int,
    callbacks: list[Callback],
    prefix: str = "",
    label: str = "training",
    **options: Any,  # Any: passed on to lightning.Trainer, whose keywords each have their type
) -> Trainer:
    """The Trainer every training stage uses: accelerator chosen by Lightning, the precision of
    ``trainer.precision`` (:func:`precision`), deterministic on the CPU, per-epoch metrics into
    the stage's own MLflow run, one progress line per epoch (``label`` names the job in it) and
    Lightning's progress bar when the job runs on a terminal."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline import tracking

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per process
    third_party.ignore_known_warnings()
    cuda = torch.cuda.is_available()
    settings = config.trainer
    return L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=_strategy(settings),
        # One process's share of a batch is too few images for BatchNorm's statistics to be the
        # single-device ones: synchronized BN makes them the global batch's again (CUDA only;
        # PyTorch's SyncBatchNorm has no CPU kernel, so CPU processes keep per-rank statistics).
        sync_batchnorm=settings.distributed and cuda,
        # SplitData shards the training order itself (the same order as on one device, dealt to
        # the ranks) and gives every rank the whole validation set, so every rank computes the
        # same monitors; Lightning's sampler would re-order the first and split the second.
        use_distributed_sampler=False,
        precision=precision(settings.precision),
        deterministic=not cuda,
        logger=MLFlowLogger(
            experiment_name=config.tracking.experiment,
            tracking_uri=tracking.tracking_uri(),
            run_id=tracked.run_id,
            prefix=prefix,
        ),
        callbacks=[*callbacks, epoch_progress(label)],
        plugins=[atomic_checkpoint_io()],
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, steps_per_epoch),
        **options,
    )


def epoch_progress(label: str) -> Callback:
    """An :class:`EpochProgress` Lightning callback (Lightning is imported only to train: the
    Snakefile imports this module before any job starts)."""
    from lightning.pytorch.callbacks import Callback

    return type("EpochProgressCallback", (EpochProgress, Callback), {})(label)


class EpochProgress:
    """One log line per epoch: the epoch, the module's monitors (training loss, validation
    accuracy, ...), training images per second and an estimate of the time left.

    Why a line and not only Lightning's bar: under Snakemake, DVC or SLURM the job's stderr is
    a log file, not a terminal, and a bar there is either off or a wall of carriage returns. The
    line is what ``make run`` and ``logs/<stage>/`` show. Rank zero only; under DDP the image
    count is the global one. The time left assumes the remaining epochs cost what the ones so
    far did, and is an upper bound where early stopping may end the run sooner.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._epoch_started = self._train_ended = 0.0
        self._images = 0
        self._epoch_seconds: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, module: LightningModule) -> None:
        self._epoch_started = self._train_ended = time.perf_counter()
        self._images = 0

    def on_train_batch_end(
        self,
        trainer: Trainer,
        module: LightningModule,
        outputs: object,
        batch: torch.Tensor | Sequence[torch.Tensor],
        batch_idx: int,
    ) -> None:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += len(first) * trainer.world_size
        self._train_ended = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.sanity_checking or not is_rank_zero():
            return
        seconds = time.perf_counter() - self._epoch_started
        self._epoch_seconds.append(seconds)
        log.info(
            "%s",
            self.line(
                trainer.current_epoch + 1,
                trainer.max_epochs,
                getattr(module, "history", None) or [{}],
            ),
        )

    def line(self, epoch: int, epochs: int, history: list[dict]) -> str:
        """``pretrain simclr: epoch 3/20  train_loss 4.12  val_knn_acc 0.812  4,950 img/s
        1 min 40 s left``."""
        row = history[-1]
        monitors = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
        train_seconds = max(self._train_ended - self._epoch_started, 1e-9)
        rate = self._images / train_seconds
        mean = sum(self._epoch_seconds) / max(len(self._epoch_seconds), 1)
        left = _duration(mean * max(epochs - epoch, 0))
        return f"{self.label}: epoch {epoch}/{epochs}  {monitors}  {rate:,.0f} img/s  {left} left"


def _duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def require_devices(config: Config) -> None:
    """Stop a training stage, before it reads anything, when its processes cannot all start."""
    problem = device_problem(config.trainer)
    if problem:
        raise ConfigError(f"params.yaml: {problem}")


def device_problem(settings: TrainerConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """Why this machine cannot run the processes ``trainer`` asks for, or None.

    Both mistakes would otherwise surface late or never: Lightning refuses more GPUs than there
    are only inside the job, and with ``num_nodes`` above one and nothing that starts the other
    machines' processes, the first process waits for them until the 30-minute DDP timeout.
    The Snakefile asks this before any job starts; every training stage asks it again
    (:func:`require_devices`).
    """
    environ = os.environ if environ is None else environ
    if settings.num_nodes > 1:
        launched = max(int(environ.get(key, "1") or 1) for key in ("WORLD_SIZE", "SLURM_NTASKS"))
        if launched < settings.world_size:
            return (
                f"trainer.num_nodes is {settings.num_nodes}, but nothing starts this job's "
                f"processes on {settings.num_nodes} machines (Snakemake and the SLURM profile "
                "run each job on one machine); start the stage command with srun or torchrun "
                "across the nodes, or set trainer.num_nodes: 1"
            )
    if settings.devices == 1:
        return None  # any machine has one device (the CPU); and no torch import at start-up
    import torch

    if torch.cuda.is_available() and settings.devices > torch.cuda.device_count():
        return (
            f"trainer.devices is {settings.devices} but this machine has "
            f"{torch.cuda.device_count()} GPU(s); set trainer.devices to at most "
            f"{torch.cuda.device_count()}"
        )
    return None


def _strategy(settings: TrainerConfig) -> str | DDPStrategy:
    """Lightning's strategy: one device as before, else DDP over gloo on the CPU, NCCL on GPUs."""
    if not settings.distributed:
        return "auto"
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(process_group_backend="nccl" if torch.cuda.is_available() else "gloo")


def is_rank_zero() -> bool:
    """Whether this process writes the stage's outputs and its MLflow run.

    Under DDP Lightning starts the other ranks by running the same stage command again with
    ``LOCAL_RANK`` set (or SLURM/torchrun start every rank with ``SLURM_PROCID``/``RANK``); each
    of them trains its share and writes nothing, so one stage execution has one MLflow run and
    one writer. Lightning's own rule, read from the environment at import.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@contextlib.contextmanager
def stage_run(
    stage: str, config: Config, dataset: str, param_keys: Iterable[str]
) -> Iterator[TrackedRun]:
    """The stage's MLflow run on rank zero (:func:`pipeline.tracking.stage_run`); on every other
    rank a run that records nothing."""
    from pipeline import tracking

    if is_rank_zero():
        with tracking.stage_run(stage, config, dataset, param_keys) as tracked:
            yield tracked
    else:
        yield tracking.UNTRACKED


def precision(setting: str) -> str:
    """Lightning's precision for ``trainer.precision``; ``auto`` is bf16 autocast where the
    hardware has bf16 arithmetic (CUDA; a CPU with avx512_bf16 or amx_bf16), float32 elsewhere.

    Why on the CPU too: with AVX-512 BF16, LeNet-5 fine-tuning steps ran 1.2-1.5x faster under
    bf16 autocast at the same validation accuracy (BENCHMARKS.md, "CPU speed"); without those
    instructions bf16 is emulated and slower than float32.
    """
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() or cpu_has_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (Linux: /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def atomic_checkpoint_io() -> TorchCheckpointIO:
    """Lightning's checkpoint writer, made atomic on the checkpoint's own file system.

    Lightning stages a checkpoint in the system temp folder and moves it into place, which is a
    copy (not a rename) when that folder is on another file system: a ``kill -9`` during the
    copy would leave a truncated ``last.ckpt``. ``pipeline.io.write_bytes`` writes a sibling,
    fsyncs it and renames it, so a killed run always leaves the previous checkpoint whole.
    """
    import torch
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(
            self, checkpoint: dict[str, Any], path: str | Path, storage_options: object = None
        ) -> None:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            write_bytes(Path(path), buffer.getvalue())

    return AtomicCheckpointIO()


def checkpoint_dir(stage: str, name: str, *material: object) -> Path:
    """Where a run's checkpoints live: ``checkpoints/<stage>/<name>-<key>/``, one folder per
    (job, settings, data), the key a hash of ``material`` (everything that shapes the run), so
    an interrupted run resumes and a run with other settings starts afresh."""
    blob = json.dumps(list(material), sort_keys=True, default=str).encode()
    return Path("checkpoints") / stage / f"{name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def resume_from(folder: Path, what: str) -> str | None:
    """``folder/last.ckpt`` when an earlier run left one (checked loadable), else None."""
    last = folder / "last.ckpt"
    if not last.is_file():
        return None
    checkpoint = load_checkpoint(last, what)
    log.info("resuming from %s (after epoch %s)", last, checkpoint.get("epoch", 0) + 1)
    return str(last)


def load_checkpoint(path: Path, what: str) -> dict:
    """A checkpoint read as plain tensors and containers (``weights_only``: no pickled code).

    Checkpoints are written atomically (:func:`atomic_checkpoint_io`), so a killed run leaves the
    previous one whole; a file that still fails to load was damaged afterwards, and the error
    says which folder to delete to start that job over.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingInputError(
            f"{path} ({what}) is corrupt or unsafe to load ({reason}); delete {path.parent} "
            "to start this job over"
        ) from None
