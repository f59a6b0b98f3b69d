"""Optional external bias-detection service as a Dagster resource; unconfigured (no endpoint) it does nothing."""

from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from ..core.bias_service_client import BiasServiceClient


class BiasDetectionClient(ConfigurableResource):
    """Second opinion on a bias report from an HTTP service, e.g. ``http://bias-detection.pixelated-prod:8001``."""

    endpoint: str | None = Field(default=None, description="Service base URL; None: not configured, assess skips.")
    timeout_s: float = Field(default=10.0, gt=0, description="Per-attempt connect and read timeout.")
    max_retries: int = Field(default=2, ge=0, le=10, description="Retries on connection errors, timeouts, 429, 5xx.")
    backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles on each retry.")
    token_env_var: str | None = Field(
        default="BIAS_SERVICE_TOKEN",
        description="Environment variable holding a bearer token, read at call time; the token is never in config.",
    )

    @property
    def configured(self) -> bool:
        return bool(self.endpoint)

    def client(self) -> BiasServiceClient:
        if not self.endpoint:
            raise ValueError("BiasDetectionClient has no endpoint configured")
        return BiasServiceClient(
            self.endpoint,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
            token_env_var=self.token_env_var,
        )

    def assess(self, report: dict, context: dict | None = None) -> dict[str, Any] | None:
        """The service's verdict on ``report``, or None when no endpoint is configured.

        Raises ``BiasServiceError`` (naming the endpoint) when the service cannot be reached or rejects the request.
        """
        if not self.configured:
            return None
        return self.client().assess(report, context)
