"""A full volume (ENOSPC) at each write of a publish: nothing complete-looking is left, the error names the store.

Fault injection at the I/O primitives the publish goes through (every ``write()`` on a file opened for
writing, every ``os.sendfile`` that ``shutil`` copies with, every ``os.fsync``): a dry run counts them, then
the publish is repeated with ENOSPC raised at the 1st, 2nd, ... Nth one.
"""

from __future__ import annotations

import builtins
import errno
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from pixtrain_dagster.core.artifacts import MANIFEST_NAME, ArtifactStore, ArtifactStoreFull


class _WriteCounter:
    def __init__(self, fail_at: int | None):
        self.fail_at = fail_at
        self.count = 0

    def tick(self, what: str) -> None:
        self.count += 1
        if self.fail_at is not None and self.count == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at write {self.count}: {what})")


class _WritableProxy:
    def __init__(self, handle, counter: _WriteCounter, name: str):
        self._handle, self._counter, self._name = handle, counter, name

    def write(self, data):
        self._counter.tick(f"write {self._name}")
        return self._handle.write(data)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@contextmanager
def disk_full_at(fail_at: int | None, monkeypatch):
    """Raise ENOSPC at the ``fail_at``-th write (None: count only). Yields the counter."""
    counter = _WriteCounter(fail_at)
    real_open, real_sendfile, real_fsync = builtins.open, os.sendfile, os.fsync

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wax+"):
            return _WritableProxy(handle, counter, str(file))
        return handle

    def fake_sendfile(*args, **kwargs):
        counter.tick("sendfile")
        return real_sendfile(*args, **kwargs)

    def fake_fsync(fd):
        counter.tick("fsync")
        return real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", fake_open)
        patch.setattr(os, "sendfile", fake_sendfile)
        patch.setattr(os, "fsync", fake_fsync)
        yield counter


def _write_artifact(folder: Path, version: str) -> None:
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    (folder / "weights" / "adapter.bin").write_bytes(version.encode() * 4096)
    (folder / "config.json").write_text(f'{{"version": "{version}"}}')
    (folder / "README.md").write_text(f"model card {version}\n")


def _complete_looking(root: Path) -> list[str]:
    """Every folder holding a manifest (what readers treat as complete), and stray temporary files."""
    manifests = [p.parent.relative_to(root).as_posix() for p in root.rglob(MANIFEST_NAME)]
    strays = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".tmp-" in p.name]
    return sorted(manifests + strays)


def _publish(store: ArtifactStore, key: str, source: str, version: str, tmp_path: Path, replace=False):
    if source == "staged":
        with store.stage() as folder:
            _write_artifact(folder, version)
            return store.publish(folder, key, replace=replace)
    outside = tmp_path / f"outside-{version}"
    _write_artifact(outside, version)
    return store.publish(outside, key, replace=replace)


@pytest.mark.parametrize("source", ["staged", "outside"])
def test_enospc_at_each_write_of_a_publish_leaves_nothing_complete(tmp_path, monkeypatch, source):
    # Dry run: how many writes does one publish make?
    counting_store = ArtifactStore(tmp_path / "count")
    with disk_full_at(None, monkeypatch) as counter:
        _publish(counting_store, "adapters/a", source, "v1", tmp_path)
    writes = counter.count
    assert writes >= 3, "manifest write + fsyncs at least"

    for fail_at in range(1, writes + 1):
        root = tmp_path / f"store-{fail_at}"
        store = ArtifactStore(root)
        before = _publish(store, "adapters/old", source, "old", tmp_path)  # an earlier artifact, untouched
        with disk_full_at(fail_at, monkeypatch), pytest.raises(ArtifactStoreFull) as raised:
            _publish(store, "adapters/a", source, "v1", tmp_path)
        message = str(raised.value)
        assert raised.value.errno == errno.ENOSPC
        assert f"artifact store {store.root}" in message and "volume /" in message and "adapters/a" in message
        assert not store.exists("adapters/a") and not Path(store.uri("adapters/a")).exists(), fail_at
        assert _complete_looking(root) == ["adapters/old"], fail_at
        assert not [p for p in (root / ".staging").iterdir() if p.name.startswith("publish-")], fail_at
        assert store.ref("adapters/old") == before and store.local_path("adapters/old")  # still verifies
        # Space freed: the same publish now succeeds and verifies.
        ref = _publish(store, "adapters/a", source, "v1", tmp_path)
        assert store.local_path("adapters/a") and ref.file_count == 3


def test_enospc_while_replacing_keeps_the_previous_copy(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    first = _publish(store, "checkpoints/fp/step-000002", "staged", "v1", tmp_path)
    with disk_full_at(None, monkeypatch) as counter:
        _publish(ArtifactStore(tmp_path / "count"), "checkpoints/fp/step-000002", "staged", "v2", tmp_path)
    for fail_at in range(1, counter.count + 1):
        with disk_full_at(fail_at, monkeypatch), pytest.raises(ArtifactStoreFull):
            _publish(store, "checkpoints/fp/step-000002", "staged", "v2", tmp_path, replace=True)
        assert store.ref("checkpoints/fp/step-000002") == first
        store.local_path("checkpoints/fp/step-000002")  # verifies against its manifest


def test_enospc_while_writing_a_pointer_or_a_staged_file(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    store.put_json("promoted/CURRENT.json", {"uri": "old"})
    with disk_full_at(1, monkeypatch), pytest.raises(ArtifactStoreFull, match="promoted/CURRENT.json"):
        store.put_json("promoted/CURRENT.json", {"uri": "new"})
    assert store.get_json("promoted/CURRENT.json") == {"uri": "old"}
    assert _complete_looking(store_root := Path(store.root)) == []
    # A checkpoint written into a staging folder when the disk fills: named, and the staging folder is gone.
    with pytest.raises(ArtifactStoreFull, match=f"artifact store {store.root}"):
        with store.stage() as folder:
            with disk_full_at(1, monkeypatch):
                with open(folder / "checkpoint.ckpt", "wb") as handle:
                    handle.write(b"x" * 100)
    assert not list((store_root / ".staging").iterdir())
