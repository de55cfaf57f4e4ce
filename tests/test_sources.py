"""Fetching: mirrors tried in order, content verified, nothing half-written left behind."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from pipeline.data.datasets import SPECS, RemoteFile
from pipeline.data.sources import checksums, fetch
from pipeline.errors import ChecksumError, FetchError
from tests.conftest import FASHION_MNIST_DEBIAN, needs_fashion_mnist

PAYLOAD = b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes([1, 2, 3, 4, 5])


def gz_file(folder: Path, name: str, content: bytes = PAYLOAD, level: int = 9) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(gzip.compress(content, compresslevel=level, mtime=0))
    return path


@pytest.fixture
def expected() -> RemoteFile:
    return RemoteFile("labels.gz", md5=hashlib.md5(PAYLOAD).hexdigest())


@pytest.fixture
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


def test_the_checksum_is_of_the_decoded_content(tmp_path: Path, expected: RemoteFile):
    # Two different compressions of the same bytes (as Debian's recompressed files) both verify.
    fast = checksums(gz_file(tmp_path / "a", "labels.gz", level=1))
    best = checksums(gz_file(tmp_path / "b", "labels.gz", level=9))
    assert fast.md5 != best.md5
    assert fast.verified_by(expected) == best.verified_by(expected) == "decoded_md5"


def test_a_plain_folder_and_a_file_url_are_mirrors(tmp_path: Path, expected: RemoteFile):
    source = gz_file(tmp_path / "mirror", "labels.gz").parent
    for mirror in (str(source), source.as_uri()):
        dest = tmp_path / f"dest-{len(mirror)}"
        dest.mkdir()
        fetch(expected, [mirror], dest)
        assert gzip.decompress((dest / "labels.gz").read_bytes()) == PAYLOAD


def test_http_mirrors_are_tried_in_order(tmp_path: Path, expected: RemoteFile, http_mirror):
    url, served = http_mirror
    gz_file(served / "good", "labels.gz")
    dest = tmp_path / "dest"
    dest.mkdir()
    sums = fetch(expected, [f"{url}/missing", "http://127.0.0.1:9/closed", f"{url}/good"], dest)
    assert sums.decoded_md5 == expected.md5
    assert sorted(p.name for p in dest.iterdir()) == ["labels.gz"]


def test_a_corrupt_mirror_is_skipped_and_the_next_one_used(tmp_path: Path, expected: RemoteFile):
    bad = gz_file(tmp_path / "bad", "labels.gz", content=PAYLOAD[:-1] + b"\x06")
    good = gz_file(tmp_path / "good", "labels.gz")
    dest = tmp_path / "dest"
    dest.mkdir()
    fetch(expected, [str(bad.parent), str(good.parent)], dest)
    assert checksums(dest / "labels.gz").decoded_md5 == expected.md5


def test_when_every_mirror_fails_the_error_names_each(tmp_path: Path, expected: RemoteFile):
    bad = gz_file(tmp_path / "bad", "labels.gz", content=b"something else")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(FetchError) as err:
        fetch(expected, [str(tmp_path / "nowhere"), str(bad.parent)], dest)
    message = str(err.value)
    assert f"{tmp_path / 'nowhere' / 'labels.gz'}: no such file" in message
    assert f"{bad}: checksum mismatch: decoded content has md5" in message
    assert "data.mirrors in params.yaml" in message
    assert list(dest.iterdir()) == []  # no .part, no half file


def test_a_broken_gzip_is_a_checksum_error_not_a_crash(tmp_path: Path, expected: RemoteFile):
    path = gz_file(tmp_path, "labels.gz")
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC trailer
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="not a valid gzip file"):
        checksums(path).verified_by(expected)


def test_a_leftover_part_file_from_an_interrupted_fetch_is_replaced(
    tmp_path: Path, expected: RemoteFile
):
    source = gz_file(tmp_path / "mirror", "labels.gz")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "labels.gz.part").write_bytes(source.read_bytes()[:10])  # a killed download
    fetch(expected, [str(source.parent)], dest)
    assert sorted(p.name for p in dest.iterdir()) == ["labels.gz"]


def test_archive_checksums_are_used_where_no_decoded_one_is_known(tmp_path: Path):
    path = gz_file(tmp_path, "x.gz")
    archive_md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert checksums(path).verified_by(RemoteFile("x.gz", archive_md5=archive_md5)) == "archive_md5"
    with pytest.raises(ChecksumError, match="file has md5"):
        checksums(path).verified_by(RemoteFile("x.gz", archive_md5="0" * 32))


@needs_fashion_mnist
def test_debians_fashion_mnist_matches_the_known_decoded_checksums():
    for remote in SPECS["fashion_mnist"].files:
        sums = checksums(FASHION_MNIST_DEBIAN / remote.name)
        assert sums.verified_by(remote) == "decoded_md5"


def test_a_large_transfer_logs_its_progress_and_a_small_one_stays_quiet(caplog):
    import io
    import itertools

    from pipeline.data import sources

    ticks = itertools.count(step=2.0)  # every read takes 2 s of a fake clock
    payload = bytes(9 << 20)  # 9 MiB, read in 1 MiB chunks
    with caplog.at_level("INFO", logger="pipeline.data.sources"):
        received = sources._stream(
            io.BytesIO(payload),
            io.BytesIO(),
            "http://m/train.gz",
            len(payload),
            clock=lambda: next(ticks),
        )
    assert received == len(payload)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 3, lines  # every 5 s of the transfer, then once at the end
    assert lines[0].startswith("train.gz: ") and "of 9.4 MB" in lines[0] and "s left" in lines[0]
    assert lines[-1].startswith("train.gz: 9.4 of 9.4 MB (100 %)")

    caplog.clear()
    small = bytes(100_000)
    with caplog.at_level("INFO", logger="pipeline.data.sources"):
        sources._stream(
            io.BytesIO(small),
            io.BytesIO(),
            "http://m/labels.gz",
            len(small),
            clock=lambda: next(ticks),
        )
    assert caplog.records == []
