"""Backups of the artifact store to a second location (an fsspec URI), and restores that verify.

Layout at the backup URI mirrors the store: ``<backup>/<artifact key>/<files>`` + ``MANIFEST.json``, loose
JSON documents (asset pointers, ``promoted/CURRENT.json``) at their own keys, database dumps under
``postgres/`` (written by the chart's CronJob through :func:`upload_database_dump`), and the status of the
last successful backup in ``_backup/LAST_SUCCESS.json``.

Rules:

* An artifact is copied files first and manifest last, and every file is read back at the destination and
  its sha256 compared with the source manifest before the manifest is written; an interrupted backup
  therefore never leaves a complete-looking copy.
* An artifact whose manifest at the destination already lists the same files and hashes is skipped (the
  backup is incremental); ``verify_existing=True`` re-hashes those copies too and repairs damaged ones.
* A source file that does not match its own manifest is *not* copied over a good backup; it is reported.
* Restores go into an empty store (or a missing key), are verified file by file against the backup
  manifest before they are published, and publish through the store's atomic ``publish``.

Production: an S3-compatible bucket with versioning on (an overwritten or deleted object stays
recoverable). Plain Python, no Dagster import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import _STAGING_DIR, MANIFEST_NAME, ArtifactError, ArtifactStore, sha256_file, verify_folder

log = logging.getLogger(__name__)

BACKUP_URI_ENV = "PIXTRAIN_BACKUP_URI"
STATUS_KEY = "_backup/LAST_SUCCESS.json"
DATABASE_PREFIX = "postgres"
METRIC_NAME = "pixtrain_backup_last_success_timestamp_seconds"
# Not backed up: raw landing data (the input of curation; it may hold PHI and has its own source of truth),
# the store's staging area, and the backup's own bookkeeping.
SKIPPED_PREFIXES = ("landing/", f"{_STAGING_DIR}/", "_backup/", f"{DATABASE_PREFIX}/")
_CHUNK = 1 << 20


class BackupError(RuntimeError):
    """A backup or restore could not be completed or verified; the message names the artifact and file."""


@dataclass
class BackupResult:
    destination: str
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    documents_copied: list[str] = field(default_factory=list)
    source_corrupt: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    files_verified: int = 0
    finished_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RestoreResult:
    restored: list[str] = field(default_factory=list)
    documents_restored: list[str] = field(default_factory=list)
    files_verified: int = 0


# ---- small fsspec helpers ------------------------------------------------------------------------------


class _Location:
    """A root URI opened with fsspec: local folders, s3://, memory://, ..."""

    def __init__(self, uri: str):
        import fsspec

        uri = os.fspath(uri)
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        self.root = root.rstrip("/")

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open(self.path(key), "rb") as handle:
            return handle.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as handle:
            handle.write(data)

    def sha256(self, key: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        with self.fs.open(self.path(key), "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def manifest(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.read_bytes(f"{key}/{MANIFEST_NAME}"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def all_files(self) -> list[str]:
        """Keys of every file under the root, relative, sorted."""
        self.fs.invalidate_cache()  # s3fs caches listings per process; a backup must see the store as it is now
        if not self.fs.exists(self.root):
            return []
        prefix = self.root + "/"
        return sorted(p[len(prefix) :] for p in self.fs.find(self.root) if p.startswith(prefix))

    def rm(self, key: str) -> None:
        try:
            self.fs.rm(self.path(key))
        except FileNotFoundError:
            pass


def _same_content(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Two manifests describe the same artifact (same files, sizes and hashes), whatever their timestamps."""
    return bool(a and b) and a.get("content_sha256") == b.get("content_sha256") and a.get("files") == b.get("files")


def inventory(files: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split a file listing into (artifact keys: folders holding a manifest, loose documents outside them)."""
    files = [f for f in files if not f.startswith(SKIPPED_PREFIXES) and "/." not in f"/{f}"]
    artifacts = sorted({f[: -len(MANIFEST_NAME) - 1] for f in files if f.endswith("/" + MANIFEST_NAME)})
    inside = tuple(a + "/" for a in artifacts)
    documents = sorted(f for f in files if not f.startswith(inside) and f.endswith(".json"))
    return artifacts, documents


# ---- backup --------------------------------------------------------------------------------------------


def backup_store(
    source: ArtifactStore,
    destination_uri: str,
    *,
    verify_existing: bool = False,
    result: BackupResult | None = None,
    on_artifact: Callable[[str, str], None] | None = None,
) -> BackupResult:
    """Copy every published artifact and pointer document of ``source`` to ``destination_uri``; verify them."""
    src, dst = _Location(source.root), _Location(destination_uri)
    result = result or BackupResult(destination=dst.uri)
    artifacts, documents = inventory(src.all_files())
    for key in artifacts:
        outcome = _backup_artifact(src, dst, key, verify_existing, result)
        log.info("backup %s: %s", key, outcome)
        if on_artifact:
            on_artifact(key, outcome)
    # Pointers last: a restored pointer never names an artifact the backup does not hold.
    for key in documents:
        data = src.read_bytes(key)
        digest = hashlib.sha256(data).hexdigest()
        if dst.exists(key) and dst.sha256(key)[0] == digest:
            continue
        dst.write_bytes(key, data)
        if dst.sha256(key)[0] != digest:
            raise BackupError(f"backup of {key} to {dst.uri} did not verify (sha256 differs after upload)")
        result.documents_copied.append(key)
        result.files_verified += 1
    return result


def _backup_artifact(src: _Location, dst: _Location, key: str, verify_existing: bool, result: BackupResult) -> str:
    manifest = src.manifest(key)
    if manifest is None:
        raise BackupError(f"{src.uri}/{key}/{MANIFEST_NAME} is unreadable")
    existing = dst.manifest(key)
    repairing = False
    if _same_content(existing, manifest):
        if not verify_existing:
            result.skipped.append(key)
            return "unchanged"
        # Deep mode: the source is re-hashed too, so silent damage in the store is found while a good copy exists.
        if _damaged_files(src, key, manifest):
            result.source_corrupt.append(key)
            log.error("%s/%s is damaged in the source store; its backup copy is kept", src.uri, key)
            return "source corrupt"
        if not _damaged_files(dst, key, manifest):
            result.skipped.append(key)
            return "unchanged"
        repairing = True
    # The source must match its own manifest: never replace a good backup with a damaged copy.
    damaged = _damaged_files(src, key, manifest)
    if damaged:
        result.source_corrupt.append(key)
        log.error("not backing up %s: %s", key, damaged[0])
        return "source corrupt"
    if existing is not None:
        dst.rm(f"{key}/{MANIFEST_NAME}")  # invalidate the old copy before its files change
    for rel, expected in manifest["files"].items():
        target = dst.path(f"{key}/{rel}")
        dst.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        with src.fs.open(src.path(f"{key}/{rel}"), "rb") as reader, dst.fs.open(target, "wb") as writer:
            while chunk := reader.read(_CHUNK):
                writer.write(chunk)
        result.bytes_copied += expected["size"]
    damaged = _damaged_files(dst, key, manifest)
    if damaged:
        raise BackupError(f"backup of {key} to {dst.uri} did not verify: {damaged[0]}")
    result.files_verified += len(manifest["files"])
    dst.write_bytes(f"{key}/{MANIFEST_NAME}", json.dumps(manifest, indent=2, sort_keys=True).encode())
    (result.repaired if repairing else result.copied).append(key)
    return "repaired" if repairing else "copied"


def _damaged_files(location: _Location, key: str, manifest: dict[str, Any]) -> list[str]:
    problems = []
    for rel, expected in manifest["files"].items():
        try:
            digest, size = location.sha256(f"{key}/{rel}")
        except FileNotFoundError:
            problems.append(f"{location.uri}/{key}/{rel} is missing")
            continue
        if (digest, size) != (expected["sha256"], expected["size"]):
            problems.append(f"{location.uri}/{key}/{rel} does not match the manifest sha256")
    return problems


def verify_backup(destination_uri: str) -> dict[str, list[str]]:
    """Re-hash every artifact at the backup location: ``{artifact key: [problems]}`` for the damaged ones."""
    dst = _Location(destination_uri)
    artifacts, _ = inventory(dst.all_files())
    problems = {}
    for key in artifacts:
        manifest = dst.manifest(key)
        found = _damaged_files(dst, key, manifest) if manifest else [f"{key}/{MANIFEST_NAME} is unreadable"]
        if found:
            problems[key] = found
    return problems


def run_backup(
    stores: Iterable[ArtifactStore],
    destination_uri: str,
    *,
    verify_existing: bool = False,
    now: Callable[[], float] = time.time,
) -> BackupResult:
    """Back up each store (artifact store, then the checkpoint store if separate) and record the success."""
    result = BackupResult(destination=_Location(destination_uri).uri)
    seen = set()
    for store in stores:
        if store.root in seen:
            continue
        seen.add(store.root)
        backup_store(store, destination_uri, verify_existing=verify_existing, result=result)
    if result.source_corrupt:
        raise BackupError(
            f"backup to {result.destination} incomplete: {len(result.source_corrupt)} artifact(s) do not match "
            f"their own manifest in the source store and were not copied: {', '.join(result.source_corrupt)}"
        )
    result.finished_at = now()
    _Location(destination_uri).write_bytes(STATUS_KEY, json.dumps(result.to_dict(), indent=2).encode())
    return result


# ---- backup age, for the BackupStale alert ------------------------------------------------------------------


def last_backup_success_timestamp(destination_uri: str) -> float | None:
    """Unix time of the last successful artifact backup at ``destination_uri`` (None: never)."""
    location = _Location(destination_uri)
    try:
        return float(json.loads(location.read_bytes(STATUS_KEY))["finished_at"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def prometheus_text(timestamp: float | None) -> str:
    """The gauge in Prometheus text format (for a node-exporter textfile collector or a /metrics handler)."""
    value = "NaN" if timestamp is None else repr(float(timestamp))
    return (
        f"# HELP {METRIC_NAME} Unix time of the last successful pixtrain artifact backup.\n"
        f"# TYPE {METRIC_NAME} gauge\n{METRIC_NAME} {value}\n"
    )


def write_metric_textfile(path: str | os.PathLike[str], timestamp: float | None) -> Path:
    """Atomically write the gauge to ``path`` (``*.prom``, node-exporter's textfile collector format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(prometheus_text(timestamp))
    os.replace(tmp, path)
    return path


# ---- restore -------------------------------------------------------------------------------------------


def list_backup(destination_uri: str) -> tuple[list[str], list[str]]:
    """(artifact keys, document keys) held at the backup location."""
    return inventory(_Location(destination_uri).all_files())


def restore(
    backup_uri: str,
    target: ArtifactStore,
    *,
    keys: Iterable[str] | None = None,
    prefix: str | None = None,
    allow_non_empty: bool = False,
) -> RestoreResult:
    """Bring artifacts back from ``backup_uri`` into ``target`` and verify each one.

    ``keys``: the artifact (or document) keys to restore; None means everything (under ``prefix`` if given).
    Restoring everything requires an empty target store unless ``allow_non_empty``; a single key is never
    restored over a complete copy that already exists.
    """
    src = _Location(backup_uri)
    artifacts, documents = inventory(src.all_files())
    if prefix:
        wanted_prefix = prefix.strip("/") + "/"
        artifacts = [a for a in artifacts if a.startswith(wanted_prefix)]
        documents = [d for d in documents if d.startswith(wanted_prefix)]
    if keys is not None:
        keys = [k.strip("/") for k in keys]
        unknown = [k for k in keys if k not in artifacts and k not in documents]
        if unknown:
            raise BackupError(f"not in the backup at {src.uri}: {', '.join(unknown)} (list it with `restore --list`)")
        artifacts = [a for a in artifacts if a in keys]
        documents = [d for d in documents if d in keys]
    elif not allow_non_empty:
        present, _ = inventory(_Location(target.root).all_files()) if _Location(target.root).exists("") else ([], [])
        if present:
            raise BackupError(
                f"target store {target.root} is not empty ({len(present)} artifact(s), e.g. {present[0]}); restore "
                "everything into an empty store, or name the artifacts to restore"
            )
    result = RestoreResult()
    for key in artifacts:
        if target.exists(key):
            raise BackupError(f"{target.uri(key)} already exists; move it away before restoring it")
        manifest = src.manifest(key)
        if manifest is None:
            raise BackupError(f"{src.uri}/{key}/{MANIFEST_NAME} is missing or unreadable: that copy is incomplete")
        with target.stage() as folder:
            for rel in manifest["files"]:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                src.fs.get_file(src.path(f"{key}/{rel}"), str(folder / rel))
            try:
                verify_folder(folder, manifest)
            except ArtifactError as error:
                raise BackupError(f"backup copy of {key} at {src.uri} is damaged: {error}") from None
            ref = target.publish(folder, key, extra=manifest.get("extra"))
        if ref.sha256 != manifest["content_sha256"]:
            raise BackupError(
                f"restored {key} has content sha256 {ref.sha256}, backup says {manifest['content_sha256']}"
            )
        target.local_path(key, verify=True)  # read back from the target store itself
        result.restored.append(key)
        result.files_verified += len(manifest["files"])
    for key in documents:  # pointers after the artifacts they point at
        data = src.read_bytes(key)
        _Location(target.root).write_bytes(key, data)
        if _Location(target.root).sha256(key)[0] != hashlib.sha256(data).hexdigest():
            raise BackupError(f"restored document {key} did not verify")
        result.documents_restored.append(key)
        result.files_verified += 1
    return result


# ---- metadata database dumps (written by the chart's CronJob) ------------------------------------------------


def upload_database_dump(
    dump_file: str | os.PathLike[str],
    backup_uri: str,
    *,
    keep: int = 14,
    name: str | None = None,
    now: Callable[[], float] = time.time,
) -> str:
    """Upload a ``pg_dump -Fc`` file to ``<backup>/postgres/``, verify it, then prune to the newest ``keep``.

    The dump is uploaded under a temporary name and verified before it gets its final name, so a listing
    never shows a partial dump as the newest one. Returns the key of the dump.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")
    dump_file = Path(dump_file)
    if not dump_file.is_file() or dump_file.stat().st_size == 0:
        raise BackupError(f"database dump {dump_file} is missing or empty; did pg_dump fail?")
    with open(dump_file, "rb") as handle:
        if handle.read(5) != b"PGDMP":
            raise BackupError(f"{dump_file} is not a pg_dump custom-format (-Fc) archive")
    location = _Location(backup_uri)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now()))
    key = f"{DATABASE_PREFIX}/{name or 'pixtrain-metadata'}-{stamp}.dump"
    expected = sha256_file(dump_file)
    partial = f"{DATABASE_PREFIX}/.partial-{stamp}.dump"
    location.fs.makedirs(location.path(DATABASE_PREFIX), exist_ok=True)
    location.fs.put_file(str(dump_file), location.path(partial))
    if location.sha256(partial)[0] != expected:
        location.rm(partial)
        raise BackupError(f"uploaded dump {location.uri}/{partial} did not verify")
    location.fs.put_file(str(dump_file), location.path(key))
    location.write_bytes(f"{key}.sha256", f"{expected}  {posixpath.basename(key)}\n".encode())
    location.rm(partial)
    if location.sha256(key)[0] != expected:
        raise BackupError(f"uploaded dump {location.uri}/{key} did not verify")
    for old in list_database_dumps(backup_uri)[:-keep]:
        location.rm(old)
        location.rm(f"{old}.sha256")
    return key


def list_database_dumps(backup_uri: str) -> list[str]:
    """Keys of the database dumps at the backup location, oldest first (timestamps sort)."""
    location = _Location(backup_uri)
    return sorted(
        f for f in location.all_files() if f.startswith(f"{DATABASE_PREFIX}/") and f.endswith(".dump") and "/." not in f
    )


def fetch_database_dump(backup_uri: str, key: str | None, destination: str | os.PathLike[str]) -> Path:
    """Download a dump (default: the newest) and check it against its ``.sha256`` file."""
    location = _Location(backup_uri)
    dumps = list_database_dumps(backup_uri)
    if not dumps:
        raise BackupError(f"no database dumps under {location.uri}/{DATABASE_PREFIX}/")
    key = key or dumps[-1]
    destination = Path(destination)
    location.fs.get_file(location.path(key), str(destination))
    recorded = location.read_bytes(f"{key}.sha256").decode().split()[0]
    if sha256_file(destination) != recorded:
        raise BackupError(f"{location.uri}/{key} does not match its recorded sha256; try an older dump")
    return destination
