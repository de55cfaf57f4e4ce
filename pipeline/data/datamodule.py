"""LightningDataModule that keeps whole splits as uint8 tensors and hands out index batches.

Why indices: the images live on the training device as one tensor (Fashion-MNIST's training set is
47 MB), the LightningModule gathers a batch with one indexing op and augments it there
(pipeline.augment). Nothing per-sample runs in Python, and there are no worker processes.

Only the sets asked for are loaded: a stage that must not see the test split never opens it.
The unlabeled pool is loaded only for pretraining (``pool=True``), as the ``pretrain`` set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import paths
from pipeline.data import prepared
from pipeline.data.pool import pool_images
from pipeline.data.split import load_indices, test_source
from pipeline.errors import MissingInputError


class EpochPermutation(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run replays it exactly.

    Lightning calls ``set_epoch`` before every epoch. ``limit`` keeps the first that many
    positions of each epoch's permutation (a subset of the data per epoch); ``min_length``
    chains further permutations until an epoch is at least that long (tiny labeled subsets).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        limit: int | None = None,
        min_length: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.size = size
        self.seed = seed
        self.length = max(min(limit, size) if limit else size, min_length)
        self.epoch = 0
        self.rank = rank
        self.world = world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order: list[int] = []
        repeat = 0
        while len(order) < self.length:
            seed = (self.seed * 1_000_003 + self.epoch) * 131 + repeat
            order += torch.randperm(
                self.size, generator=torch.Generator().manual_seed(seed)
            ).tolist()
            repeat += 1
        # Under DDP rank r takes positions r, r + world, ...: the ranks together see the
        # one-device order, batch by batch (global batch = world x local batch).
        return iter(order[self.rank : len(self) * self.world : self.world])

    def __len__(self) -> int:
        return self.length // self.world


class _Positions(Dataset):
    """The dataset of positions 0..n-1; the default collate turns a batch into an index tensor."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


#: The set pretraining draws from when there is a pool: training images, then pool images.
PRETRAIN_SET = "pretrain"
#: The label of a pool image in PRETRAIN_SET: it has none (the online probe skips it).
UNLABELED = -1


class SplitData(L.LightningDataModule):
    """The sets of one dataset's split as uint8 N x C x H x W tensors plus int64 labels.

    ``sets`` names what to load: any of ``train``, ``val``, ``test``, ``labeled-<fraction>``.
    The test set is loaded only when asked for by name. ``pool=True`` (pretraining) adds the
    split's kept unlabeled pool, when the dataset has one, as the set ``pretrain``: the training
    images followed by the pool images, labeled UNLABELED, and makes it the set the training
    loader draws from. ``train`` stays the labeled training images (the kNN monitor's bank).
    ``val_file`` is the split file the ``val`` set is read from: ``val``, or ``val-labeled`` (the
    scarce validation subset of split.val_labels_per_class), so every choice that reads ``val``
    sees only what the user's validation budget allows.
    """

    def __init__(
        self,
        dataset: str,
        sets: Sequence[str] = ("train", "val"),
        batch_size: int = 256,
        seed: int = 0,
        max_images: int | None = None,
        train_set: str = "train",
        min_steps: int = 0,
        pool: bool = False,
        val_file: str = "val",
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.sets = tuple(sets)
        self.batch_size = batch_size
        self.seed = seed
        self.max_images = max_images
        self.train_set = train_set
        self.min_steps = min_steps
        self.pool = pool
        self.val_file = val_file
        self.pool_size = 0  # pool images in PRETRAIN_SET; 0 without a pool
        self.images: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.images:
            return
        source = test_source(self.dataset)
        wanted = ("train_images", "train_labels")
        if "test" in self.sets and source == "test":
            wanted += ("test_images", "test_labels")
        if self.pool:
            wanted += ("unlabeled_images",)
        data = prepared.load(paths.prepared_dir(self.dataset), only=wanted)
        self.classes = list(data.classes)
        for name in self.sets:
            index = load_indices(self.dataset, self.val_file if name == "val" else name)
            from_test = name == "test" and source == "test"
            images = data.test_images if from_test else data.train_images
            labels = data.test_labels if from_test else data.train_labels
            batch = np.ascontiguousarray(np.asarray(images)[index])
            self.images[name] = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
            self.labels[name] = torch.from_numpy(np.asarray(labels)[index].astype(np.int64))
        if self.pool:
            self._add_pool(data)

    def _add_pool(self, data: prepared.Prepared) -> None:
        """Training images followed by the kept pool images, as PRETRAIN_SET (see the class)."""
        if "train" not in self.images:
            raise ValueError("the pool joins the training images: load 'train' with pool=True")
        images = pool_images(data, self.dataset)
        if images is None:
            return
        train = self.images["train"]
        union = torch.empty((len(train) + len(images), *train.shape[1:]), dtype=torch.uint8)
        union[: len(train)] = train
        union[len(train) :] = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.images["train"] = union[: len(train)]  # a view: the training images are stored once
        self.images[PRETRAIN_SET] = union
        unlabeled = torch.full((len(images),), UNLABELED, dtype=torch.int64)
        self.labels[PRETRAIN_SET] = torch.cat([self.labels["train"], unlabeled])
        self.train_set = PRETRAIN_SET
        self.pool_size = len(images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_dataloader(self) -> DataLoader:
        size = len(self.labels[self.train_set])
        batch = min(self.batch_size, size)
        rank, world = self._rank_and_world()
        sampler = EpochPermutation(
            size, self.seed, self.max_images, self.min_steps * batch, rank, world
        )
        return DataLoader(
            _Positions(size),
            batch_size=max(1, batch // world),  # batch_size is the global batch
            sampler=sampler,
            drop_last=True,
        )

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of processes, (0, 1) outside a DDP Trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def val_dataloader(self) -> DataLoader:
        return self._sequential("val")

    def test_dataloader(self) -> DataLoader:
        return self._sequential("test")

    def _sequential(self, name: str) -> DataLoader:
        if name not in self.labels:
            raise MissingInputError(f"the {name} set was not loaded (sets={self.sets})")
        return DataLoader(_Positions(len(self.labels[name])), batch_size=self.batch_size)
