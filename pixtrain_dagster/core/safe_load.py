"""Loading training checkpoints without unpickling arbitrary objects.

``torch.load(weights_only=False)`` runs whatever a pickle says: anyone with write access to the checkpoint
volume would get code execution in the training pod. Here the restricted unpickler (``weights_only=True``)
accepts tensors, plain containers and numbers, plus the few classes listed in ``SAFE_GLOBALS``; anything else
raises :class:`UnsafeCheckpointError` before a single object of it is built.

Our Lightning checkpoints (model/optimizer/scheduler state, loops, callbacks, the ``pixtrain`` dict) need no
extra class today (checked on a checkpoint written by the tiny-model training, tests/test_safe_load.py). If
a new Lightning or torch version adds one, add that class to ``SAFE_GLOBALS`` after reading what it does.

Use it wherever a checkpoint is read (``core/training.py``: the resume-state read, and pass
``weights_only=True`` to ``Trainer.fit`` so Lightning's own load is restricted the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Classes a checkpoint may contain beyond what torch's weights-only unpickler allows by default.
SAFE_GLOBALS: list[Any] = []


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects outside the allowlist: it is refused, nothing in it was executed."""


def load_checkpoint_safely(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's contents, loaded with torch's weights-only unpickler; never executes pickled code."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refused to load checkpoint {path}: it holds objects outside the safe list ({_first_line(error)}). "
            "Nothing in it was executed. If it came from our own training, a library upgrade added a class: "
            "review it and add it to pixtrain_dagster.core.safe_load.SAFE_GLOBALS; otherwise treat the "
            "volume as tampered with."
        ) from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"checkpoint {path} is a {type(state).__name__}, not a checkpoint dict")
    return state


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
