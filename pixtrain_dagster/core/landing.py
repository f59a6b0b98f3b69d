"""Change detection for the landing location where new chat JSONL files arrive."""

from __future__ import annotations

from typing import Any

from .artifacts import ArtifactStore, content_hash

LandingState = dict[str, dict[str, Any]]  # file name -> {"size", "modified", "sha256"}


def scan_landing(store: ArtifactStore, previous: LandingState) -> LandingState:
    """Every ``.jsonl`` file with its sha256; a file whose size and stamp are unchanged is not hashed again."""
    state: LandingState = {}
    for name in store.list_files(suffix=".jsonl"):
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
