"""Gate policy: the promotion gates' thresholds come from the deployment, and a run may only tighten them.

Whoever launches a run (the UI launchpad, a CLI user, a sensor) controls run config; whoever deploys the code
location controls its environment (in the cluster: the ``pixtrain-execution-env`` ConfigMap of
k8s/pixtrain-infra, key ``gatePolicy``). So the limits live in ``PIXTRAIN_GATE_*`` environment variables, read
when a gated step starts, and the run-config fields of the same name may only be stricter: a looser value
fails the step with an error naming the field, the deployed limit and where to change it (``GatePolicyError``),
it is never silently used. The thresholds actually applied are returned as a plain dict, which the Dagster layer
writes into the audit event of every gate decision and promotion.

Plain Python: no Dagster import (tests/test_architecture.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

# Where an operator changes a limit (named in every error).
HOW_TO_CHANGE = (
    "set {env} in the deployed environment (in the cluster: gatePolicy.{key} in k8s/pixtrain-infra values, "
    "published through the pixtrain-execution-env ConfigMap), or leave the run-config field unset to use it"
)

# Same name in the environment of the step (deployed limit) and, lower-cased after the prefix, in values.
ENV_PREFIX = "PIXTRAIN_GATE_"

KNOWN_BIAS_METRICS = ("likelihood", "sentiment")  # core/bias.METRICS (a test checks they agree)


class GatePolicyError(ValueError):
    """A run asked for a looser gate than the deployment allows, or a deployed value is unusable."""


# field -> (env variable, values key, direction). "max": run value must be <= deployed; "min": >= deployed.
_NUMERIC = {
    "max_perplexity_increase": ("PIXTRAIN_GATE_MAX_PERPLEXITY_INCREASE", "maxPerplexityIncrease", "max"),
    "bias_min_ratio": ("PIXTRAIN_GATE_BIAS_MIN_RATIO", "biasMinRatio", "min"),
    "bias_max_regression": ("PIXTRAIN_GATE_BIAS_MAX_REGRESSION", "biasMaxRegression", "max"),
    "bias_min_templates": ("PIXTRAIN_GATE_BIAS_MIN_TEMPLATES", "biasMinTemplates", "min"),
    "min_train_records": ("PIXTRAIN_GATE_MIN_TRAIN_RECORDS", "minTrainRecords", "min"),
    "max_invalid_fraction": ("PIXTRAIN_GATE_MAX_INVALID_FRACTION", "maxInvalidFraction", "max"),
}
_FLAGS = {
    # True is the looser setting: a ratio breach fails only when its whole interval is past the limit.
    "bias_require_significance": ("PIXTRAIN_GATE_BIAS_REQUIRE_SIGNIFICANCE", "biasRequireSignificance"),
}
_GATED_METRICS = ("PIXTRAIN_GATE_BIAS_GATED_METRICS", "biasGatedMetrics")
_FAIL_ON_PREVIOUS = ("PIXTRAIN_GATE_BIAS_FAIL_ON_PREVIOUS_REGRESSION", "biasFailOnPreviousRegression")


@dataclass(frozen=True)
class GatePolicy:
    """The deployed limits. Defaults = the values the gates had before they became deployment policy."""

    # training_sanity: adapter perplexity may exceed the base model's by at most this fraction.
    max_perplexity_increase: float = 0.05
    # bias_gate (core/bias.BiasThresholds): four-fifths rule, regression vs base, which metrics fail.
    bias_min_ratio: float = 0.8
    bias_max_regression: float = 0.10
    bias_gated_metrics: tuple[str, ...] = ("likelihood",)
    bias_require_significance: bool = True
    bias_fail_on_previous_regression: bool = False
    # With one template there is no interval and ratio breaches only warn: fewer templates weaken the gate.
    bias_min_templates: int = 2
    # enough_rows and the curation's invalid-record limit.
    min_train_records: int = 20
    max_invalid_fraction: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        if not self.max_perplexity_increase >= 0:
            problems.append(f"max_perplexity_increase must be >= 0 (got {self.max_perplexity_increase})")
        if not 0 < self.bias_min_ratio <= 1:
            problems.append(f"bias_min_ratio must be in (0, 1] (got {self.bias_min_ratio})")
        if not self.bias_max_regression >= 0:
            problems.append(f"bias_max_regression must be >= 0 (got {self.bias_max_regression})")
        if self.bias_min_templates < 1:
            problems.append(f"bias_min_templates must be >= 1 (got {self.bias_min_templates})")
        if self.min_train_records < 1:
            problems.append(f"min_train_records must be >= 1 (got {self.min_train_records})")
        if not 0 <= self.max_invalid_fraction <= 1:
            problems.append(f"max_invalid_fraction must be in [0, 1] (got {self.max_invalid_fraction})")
        unknown = set(self.bias_gated_metrics) - set(KNOWN_BIAS_METRICS)
        if unknown:
            problems.append(f"bias_gated_metrics: unknown {sorted(unknown)}; choose from {list(KNOWN_BIAS_METRICS)}")
        if problems:
            raise GatePolicyError("invalid deployed gate policy: " + "; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatePolicy:
        """The policy from ``PIXTRAIN_GATE_*`` variables; unset ones keep the defaults above."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, (var, _key, _direction) in _NUMERIC.items():
            raw = env.get(var, "").strip()
            if raw:
                convert = int if types[name] in ("int", int) else float
                try:
                    values[name] = convert(raw)
                except ValueError:
                    raise GatePolicyError(f"{var}={raw!r} is not a number") from None
        for name, (var, _key) in {**_FLAGS, "bias_fail_on_previous_regression": _FAIL_ON_PREVIOUS}.items():
            raw = env.get(var, "").strip().lower()
            if raw:
                if raw not in ("true", "false", "1", "0", "yes", "no"):
                    raise GatePolicyError(f"{var}={raw!r} must be true or false")
                values[name] = raw in ("true", "1", "yes")
        raw = env.get(_GATED_METRICS[0], "").strip()
        if raw:
            values["bias_gated_metrics"] = tuple(m.strip() for m in raw.split(",") if m.strip())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bias_gated_metrics"] = list(self.bias_gated_metrics)
        return data

    # ---- run config may only tighten ----------------------------------------------------------------------

    def _looser(self, field: str, requested: Any, deployed: Any, rule: str, env: str, key: str) -> GatePolicyError:
        return GatePolicyError(
            f"run config {field}={requested!r} is looser than the deployed gate policy "
            f"({field} {rule} {deployed!r}); a run may only tighten a gate. To change the limit, "
            + HOW_TO_CHANGE.format(env=env, key=key)
        )

    def numeric(self, name: str, requested: float | int | None, *, field: str | None = None) -> float | int:
        """The threshold ``name`` to apply: the deployed one, or ``requested`` when it is at least as strict."""
        deployed = getattr(self, name)
        if requested is None:
            return deployed
        env, key, direction = _NUMERIC[name]
        if direction == "max" and requested > deployed:
            raise self._looser(field or name, requested, deployed, "at most", env, key)
        if direction == "min" and requested < deployed:
            raise self._looser(field or name, requested, deployed, "at least", env, key)
        return requested

    def stricter(self, name: str, recorded: float | int) -> float | int:
        """For re-checking a published artifact: the threshold it was gated with, or the deployed one when the
        policy was tightened since."""
        _env, _key, direction = _NUMERIC[name]
        deployed = getattr(self, name)
        return min(recorded, deployed) if direction == "max" else max(recorded, deployed)

    def require_significance(self, requested: bool | None, *, field: str = "require_significance") -> bool:
        deployed = self.bias_require_significance
        if requested is None:
            return deployed
        if requested and not deployed:
            env, key = _FLAGS["bias_require_significance"]
            raise self._looser(field, requested, deployed, "must be", env, key)
        return requested

    def gated_metrics(
        self, requested: list[str] | tuple[str, ...] | None, *, field: str = "gated_metrics"
    ) -> tuple[str, ...]:
        deployed = self.bias_gated_metrics
        if requested is None:
            return deployed
        missing = [m for m in deployed if m not in requested]
        if missing:
            env, key = _GATED_METRICS
            raise GatePolicyError(
                f"run config {field}={list(requested)!r} drops {missing} from the deployed gated metrics "
                f"{list(deployed)!r}; a run may only add metrics to the gate. To change the limit, "
                + HOW_TO_CHANGE.format(env=env, key=key)
            )
        return tuple(dict.fromkeys([*deployed, *requested]))

    def bias_templates(self, requested: int | None, *, field: str = "max_templates") -> int | None:
        """Probe templates scored; None = all (always allowed). Fewer than the deployed minimum is looser."""
        if requested is None:
            return None
        return self.numeric("bias_min_templates", requested, field=field)


def policy_env_names() -> list[str]:
    """Every ``PIXTRAIN_GATE_*`` variable the policy reads (the chart publishes the same list)."""
    return sorted(
        [v[0] for v in _NUMERIC.values()] + [v[0] for v in _FLAGS.values()] + [_GATED_METRICS[0], _FAIL_ON_PREVIOUS[0]]
    )


def policy_override_in_tag(k8s_config_tag: Any) -> bool:
    """Whether a run's ``dagster-k8s/config`` tag mentions a ``PIXTRAIN_GATE_*`` variable.

    Run tags are launcher-controlled too: a tag that sets a policy variable in the pod spec would replace the
    deployed value in the step pod. Gated steps refuse to run under such a tag.
    """
    return ENV_PREFIX in str(k8s_config_tag or "")
