"""Which checkpoint a (re)started training step resumes from, and a test hook that kills it after one.

Checkpoints live under ``checkpoints/<fingerprint>/step-NNNNNN`` in the checkpoint store. A retry (Dagster
step retry, run retry, or an operator re-materialising) must resume from the newest checkpoint that is
*intact*: a node that died mid-write, a bad disk or a bit flip can leave the newest one with a missing
manifest or a file whose sha256 no longer matches. Such a checkpoint is skipped with a warning (and the
``on_invalid`` callback, which the Dagster layer turns into an audit event) and the previous one is used.

Plain Python, no Dagster import.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MANIFEST_NAME, ArtifactError, ArtifactStore

log = logging.getLogger(__name__)

# Test hook, off by default: after checkpoint step N is published the process SIGKILLs itself, the way an
# OOM kill or a pre-empted node ends a step (no exception handler, no cleanup runs).
KILL_AFTER_CHECKPOINT_ENV = "PIXTRAIN_TEST_KILL_AFTER_CHECKPOINT_STEP"


@dataclass(frozen=True)
class InvalidCheckpoint:
    """A checkpoint folder that exists but cannot be trusted."""

    key: str
    uri: str
    reason: str


InvalidCheckpointHook = Callable[[InvalidCheckpoint], None]


def checkpoint_prefix(fingerprint: str) -> str:
    return f"checkpoints/{fingerprint}"


def checkpoint_candidates(store: ArtifactStore, fingerprint: str) -> list[str]:
    """Every checkpoint folder of this fingerprint, complete or not, newest (highest step) first."""
    prefix = checkpoint_prefix(fingerprint)
    base = store.uri(prefix)
    if store.is_local:
        folder = Path(base)
        names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    else:
        fs = store._fs
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)] if fs.exists(base) else []
    # Zero-padded step numbers: the lexical order is the step order.
    return [f"{prefix}/{n}" for n in sorted((n for n in names if n.startswith("step-")), reverse=True)]


def verify_checkpoint(store: ArtifactStore, key: str) -> str | None:
    """None when the checkpoint's manifest is present and every file matches its sha256, else the reason."""
    if not store.exists(key):
        return f"no {MANIFEST_NAME} (the write never finished, or the manifest was lost)"
    try:
        manifest = store.manifest(key)
        if not manifest.get("files"):
            return f"{MANIFEST_NAME} lists no files"
        store.local_path(key, verify=True)  # local: hashes in place; remote: downloads and hashes
    except (ArtifactError, ValueError, KeyError, OSError) as error:
        return str(error)
    return None


def latest_valid_checkpoint(
    store: ArtifactStore, fingerprint: str, on_invalid: InvalidCheckpointHook | None = None
) -> str | None:
    """Key of the newest checkpoint whose manifest and sha256 verify; damaged newer ones are reported, skipped."""
    for key in checkpoint_candidates(store, fingerprint):
        reason = verify_checkpoint(store, key)
        if reason is None:
            return key
        invalid = InvalidCheckpoint(key=key, uri=store.uri(key), reason=reason)
        log.warning("skipping damaged checkpoint %s: %s; trying the previous one", invalid.uri, reason)
        if on_invalid is not None:
            on_invalid(invalid)
    return None


def kill_after_checkpoint_if_requested(step: int, environ: dict[str, str] | None = None) -> None:
    """The test hook: SIGKILL this process right after checkpoint ``step`` is published, if the env asks."""
    raw = (os.environ if environ is None else environ).get(KILL_AFTER_CHECKPOINT_ENV, "").strip()
    if not raw:
        return
    try:
        wanted = int(raw)
    except ValueError:
        raise ValueError(f"{KILL_AFTER_CHECKPOINT_ENV}={raw!r} must be a step number") from None
    if step == wanted:
        log.warning(
            "%s=%d: killing process %d with SIGKILL after checkpoint step %d",
            KILL_AFTER_CHECKPOINT_ENV,
            wanted,
            os.getpid(),
            step,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
