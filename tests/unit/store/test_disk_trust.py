"""The diskcache store trusts no row it did not write as bytes: a pickle planted by another
writer in the shared directory is never unpickled (it reads as a corrupt entry and is
deleted), and a directory that group or others may write is refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import diskcache
import pytest

from sam2_shared.errors import StoreUnavailableError
from sam2_shared.store import disk_store, open_store
from sam2_shared.store.base import EmbeddingStore


class Payload:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "pwned"))


def private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "store"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)
    return directory


@pytest.mark.parametrize("planted", ["pickle", "text"])
def test_planted_rows_are_never_decoded(tmp_path: Path, planted: str) -> None:
    directory = private_dir(tmp_path)
    marker = tmp_path / "marker"
    store = open_store(f"diskcache://{directory}")
    assert isinstance(store, EmbeddingStore)
    key = store.embedding_key("ab" * 32)
    with diskcache.Cache(str(directory)) as attacker:  # another writer, default (pickle) disk
        attacker.set(key, Payload(marker) if planted == "pickle" else "some text")
        raw = attacker._sql("SELECT mode FROM Cache WHERE key = ?", (key,)).fetchone()
        assert raw is not None and raw[0] in (1, 3, 4)  # stored as str / text / pickle
    assert store.get_embedding("ab" * 32, "sam2.1/hiera_tiny") is None
    assert not marker.exists()  # the pickle was not executed
    assert store.stats.corrupt == 1
    assert store.blobs.get(key) is None  # and the poisoned row is gone
    store.close()
    # pickle.loads would have run it: the test's payload is real
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "pwned"


def test_bytes_round_trip_still_works(tmp_path: Path) -> None:
    store = open_store(f"diskcache://{private_dir(tmp_path)}")
    store.blobs.put("k", b"\x00\x01" * 10)
    store.blobs.put("big", os.urandom(1 << 20))  # diskcache keeps this one in its own file
    assert store.blobs.get("k") == b"\x00\x01" * 10 and len(store.blobs.get("big")) == 1 << 20
    with pytest.raises(TypeError):
        store.blobs.cache.set("x", {"not": "bytes"})
    store.close()


def test_large_values_are_written_whole(tmp_path: Path) -> None:
    """Values kept in their own files (our writer, not diskcache's, which split them at every
    newline byte) come back byte for byte, also where a culling process removed the file's
    directory."""
    store = open_store(f"diskcache://{private_dir(tmp_path)}")
    payload = b"\n".join(os.urandom(100) for _ in range(10_000))  # 10,000 "lines"
    store.blobs.put("lines", payload)
    assert store.blobs.get("lines") == payload
    (filename,) = store.blobs.cache._sql(
        "SELECT filename FROM Cache WHERE key = ?", ("lines",)).fetchone()
    assert (Path(store.blobs.directory) / filename).read_bytes() == payload
    nested = tmp_path / "culled" / "ab" / "cd.val"
    disk_store._write_new_file(str(nested), payload)  # its directories are made again
    assert nested.read_bytes() == payload
    with pytest.raises(FileExistsError):  # never overwrites another entry's file
        disk_store._write_new_file(str(nested), b"other")
    store.close()


def test_a_parent_removed_while_the_directory_is_made_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process culling an entry removes its emptied parent directories: makedirs can
    find a parent and then fail to make the child in it. The write tries again."""
    real_makedirs = os.makedirs
    failures = []

    def racing_makedirs(name: str, exist_ok: bool = False) -> None:
        if not failures:
            failures.append(name)
            raise FileNotFoundError(name)
        real_makedirs(name, exist_ok=exist_ok)

    monkeypatch.setattr(disk_store.os, "makedirs", racing_makedirs)
    target = tmp_path / "ab" / "cd" / "entry.val"
    disk_store._write_new_file(str(target), b"payload")
    assert failures and target.read_bytes() == b"payload"


def test_a_directory_others_may_write_is_refused(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(StoreUnavailableError):
        open_store(f"diskcache://{directory}")
    # the operator's log says why and how to fix it
    assert "writable by group or others" in caplog.text and "chmod 700" in caplog.text
