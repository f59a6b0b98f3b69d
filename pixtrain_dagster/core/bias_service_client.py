"""HTTP client for an external bias-detection service that gives a second opinion on a bias report.

Plain Python on the standard library (urllib): no Dagster, no extra dependency. What is sent is a compact summary of
the report (`summarize_for_service`): probe-set identity, the verdict and per-group numbers. The probes are synthetic
and generated replies are left out, so nothing sent can contain PHI.

Failures: connection errors, timeouts, HTTP 429 and 5xx are retried ``max_retries`` times with exponential backoff;
other HTTP errors are not (retrying would not change the answer). Either way the error names the endpoint. The
bearer token, if any, is read from an environment variable at call time and never stored, logged or put into an
error message.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = "pixtrain.bias-summary/1"
ASSESS_PATH = "/v1/assess"
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class BiasServiceError(RuntimeError):
    """The bias-detection service could not give an assessment; the message names the endpoint and the cause."""


def summarize_for_service(report: dict[str, Any], context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part of a bias report the service needs: identities, verdict, per-group adapter numbers. No texts."""
    probe_set = report["probe_set"]
    metrics: dict[str, Any] = {}
    for metric, data in report["models"]["adapter"]["metrics"].items():
        base_axes = report["models"]["base"]["metrics"][metric]["axes"]
        metrics[metric] = {
            axis: {
                "ratio": summary["ratio"],
                "base_ratio": base_axes[axis]["ratio"],
                "groups": {
                    group: {
                        "mean": stats["mean"],
                        "gap": stats["gap"],
                        "impact_ratio": stats["impact_ratio"],
                        "impact_ratio_ci": stats["impact_ratio_ci"],
                        "impact_ratio_delta_vs_base": report["delta_vs_base"][metric][axis][group][
                            "impact_ratio_delta"
                        ],
                    }
                    for group, stats in summary["groups"].items()
                },
            }
            for axis, summary in data["axes"].items()
        }
    verdict = report["verdict"]
    return {
        "schema": SUMMARY_SCHEMA,
        "context": context or {},
        "probe_set": {k: probe_set.get(k) for k in ("name", "version", "sha256")},
        "verdict": {
            "status": verdict["status"],
            "thresholds": verdict["thresholds"],
            "failures": [
                {k: f[k] for k in ("rule", "metric", "axis", "group", "value", "threshold", "ci")}
                for f in verdict["failures"]
            ],
        },
        "metrics": metrics,
    }


class BiasServiceClient:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 10.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        token_env_var: str | None = "BIAS_SERVICE_TOKEN",
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"bias service endpoint must be an http(s) URL (got {endpoint!r})")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, max_retries and backoff_s >= 0")
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.token_env_var = token_env_var
        self._sleep = sleep

    def assess(self, report: dict[str, Any], context: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST the report's summary to ``{endpoint}/v1/assess`` and return the service's JSON verdict."""
        return self.post_json(ASSESS_PATH, summarize_for_service(report, context))

    def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.endpoint}{path}"
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        attempts = self.max_retries + 1
        last_problem = "no attempt made"
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(url, data=body, method="POST", headers=self._headers())
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return self._decode(url, response.read())
            except urllib.error.HTTPError as error:
                detail = _snippet(error.read())
                last_problem = f"HTTP {error.code} {error.reason}" + (f": {detail}" if detail else "")
                if error.code not in _RETRYABLE_STATUS:
                    raise BiasServiceError(
                        f"bias detection service at {url} rejected the request ({last_problem})"
                    ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
                reason = getattr(error, "reason", error)
                last_problem = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            if attempt < attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "bias service %s attempt %d/%d failed (%s); retrying in %.1fs",
                    url,
                    attempt,
                    attempts,
                    last_problem,
                    delay,
                )
                self._sleep(delay)
        raise BiasServiceError(
            f"bias detection service at {url} failed after {attempts} attempt(s) (timeout {self.timeout_s}s): "
            f"{last_problem}"
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        token = os.environ.get(self.token_env_var) if self.token_env_var else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @staticmethod
    def _decode(url: str, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BiasServiceError(
                f"bias detection service at {url} answered with something that is not JSON: {_snippet(raw)!r}"
            ) from None
        if not isinstance(data, dict):
            raise BiasServiceError(
                f"bias detection service at {url} answered JSON {type(data).__name__}, not an object"
            )
        return data


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text[:limit] + ("..." if len(text) > limit else "")
