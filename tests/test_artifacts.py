"""The artifact store: atomic publish, manifests that catch corruption, object-store semantics."""

import json
import os

import pytest

from pixtrain_dagster.core.artifacts import MANIFEST_NAME, ArtifactError, ArtifactStore


def make_folder(path, files):
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    return path


def test_publish_writes_files_and_a_verifying_manifest(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    ref = store.publish(make_folder(tmp_path / "src", {"a.txt": "alpha", "sub/b.txt": "beta"}), "things/one")
    manifest = json.loads((tmp_path / "root/things/one" / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"a.txt", "sub/b.txt"}
    assert ref.sha256 == manifest["content_sha256"] and ref.file_count == 2 and ref.size_bytes == 9
    assert store.local_path("things/one").joinpath("sub/b.txt").read_text() == "beta"
    # The content hash depends on content only, not on when or where it was written.
    other = ArtifactStore(tmp_path / "other").publish(
        make_folder(tmp_path / "src2", {"a.txt": "alpha", "sub/b.txt": "beta"}), "x"
    )
    assert other.sha256 == ref.sha256


def test_corruption_is_detected_and_named(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    store.publish(make_folder(tmp_path / "src", {"w.bin": "weights"}), "m")
    (tmp_path / "root/m/w.bin").write_text("weightz")
    with pytest.raises(ArtifactError, match=r"w\.bin does not match its manifest"):
        store.local_path("m")


def test_crash_during_publish_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "root")
    real_rename = os.rename

    def crash_on_final_rename(src, dst):
        if str(dst).endswith("adapters/a1"):
            raise OSError("simulated crash before the artifact became visible")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_final_rename)
    with pytest.raises(OSError, match="simulated crash"):
        store.publish(make_folder(tmp_path / "src", {"adapter.safetensors": "x" * 1000}), "adapters/a1")
    assert not store.exists("adapters/a1")
    assert not (tmp_path / "root/adapters/a1").exists()
    assert store.list("adapters") == []
    with pytest.raises(ArtifactError, match="missing or incomplete"):
        store.local_path("adapters/a1")


def test_folder_without_manifest_is_not_listed(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    store.publish(make_folder(tmp_path / "src", {"f": "1"}), "ckpt/step-000002")
    make_folder(tmp_path / "root/ckpt/step-000004", {"f": "half-written"})  # e.g. a foreign partial copy
    assert store.list("ckpt") == ["ckpt/step-000002"]


def test_existing_artifact_is_kept_unless_replaced(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    first = store.publish(make_folder(tmp_path / "a", {"f": "one"}), "k")
    assert store.publish(make_folder(tmp_path / "b", {"f": "two"}), "k") == first
    replaced = store.publish(make_folder(tmp_path / "c", {"f": "three"}), "k", replace=True)
    assert replaced.sha256 != first.sha256 and (tmp_path / "root/k/f").read_text() == "three"


def test_staged_folder_is_moved_not_copied(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    with store.stage() as folder:
        (folder / "big.bin").write_bytes(b"0" * 4096)
        inode = (folder / "big.bin").stat().st_ino
        store.publish(folder, "moved")
    assert (tmp_path / "root/moved/big.bin").stat().st_ino == inode
    assert list((tmp_path / "root/.staging").iterdir()) == []


def test_invalid_keys_are_rejected(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    for key in ("", "../escape", "a/../../b"):
        with pytest.raises(ValueError, match="invalid artifact key"):
            store.uri(key)


def test_object_store_root_publishes_manifest_last_and_downloads_verified(tmp_path):
    store = ArtifactStore("memory://pixtrain-test-bucket/artifacts", cache_dir=tmp_path / "cache")
    written = []
    fs = store._fs
    real_put = fs.put_file
    fs.put_file = lambda src, dst, **kw: (written.append(dst), real_put(src, dst, **kw))[1]
    try:
        ref = store.publish(make_folder(tmp_path / "src", {"a.json": "{}", "b.txt": "b"}), "reports/r1")
    finally:
        fs.put_file = real_put
    assert store.exists("reports/r1") and ref.uri == "memory://pixtrain-test-bucket/artifacts/reports/r1"
    assert all(not w.endswith(MANIFEST_NAME) for w in written)  # manifest is written after every file
    local = store.local_path("reports/r1")
    assert (local / "b.txt").read_text() == "b" and local.is_relative_to(tmp_path / "cache")
    assert store.list("reports") == ["reports/r1"]
    store.put_json("pointers/p.json", {"uri": ref.uri})
    assert store.get_json("pointers/p.json") == {"uri": ref.uri}
    fs.rm(f"{ref.uri}/{MANIFEST_NAME}")
    assert not store.exists("reports/r1")
