"""Bounded retries with exponential backoff, for calls to services that come back (the metadata database, the
Kubernetes API). Named ``Backoff`` so it is not confused with Dagster's step ``RetryPolicy``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """At most ``max_attempts`` tries; try n+1 waits min(initial_delay_s * 2**(n-1), max_delay_s) after try n."""

    max_attempts: int = 6
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delays(self) -> Iterator[float]:
        """The waits between tries: ``max_attempts - 1`` of them."""
        delay = self.initial_delay_s
        for _ in range(self.max_attempts - 1):
            yield min(delay, self.max_delay_s)
            delay *= 2
