"""Change detection for the landing location where new chat JSONL files arrive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifacts import ArtifactStore, content_hash

LandingState = dict[str, dict[str, Any]]  # file name -> {"size", "modified", "sha256"}


class LandingPathError(ValueError):
    """A landing entry points outside the landing location (a symlink): refused, never read."""


def landing_files(store: ArtifactStore) -> list[str]:
    """The ``.jsonl`` files in the landing location, refusing any that resolves outside it.

    A symlink (to a file, or a symlinked folder on the way) is accepted only when its target lies inside the
    landing location: otherwise whoever can write the landing folder could make the pipeline read, snapshot
    and train on any file the step can open (another tenant's data, a secret mounted in the pod).
    """
    names = store.list_files(suffix=".jsonl")
    if store.is_local:
        root = Path(store.root).resolve()
        for name in names:
            path = Path(store.uri(name))
            target = path.resolve()
            if not target.is_relative_to(root):
                raise LandingPathError(
                    f"{store.uri(name)} is a symlink (or lies under one) resolving outside the landing location "
                    f"{store.root}; refused. Copy the file into the landing location instead of linking it."
                )
    return names


def scan_landing(store: ArtifactStore, previous: LandingState) -> LandingState:
    """Every ``.jsonl`` file with its sha256; a file whose size and stamp are unchanged is not hashed again."""
    state: LandingState = {}
    for name in landing_files(store):
        info = store.file_info(name)
        known = previous.get(name)
        if known and known["size"] == info["size"] and known["modified"] == info["modified"]:
            state[name] = known
        else:
            state[name] = {**info, "sha256": store.file_sha256(name)}
    return state


def dataset_version(state: LandingState) -> str:
    """The version ``raw_conversations`` will record for a snapshot of exactly these files."""
    return content_hash({name: {"sha256": f["sha256"], "size": f["size"]} for name, f in state.items()})


def changed_files(state: LandingState, previous: LandingState) -> list[str]:
    """Files that are new, changed or removed: a removal (e.g. honouring a data-deletion request) is a new dataset."""
    changed = {name for name, f in state.items() if previous.get(name, {}).get("sha256") != f["sha256"]}
    return sorted(changed | (set(previous) - set(state)))
