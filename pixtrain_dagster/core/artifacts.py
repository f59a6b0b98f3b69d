"""Artifact store: every artifact is a folder of files published atomically with a sha256 manifest.

The root is a local folder, a mounted volume (PVC) or an fsspec URI (``s3://bucket/prefix``, ``memory://`` in
tests). Steps hand artifacts to each other only through this store, because step pods share no disk.

Atomicity: an artifact counts as complete only when its ``MANIFEST.json`` exists and matches the files.
On a local or mounted filesystem the folder is staged under ``.staging/`` on the same filesystem and
renamed into place, so a crash leaves at most a stray staging folder, never a half-written artifact at the
final path. On object stores (no rename) the files are uploaded first and the manifest last, so readers
never see a manifest before all its files exist.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "MANIFEST.json"
_STAGING_DIR = ".staging"
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not match its manifest."""


# Errors that mean "the volume is full" (disk or quota), as opposed to a bug or a permission problem.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ArtifactStoreFull(OSError):
    """The store's volume ran out of space (ENOSPC / EDQUOT) while writing; nothing complete-looking was left.

    An OSError, so Dagster's step retry policy retries it (after someone frees space or grows the volume).
    """


def _volume_of(path: str) -> str:
    """The mount point holding ``path`` (the volume an operator must grow or clean)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    probe = probe.resolve()
    while not os.path.ismount(probe) and probe != probe.parent:
        probe = probe.parent
    return str(probe)


def _free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact lives and what it contains; small enough to pass between steps as JSON."""

    uri: str
    sha256: str  # hash of the manifest's file list, i.e. of the whole artifact's content
    size_bytes: int
    file_count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactRef:
        return cls(**{k: data[k] for k in ("uri", "sha256", "size_bytes", "file_count")})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """sha256 and size of every file under ``folder`` (sorted, so the content hash is reproducible)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"content_sha256": content_hash(files), "files": files, "created_at": time.time(), "extra": extra or {}}


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """Hash of a file listing ``{relative name: {"sha256", "size"}}``: the identity of an artifact's content."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _is_local(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


class ArtifactStore:
    """Publishes and fetches artifact folders under one root. Plain Python: usable in any pod."""

    def __init__(self, root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None):
        root = os.fspath(root)
        self.is_local = _is_local(root)
        if self.is_local:
            root = str(Path(root.removeprefix("file://")).expanduser().resolve())
        self.root = root.rstrip("/")
        # Remote artifacts are downloaded here before use; local ones are read in place.
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "pixtrain-artifact-cache")

    # ---- addressing -------------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        key = key.strip("/")
        if not key or ".." in key.split("/"):
            raise ValueError(f"invalid artifact key {key!r}: use a relative path like 'adapters/abc123'")
        return f"{self.root}/{key}"

    @property
    def _fs(self):
        import fsspec  # imported lazily: only remote roots need it

        return fsspec.core.url_to_fs(self.root)[0]

    # ---- writing ----------------------------------------------------------------------------------
    def _full_error(self, error: OSError, doing: str, where: str | None = None) -> ArtifactStoreFull:
        """ENOSPC/EDQUOT turned into an error that names the store, the volume and what was being written."""
        if self.is_local:
            volume = _volume_of(where or self.root)
            free = _free_bytes(volume)
            place = f"volume {volume}" + (f" ({free} bytes free)" if free is not None else "")
        else:
            place = "the object store"
        full = ArtifactStoreFull(
            error.errno,
            f"no space left on {place} of artifact store {self.root} while {doing} "
            f"({os.strerror(error.errno or errno.ENOSPC)}); nothing was published. Free space or grow the "
            "volume (PVC) behind it, then retry the step",
        )
        full.filename = getattr(error, "filename", None)
        return full

    @contextmanager
    def stage(self) -> Iterator[Path]:
        """A private folder to write an artifact into; nothing is visible to readers until `publish`."""
        base = Path(self.root) / _STAGING_DIR if self.is_local else self.cache_dir / _STAGING_DIR
        base.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="stage-", dir=base))
        try:
            yield folder
        except OSError as error:
            if error.errno in _FULL_ERRNOS and not isinstance(error, ArtifactStoreFull):
                raise self._full_error(error, f"writing a staged artifact in {folder}", str(base)) from error
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(
        self, folder: Path, key: str, extra: dict[str, Any] | None = None, replace: bool = False
    ) -> ArtifactRef:
        """Write ``folder``'s files as artifact ``key`` atomically, with a manifest. Returns its reference.

        A folder from `stage()` on a local root is moved, not copied, so it is gone afterwards.

        Publishing the same key twice keeps the first complete copy unless ``replace`` is set: artifact
        keys are content- or config-addressed, so an existing complete copy is the same artifact.
        """
        folder = Path(folder)
        manifest = build_manifest(folder, extra)
        if not manifest["files"]:
            raise ArtifactError(f"refusing to publish empty artifact {key!r} from {folder}")
        target = self.uri(key)
        if not replace and self.exists(key):
            return self.ref(key)
        try:
            if self.is_local:
                self._publish_local(folder, Path(target), manifest)
            else:
                self._publish_remote(folder, target, manifest)
        except OSError as error:
            # A full volume: the partial copy is already gone (local) or has no manifest (remote), so
            # nothing looks complete; say which store and volume filled up.
            if error.errno in _FULL_ERRNOS and not isinstance(error, ArtifactStoreFull):
                raise self._full_error(error, f"publishing {key!r}") from error
            raise
        return self._ref_from_manifest(target, manifest)

    def _publish_local(self, folder: Path, target: Path, manifest: dict[str, Any]) -> None:
        staging = Path(self.root) / _STAGING_DIR / f"publish-{uuid.uuid4().hex}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            if folder.resolve().is_relative_to(staging.parent):
                os.rename(folder, staging)  # staged by `stage()` on this filesystem: move, don't copy gigabytes
            else:
                # File by file, not shutil.copytree: copytree keeps going after an error (a full disk) and
                # then raises a shutil.Error without an errno.
                for rel in manifest["files"]:
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / rel, staging / rel)
            _write_json_atomic(staging / MANIFEST_NAME, manifest)
            _fsync_tree(staging)
        except BaseException:
            # Disk full, I/O error, interrupted: drop the half-built copy (it never reached the final path).
            shutil.rmtree(staging, ignore_errors=True)
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # `replace=True`: move the old copy aside first; rename cannot replace a non-empty folder.
            trash = Path(self.root) / _STAGING_DIR / f"replaced-{uuid.uuid4().hex}"
            os.rename(target, trash)
            os.rename(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, target)

    def _publish_remote(self, folder: Path, target: str, manifest: dict[str, Any]) -> None:
        fs = self._fs
        if fs.exists(f"{target}/{MANIFEST_NAME}"):
            fs.rm(f"{target}/{MANIFEST_NAME}")  # invalidate the old copy before overwriting its files
        for rel in manifest["files"]:
            fs.put_file(str(folder / rel), f"{target}/{rel}")
        with fs.open(f"{target}/{MANIFEST_NAME}", "w") as handle:  # last: marks the artifact complete
            handle.write(json.dumps(manifest, indent=2, sort_keys=True))

    def put_json(self, key: str, payload: Any) -> str:
        """Small JSON document (pointers, reports) written atomically; returns its URI."""
        target = self.uri(key)
        text = json.dumps(payload, indent=2, sort_keys=True, default=str)
        try:
            if self.is_local:
                _write_text_atomic(Path(target), text)
            else:
                with self._fs.open(target, "w") as handle:  # single-object PUT is atomic on object stores
                    handle.write(text)
        except OSError as error:
            if error.errno in _FULL_ERRNOS and not isinstance(error, ArtifactStoreFull):
                raise self._full_error(error, f"writing {key!r}") from error
            raise
        return target

    def get_json(self, key: str) -> Any:
        target = self.uri(key)
        try:
            if self.is_local:
                return json.loads(Path(target).read_text())
            with self._fs.open(target, "r") as handle:
                return json.loads(handle.read())
        except FileNotFoundError as error:
            raise ArtifactError(f"no JSON document at {target}") from error

    # ---- reading ----------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """True only for a complete artifact (its manifest is present)."""
        target = self.uri(key)
        if self.is_local:
            return (Path(target) / MANIFEST_NAME).is_file()
        return self._fs.exists(f"{target}/{MANIFEST_NAME}")

    def list(self, prefix: str) -> list[str]:
        """Keys of the complete artifacts directly under ``prefix``, sorted."""
        base = self.uri(prefix)
        if self.is_local:
            folder = Path(base)
            names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        else:
            fs = self._fs
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)] if fs.exists(base) else []
        return sorted(f"{prefix.strip('/')}/{n}" for n in names if self.exists(f"{prefix.strip('/')}/{n}"))

    def list_files(self, suffix: str = "") -> list[str]:
        """Keys of all plain files under the root ending in ``suffix`` (a landing folder's inputs), sorted."""
        if self.is_local:
            root = Path(self.root)
            paths = (
                [p.relative_to(root).as_posix() for p in root.rglob(f"*{suffix}") if p.is_file()]
                if root.is_dir()
                else []
            )
        else:
            fs = self._fs
            base = fs._strip_protocol(self.root).rstrip("/")
            paths = [p[len(base) + 1 :] for p in fs.find(self.root)] if fs.exists(self.root) else []
            paths = [p for p in paths if p.endswith(suffix)]
        return sorted(p for p in paths if not p.startswith(_STAGING_DIR + "/") and not p.endswith(MANIFEST_NAME))

    def file_info(self, key: str) -> dict[str, Any]:
        """Size and modification stamp of one plain file: cheap change detection before hashing."""
        if self.is_local:
            stat = Path(self.uri(key)).stat()
            return {"size": stat.st_size, "modified": str(stat.st_mtime_ns)}
        info = self._fs.info(self.uri(key))
        stamp = (
            info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("created")
        )
        return {"size": info["size"], "modified": str(stamp)}

    def file_sha256(self, key: str) -> str:
        if self.is_local:
            return sha256_file(Path(self.uri(key)))
        digest = hashlib.sha256()
        with self._fs.open(self.uri(key), "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def put_file(self, source: Path, key: str) -> str:
        """Copy one plain file in atomically (a landing-folder watcher never sees half of it); returns its URI."""
        target = self.uri(key)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(target).with_name(f".{Path(target).name}.tmp-{uuid.uuid4().hex}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        else:
            self._fs.put_file(str(source), target)  # single-object PUT is atomic on object stores
        return target

    def fetch_file(self, key: str, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if self.is_local:
            shutil.copyfile(self.uri(key), destination)
        else:
            self._fs.get_file(self.uri(key), str(destination))

    def manifest(self, key: str) -> dict[str, Any]:
        target = self.uri(key)
        try:
            if self.is_local:
                return json.loads((Path(target) / MANIFEST_NAME).read_text())
            with self._fs.open(f"{target}/{MANIFEST_NAME}", "r") as handle:
                return json.loads(handle.read())
        except FileNotFoundError as error:
            raise ArtifactError(
                f"artifact {target} is missing or incomplete (no {MANIFEST_NAME}); materialise its asset again"
            ) from error

    def ref(self, key: str) -> ArtifactRef:
        return self._ref_from_manifest(self.uri(key), self.manifest(key))

    @staticmethod
    def _ref_from_manifest(uri: str, manifest: dict[str, Any]) -> ArtifactRef:
        files = manifest["files"]
        return ArtifactRef(
            uri=uri,
            sha256=manifest["content_sha256"],
            size_bytes=sum(f["size"] for f in files.values()),
            file_count=len(files),
        )

    def key_of(self, uri: str) -> str:
        if not uri.startswith(self.root + "/"):
            raise ArtifactError(f"{uri} is not under this artifact store's root {self.root}")
        return uri[len(self.root) + 1 :]

    def local_path(self, key: str, verify: bool = True) -> Path:
        """A local folder holding the artifact's files, verified against the manifest.

        Local roots are read in place; remote artifacts are downloaded once into the cache, keyed by content hash.
        """
        manifest = self.manifest(key)
        if self.is_local:
            folder = Path(self.uri(key))
        else:
            folder = self.cache_dir / manifest["content_sha256"]
            if (folder / MANIFEST_NAME).is_file():
                try:
                    if verify:
                        verify_folder(folder, manifest)
                    return folder
                except ArtifactError:  # a damaged cache copy: drop it and download again
                    shutil.rmtree(folder, ignore_errors=True)
            partial = folder.with_name(folder.name + f".partial-{uuid.uuid4().hex}")
            fs = self._fs
            for rel in manifest["files"]:
                (partial / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{self.uri(key)}/{rel}", str(partial / rel))
            try:
                # Checked before it enters the cache: a download that overlapped a republish never gets cached.
                verify_folder(partial, manifest)
                _write_json_atomic(partial / MANIFEST_NAME, manifest)
                os.rename(partial, folder)
            except OSError:  # another process finished the same download first
                pass
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            return folder
        if verify:
            verify_folder(folder, manifest)
        return folder


def verify_folder(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise ArtifactError naming the first file whose size or sha256 differs from the manifest."""
    for rel, expected in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
            raise ArtifactError(f"{path} does not match its manifest sha256; the artifact is corrupt")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. ENOSPC: no stray half-written temporary file
        raise


def _write_json_atomic(path: Path, payload: Any) -> None:
    _write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
