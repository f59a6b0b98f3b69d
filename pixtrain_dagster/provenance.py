"""Which code produced an artifact: package version and git commit, recorded with every training run."""

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def code_version() -> str:
    try:
        return metadata.version("pixtrain-dagster")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def git_commit() -> str | None:
    """PIXTRAIN_GIT_COMMIT (baked into the image at build time), else the checkout's HEAD, else None."""
    if commit := os.environ.get("PIXTRAIN_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
