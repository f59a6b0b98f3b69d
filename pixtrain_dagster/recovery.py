"""Recovery rules of the Dagster layer: which failures are retried, how, and where GPU steps queue.

* GPU steps (``lora_training``, ``adapter_evaluation``, ``bias_report``) carry ``pool=GPU_POOL``: the
  instance's concurrency pool limit (docker/dagster.yaml, k8s/dagster-values.yaml ``concurrency.pools``)
  bounds how many run at once across *all* runs, however they were launched (UI Materialize, the
  automation sensor, the landing sensor, the schedule, the CLI). The run tag ``pixtrain/gpu`` only the
  ``train_adapter`` job sets is no longer what holds the line.
  Dagster claims a slot by check-then-update, so two steps claiming in the same milliseconds can both
  start, and the slot is freed when the first of them ends (docs/runbook.md says what bounds that).
* They also carry ``gpu_step_retry_policy()``: an infrastructure failure (pre-empted node, OOM-killed or
  SIGKILLed step process, a database or storage blip that outlasted the store's own retries) retries the
  step with exponential backoff and jitter; training resumes from the newest valid checkpoint.
* Errors a retry cannot fix (bad config, bad data, a failed gate) are raised as
  ``Failure(..., allow_retries=False)`` by :func:`no_retry_for_permanent_errors`, so they fail at once.

Settings (read when the code location loads): ``PIXTRAIN_STEP_MAX_RETRIES`` (default 3) and
``PIXTRAIN_STEP_RETRY_DELAY_S`` (default 60, doubled per retry, +-50% jitter).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import Backoff, Failure, Jitter, MetadataValue, RetryPolicy

GPU_POOL = "gpu"
MAX_RETRIES_ENV = "PIXTRAIN_STEP_MAX_RETRIES"
RETRY_DELAY_ENV = "PIXTRAIN_STEP_RETRY_DELAY_S"


def _number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be a number >= {minimum:g}")
    return value


def gpu_step_retry_policy() -> RetryPolicy:
    """Step retries for GPU steps: bounded, exponential backoff with jitter (many steps failing together,
    e.g. a node pool recycled, do not all come back at the same second)."""
    return RetryPolicy(
        max_retries=int(_number(MAX_RETRIES_ENV, 3, 0)),
        delay=_number(RETRY_DELAY_ENV, 60.0, 0),
        backoff=Backoff.EXPONENTIAL,
        jitter=Jitter.PLUS_MINUS,
    )


def permanent_failure(error: BaseException, what: str) -> Failure:
    """A Failure that Dagster does not retry, carrying the original clear message."""
    return Failure(
        description=f"{what}: {error} (not retried: fix the cause and launch again)",
        metadata={"error_type": MetadataValue.text(type(error).__name__), "retryable": False},
        allow_retries=False,
    )


@contextmanager
def no_retry_for_permanent_errors(what: str) -> Iterator[None]:
    """Turn bad-config / bad-data errors (``ValueError`` and subclasses, such as ``DatasetError``) into
    non-retryable Failures; everything else (OSError, crashes, database outages) stays retryable."""
    try:
        yield
    except Failure:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise permanent_failure(error, what) from error
