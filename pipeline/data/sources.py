"""How a dataset's published files are fetched and proven to be the right ones.

Which files a dataset has, and their checksums, is its entry in pipeline.data.datasets.

Each file is tried on every mirror in order (http/https URL, file:// URL or plain folder). The
checksum is taken of the *decoded* content (gunzipped) wherever it is known: Debian recompressed
the Fashion-MNIST archives, so their .gz bytes differ from upstream while the decoded bytes match.
Where only the publisher's archive checksum is known, that one is checked instead. A file is
fetched to ``<name>.part`` and renamed only once verified, so an interrupted or corrupt fetch never
leaves a file that looks complete. A connection that ends before the announced Content-Length is
reported as cut off (not as a checksum mismatch, and never accepted where no checksum is known); a
disk that refuses the ``.part`` file stops the fetch, since another mirror would not help.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.data.datasets import RemoteFile
from pipeline.errors import ChecksumError, FetchError
from pipeline.io import is_disk_error

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class Checksums:
    """Checksums of one file: as stored, and of its decoded content."""

    md5: str
    decoded_md5: str
    size: int

    def verified_by(self, expected: RemoteFile) -> str:
        """Which known checksum this file satisfies; ChecksumError when it satisfies none."""
        if expected.md5 is not None:
            if self.decoded_md5 != expected.md5:
                raise ChecksumError(
                    f"decoded content has md5 {self.decoded_md5}, expected {expected.md5}"
                )
            return "decoded_md5"
        if expected.archive_md5 is not None:
            if self.md5 != expected.archive_md5:
                raise ChecksumError(f"file has md5 {self.md5}, expected {expected.archive_md5}")
            return "archive_md5"
        return "none (no published checksum)"


def checksums(path: Path) -> Checksums:
    """md5 of the file and of its decoded content (gunzipped when it is a gzip file).

    A gzip file that does not decode (bad CRC, truncated) raises ChecksumError.
    """
    raw = hashlib.md5()
    decoded = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            raw.update(chunk)
    if _is_gzip(path):
        try:
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    decoded.update(chunk)
        except (OSError, EOFError, zlib.error) as err:
            raise ChecksumError(f"not a valid gzip file ({err})") from None
    else:
        decoded = raw
    return Checksums(raw.hexdigest(), decoded.hexdigest(), path.stat().st_size)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def mirror_location(mirror: str, name: str) -> str:
    """The URL or path of file ``name`` on ``mirror``."""
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(mirror) / name)


def fetch(expected: RemoteFile, mirrors: tuple[str, ...] | list[str], dest_dir: Path) -> Checksums:
    """Fetch ``expected`` from the first mirror that serves a verified copy into ``dest_dir``.

    Raises FetchError naming every mirror tried and why each failed.
    """
    dest = Path(dest_dir) / expected.name
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    for mirror in mirrors:
        location = mirror_location(mirror, expected.name)
        try:
            _copy_to(location, part)
            sums = checksums(part)
            how = sums.verified_by(expected)
        except ChecksumError as err:
            failures.append(f"{location}: checksum mismatch: {err}")
        except (OSError, urllib.error.URLError, ValueError, http.client.HTTPException) as err:
            if is_disk_error(err):
                _name_part(err, part, dest)
                raise
            failures.append(f"{location}: {_reason(err)}")
        else:
            os.replace(part, dest)
            log.info("fetched %s from %s (verified by %s)", expected.name, location, how)
            return sums
        finally:
            part.unlink(missing_ok=True)
        log.warning("could not use %s", failures[-1])
    tried = "; ".join(failures) or "no mirrors configured"
    raise FetchError(
        f"could not fetch {expected.name}: {tried}. "
        "Check the network or add a working mirror under data.mirrors in params.yaml"
    )


class IncompleteTransfer(ValueError):
    """The server closed the connection before sending all the bytes it announced."""


def _name_part(err: OSError, part: Path, dest: Path) -> None:
    """A refused write of the ``.part`` file is reported as a write of ``dest``."""
    for attr in ("filename", "filename2"):
        if getattr(err, attr) is not None and os.fsdecode(getattr(err, attr)) == str(part):
            setattr(err, attr, str(dest))
    if err.filename is None:
        err.filename = str(dest)


def _reason(err: BaseException) -> str:
    if isinstance(err, IncompleteTransfer):
        return str(err)
    if isinstance(err, http.client.IncompleteRead):
        return f"connection cut off after {len(err.partial)} bytes (incomplete download)"
    if isinstance(err, http.client.HTTPException):
        return f"broken HTTP response ({type(err).__name__}: {err})"
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"unreachable ({err.reason})"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    return f"{type(err).__name__}: {err}"


def _copy_to(location: str, part: Path) -> None:
    """Stream ``location`` (URL or path) into ``part``."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if location.startswith("file://"):
        location = urllib.request.url2pathname(urllib.parse.urlparse(location).path)
    if "://" not in location:
        shutil.copyfile(location, part)
        return
    request = urllib.request.Request(location, headers={"User-Agent": "pipeline-download"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(part, "wb") as out:
        announced = response.headers.get("Content-Length")
        total = int(announced) if announced is not None and announced.isdigit() else None
        received = _stream(response, out, location, total)
    # http.client ends a short read quietly when the server closes early: compare by hand.
    if announced is not None and announced.isdigit() and received != int(announced):
        raise IncompleteTransfer(
            f"connection cut off after {received} of {announced} bytes (incomplete download)"
        )


#: A transfer logs its progress at most this often (and once at its end) ...
PROGRESS_EVERY_S = 5.0
#: ... when it is at least this large: small files arrive before anyone would wait for a line.
PROGRESS_MIN_BYTES = 4 << 20


def _stream(
    response: BinaryIO,
    out: BinaryIO,
    location: str,
    total: int | None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Copy the response into ``out``, logging the bytes received, the rate and the time left
    every PROGRESS_EVERY_S for large files (a slow mirror is otherwise minutes of silence)."""
    started = last = clock()
    received = 0
    large = total is None or total >= PROGRESS_MIN_BYTES
    while chunk := response.read(_CHUNK):
        out.write(chunk)
        received += len(chunk)
        now = clock()
        if large and now - last >= PROGRESS_EVERY_S:
            last = now
            log.info("%s", _progress_line(location, received, total, now - started))
    if large and received >= PROGRESS_MIN_BYTES:
        log.info("%s", _progress_line(location, received, total, clock() - started))
    return received


def _progress_line(location: str, received: int, total: int | None, seconds: float) -> str:
    """``<file>: 13.2 of 26.4 MB (50 %), 3.1 MB/s, 4 s left``."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    rate = received / max(seconds, 1e-9)
    if total:
        left = (total - received) / rate if rate > 0 else float("inf")
        share = f"{received / 1e6:.1f} of {total / 1e6:.1f} MB ({100 * received / total:.0f} %)"
        return f"{name}: {share}, {rate / 1e6:.1f} MB/s, {left:.0f} s left"
    return f"{name}: {received / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s"
