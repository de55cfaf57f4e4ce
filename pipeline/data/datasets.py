"""The datasets the pipeline knows: one entry each, the one list every other place reads.

An entry says where a dataset's files come from and how they become arrays: the published
files with their checksums (fetched from ``data.mirrors.<name>``), or none for a local format
read from ``data.local_path``; its ``reader``, the download stage's decoder for those files
(``pipeline.stages.download.DECODERS`` or ``LOCAL_READERS``); and its class names where the
files do not carry them. The params schema (``data.dataset``, ``data.mirrors``,
``data.local_path``), Snakemake's ``{dataset}`` wildcard, the config's local-path check and the
download stage's dispatch are all read from here, and ``tests/test_registries.py`` ties them.
Adding a dataset is its entry plus its reader (when no existing reader fits).

Plain data only, no numpy or network code: the params schema loader imports this in every
process, including Snakemake's parse of the workflow, and every stage's code depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset as published.

    ``md5`` is of the decoded content (authoritative when known); ``archive_md5`` is of the file as
    the original publisher serves it, used only when the decoded checksum is unknown.
    """

    name: str
    md5: str | None = None
    archive_md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its name in params.yaml, its reader, its published files and class names.

    A dataset without published files is a local format: it is read from ``data.local_path``
    (which params.yaml must then set) and has no mirrors.
    """

    name: str
    reader: str
    files: tuple[RemoteFile, ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def local(self) -> bool:
        """Read from data.local_path rather than fetched: nothing is published to verify."""
        return not self.files


_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: The files of an MNIST-style IDX release, in the order its reader takes them: training images
#: and labels, then test ("t10k") images and labels. Published gzipped (``.gz``); a local folder
#: may hold them either way.
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_release(
    name: str,
    classes: tuple[str, ...],
    md5s: tuple[str | None, ...] = (None,) * 4,
    archive_md5s: tuple[str | None, ...] = (None,) * 4,
) -> DatasetSpec:
    """A published IDX release: the four gzipped files, pinned as RemoteFile pins them."""
    files = tuple(
        RemoteFile(f"{stem}.gz", md5=md5, archive_md5=archive_md5)
        for stem, md5, archive_md5 in zip(IDX_STEMS, md5s, archive_md5s, strict=True)
    )
    return DatasetSpec(name, "idx", files, classes)


#: Every dataset, in the order params.yaml's documentation and error messages list them.
SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _idx_release(
            "fashion_mnist",
            _FASHION_CLASSES,
            md5s=(
                "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                "9018921c3c673c538a1fc5bad174d6f9",
                "8181f5470baa50b63fa0f6fddb340f0a",
                "15d484375f8d13e6eb1aabb0c3f46965",
            ),
        ),
        _idx_release(
            "mnist",
            tuple(str(d) for d in range(10)),
            archive_md5s=(
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        ),
        DatasetSpec(
            "cifar10",
            "cifar10_binary",
            (RemoteFile("cifar-10-binary.tar.gz", archive_md5="c32a1d4ab5d03f1284b67883e8d87530"),),
            _CIFAR10_CLASSES,
        ),
        DatasetSpec(
            "stl10",
            "stl10_binary",
            (RemoteFile("stl10_binary.tar.gz", archive_md5="91f7769df0f17e558f3565bffb0c7dfb"),),
            ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
        ),
        # Local formats: MNIST-style IDX files (the t10k pair optional), and class folders of
        # images of any size and mode.
        DatasetSpec("idx", "idx_folder"),
        DatasetSpec("imagefolder", "image_folder"),
    )
}

#: Every name data.dataset accepts.
NAMES: tuple[str, ...] = tuple(SPECS)
#: Datasets read from data.local_path.
LOCAL: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.local)
#: Datasets fetched from data.mirrors.<name> and verified against their checksums.
REMOTE: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if not spec.local)


def spec(name: str) -> DatasetSpec:
    """The entry of ``name``; an unknown name is one line listing the known ones."""
    if name not in SPECS:
        raise PipelineError(
            f"unknown dataset {name!r}: must be one of {', '.join(NAMES)} "
            "(a new one is an entry in pipeline/data/datasets.py)"
        )
    return SPECS[name]
