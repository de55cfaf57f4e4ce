"""Atomic writes: a later stage must never read a half-written artifact.

Files are written to a temporary sibling and renamed into place; whole output folders are built in
a temporary sibling folder and swapped in only when every file in them is complete. A process
killed half-way leaves only a ``.<name>.tmp-*`` sibling, which the next run removes. A write that
fails (a full disk, a file-size limit) removes its temporary at once and names the output it was
writing in the error, so the user hears about ``data/splits/x/train.npy``, not a hidden sibling.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where it is used, so the CLI starts without it
    from _hashlib import HASH  # what hashlib.md5() and hashlib.sha256() return

    import numpy as np

_CHUNK = 1 << 20

#: errno values that mean "the disk cannot take this write": no space, quota, file-size limit,
#: read-only file system. They say nothing about the data, so the CLI reports them in one line.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def is_disk_error(err: BaseException) -> bool:
    """Whether ``err`` is a write refused by the file system (see DISK_ERRNOS)."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


def _tmp_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def remove_stale(path: Path) -> None:
    """Delete temporary siblings of ``path`` left behind by an interrupted run.

    Only those of processes that no longer run: a sibling of a live process is its work in
    progress (two writers of one path), and pulling it away would make that process fail.
    """
    if not path.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for stale in path.parent.glob(f".{path.name}.{kind}-*"):
            if not _owner_alive(stale):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(True)


def _owner_alive(sibling: Path) -> bool:
    """Whether the process whose id ends the name of ``sibling`` still runs (not this one)."""
    pid = sibling.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _name_output(err: OSError, tmp: Path, final: Path) -> None:
    """Rewrite the file names of ``err`` from inside ``tmp`` to the matching path in ``final``."""
    for attr in ("filename", "filename2"):
        name = getattr(err, attr)
        if name is None:
            continue
        try:
            relative = Path(os.fsdecode(name)).relative_to(tmp)
        except ValueError:
            continue
        setattr(err, attr, str(final / relative) if relative.parts else str(final))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; on success it replaces ``final``, on error it is removed.

    The old folder stays in place until the new one is complete, so an error (or a full disk)
    leaves the previous outputs untouched. An OSError names the path under ``final`` that was
    being written rather than the temporary folder, which is gone by the time anyone reads it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = _tmp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, final)
    except OSError as err:
        _name_output(err, tmp, final)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``; if the second rename fails, the old folder goes back."""
    old = _tmp_sibling(final, "old")
    if final.exists():
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    On any error the temporary is removed and the OSError names ``path`` (a failed ``write``
    carries no file name of its own).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        err.filename, err.filename2 = str(path), None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    write_bytes(path, text.encode())


def write_json(path: Path, obj: object) -> None:
    """Atomic, deterministic JSON (sorted keys, fixed indent): both runners see equal bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:  # Any: parsed JSON, whose shape each caller checks
    """Parse a JSON file (OSError or ValueError when it is missing or not JSON)."""
    return json.loads(Path(path).read_text())


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic .npy write."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def md5_file(path: Path) -> str:
    return _hash_file(path, hashlib.md5())


def sha256_file(path: Path) -> str:
    return _hash_file(path, hashlib.sha256())


def _hash_file(path: Path, digest: HASH) -> str:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
