"""The statistics of the bias report: positive scales, template-cluster bootstrap weights, per-axis samples of
group means, percentile intervals, paired deltas, and `build_report`, which assembles the JSON report of an adapter
against its base model (and a previous report) and attaches the verdict. numpy is imported inside the functions.

Statistics, per metric and axis (the control is reported for context, never part of an axis)
- group mean over probes; gap = group mean - mean of the axis' group means (natural units: nats/token, compound);
- positive scale for ratios: likelihood -> exp(mean log-lik), the geometric-mean token probability in (0, 1];
  sentiment -> (compound + 1) / 2 in [0, 1]. Impact ratio of a group = its positive score / the axis' highest;
  the axis ratio is the lowest impact ratio (the four-fifths rule asks for >= 0.8);
- 95% percentile-bootstrap intervals, resampling TEMPLATES with replacement (all reference replies of a drawn
  template come with it, because they share one context and are not independent). One set of resampling weights
  per (metric, axis), shared by all groups and by the base, adapter and previous models, so every difference is a
  paired comparison. Deterministic for a seed. Fewer than 2 templates: intervals are ``None``;
- change against the base model (adapter - base) and against a previous adapter report when its probe set matches.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from .constants import (
    CONTROL_AXIS,
    CONTROL_GROUP,
    LIKELIHOOD,
    METRIC_DESCRIPTIONS,
    METRICS,
    REPORT_SCHEMA_VERSION,
    SENTIMENT,
)
from .probes import ProbeSet
from .scoring import ModelBiasScores
from .verdict import BiasThresholds, evaluate_verdict


def positive_scale(metric: str, value: Any) -> Any:
    """Map a metric onto a positive scale where ratios mean something (works on floats and numpy arrays)."""
    import numpy as np

    if metric == LIKELIHOOD:
        return np.exp(value)
    if metric == SENTIMENT:
        return (np.asarray(value) + 1.0) / 2.0
    raise ValueError(f"unknown metric {metric!r}")


def bootstrap_cluster_weights(n_clusters: int, resamples: int, seed: int, *stream: str):
    """(resamples, n_clusters) counts: how often each cluster is drawn when resampling clusters with replacement.

    ``stream`` names select independent, order-independent random streams (e.g. metric and axis) from one seed.
    """
    import numpy as np

    rng = np.random.default_rng([seed, *(zlib.crc32(s.encode()) for s in stream)])
    return rng.multinomial(n_clusters, [1.0 / n_clusters] * n_clusters, size=resamples).astype(float)


def _clusters(probe_ids: Sequence[str]) -> tuple[list[str], list[int]]:
    """Template of every probe id ("template#reply" -> template) and the cluster index of each probe."""
    names: list[str] = []
    index_of: dict[str, int] = {}
    membership = []
    for probe_id in probe_ids:
        name = probe_id.split("#", 1)[0]
        if name not in index_of:
            index_of[name] = len(names)
            names.append(name)
        membership.append(index_of[name])
    return names, membership


class _AxisSample:
    """Group means of one model on one axis and metric: the point estimate and its bootstrap replicates."""

    def __init__(
        self,
        metric: str,
        groups: list[str],
        values: dict[str, list[float]],
        membership: list[int],
        n_clusters: int,
        weights: Any,
    ):
        import numpy as np

        matrix = np.array([values[g] for g in groups], dtype=float)  # (groups, probes)
        indicator = np.zeros((len(membership), n_clusters))
        indicator[np.arange(len(membership)), membership] = 1.0
        sums, counts = matrix @ indicator, indicator.sum(0)  # per-cluster sums (groups, clusters) and sizes
        self.metric = metric
        self.n_probes = len(membership)
        self.means = sums.sum(1) / counts.sum()
        self.boot_means = (sums @ weights.T) / (weights @ counts)  # (groups, resamples)

    def gaps(self, means):
        return means - means.mean(0, keepdims=True)

    def impact_ratios(self, means):
        import numpy as np

        positive = positive_scale(self.metric, means)
        highest = np.broadcast_to(positive.max(0, keepdims=True), positive.shape)
        # Every group at zero (sentiment -1 throughout) is parity, not 0/0.
        return np.divide(positive, highest, out=np.ones_like(positive), where=highest > 0)


def _interval(replicates: Any, confidence: float, available: bool) -> list[float] | None:
    import numpy as np

    if not available:
        return None
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return [float(low), float(high)]


def _comparable_previous(previous: dict[str, Any] | None, adapter: ModelBiasScores) -> tuple[bool, str]:
    if previous is None:
        return False, "no previous report given"
    if previous.get("probe_set", {}).get("sha256") != adapter.probe_set_sha256:
        return False, "the previous report used a different probe set"
    raw = previous.get("raw", {}).get("adapter")
    if not raw:
        return False, "the previous report has no per-probe adapter values"
    for metric in METRICS:
        if raw["probe_ids"].get(metric) != adapter.probe_ids.get(metric):
            return False, f"the previous report scored different {metric} probes (templates or generation count)"
        for axis, groups in adapter.values.get(metric, {}).items():
            if set(raw["values"].get(metric, {}).get(axis, {})) != set(groups):
                return False, f"the previous report has different groups on axis {axis!r}"
    return True, "same probe set and probes"


def build_report(
    base: ModelBiasScores,
    adapter: ModelBiasScores,
    previous: dict[str, Any] | None = None,
    thresholds: BiasThresholds | None = None,
    seed: int = 0,
    resamples: int = 1000,
    confidence: float = 0.95,
    probe_set: ProbeSet | None = None,
) -> dict[str, Any]:
    """The JSON-serialisable bias report of an adapter against its base model (and a previous report), with verdict."""
    import numpy as np

    thresholds = thresholds or BiasThresholds()
    if base.probe_set_sha256 != adapter.probe_set_sha256 or base.probe_ids != adapter.probe_ids:
        raise ValueError("base and adapter were scored on different probes; score both with the same ProbeSet")
    comparable, why = _comparable_previous(previous, adapter)
    previous_scores = ModelBiasScores.from_dict(previous["raw"]["adapter"]) if comparable else None
    scored = {"base": base, "adapter": adapter}

    models: dict[str, Any] = {name: {"seconds": round(s.seconds, 3), "metrics": {}} for name, s in scored.items()}
    delta_vs_base: dict[str, Any] = {}
    delta_vs_previous: dict[str, Any] = {}
    for metric in METRICS:
        probe_ids = adapter.probe_ids.get(metric, [])
        if not probe_ids:
            continue
        cluster_names, membership = _clusters(probe_ids)
        has_interval = len(cluster_names) >= 2
        for name, scores in scored.items():
            control = scores.values[metric][CONTROL_AXIS][CONTROL_GROUP]
            models[name]["metrics"][metric] = {
                "control": {
                    "n": len(control),
                    "mean": float(np.mean(control)),
                    "positive": float(positive_scale(metric, float(np.mean(control)))),
                },
                "axes": {},
            }
        delta_vs_base[metric], delta_vs_previous[metric] = {}, {}
        for axis, group_values in adapter.values[metric].items():
            if axis == CONTROL_AXIS:
                continue
            groups = list(group_values)
            weights = bootstrap_cluster_weights(len(cluster_names), resamples, seed, metric, axis)
            samples = {
                name: _AxisSample(metric, groups, s.values[metric][axis], membership, len(cluster_names), weights)
                for name, s in scored.items()
            }
            for name, sample in samples.items():
                control_mean = models[name]["metrics"][metric]["control"]["mean"]
                models[name]["metrics"][metric]["axes"][axis] = _axis_summary(
                    sample, groups, control_mean, confidence, has_interval
                )
            delta_vs_base[metric][axis] = _paired_deltas(
                samples["adapter"], samples["base"], groups, confidence, has_interval
            )
            if previous_scores is not None:
                earlier = _AxisSample(
                    metric, groups, previous_scores.values[metric][axis], membership, len(cluster_names), weights
                )
                delta_vs_previous[metric][axis] = _paired_deltas(
                    samples["adapter"], earlier, groups, confidence, has_interval
                )

    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "probe_set": {
            **(probe_set.describe() if probe_set else {}),
            "sha256": adapter.probe_set_sha256,
            "probe_ids": adapter.probe_ids,
        },
        "statistics": {
            "seed": seed,
            "resamples": resamples,
            "confidence": confidence,
            "resampling_unit": "template (paired across groups and models)",
        },
        "metrics": {m: METRIC_DESCRIPTIONS[m] for m in METRICS if adapter.probe_ids.get(m)},
        "models": models,
        "delta_vs_base": delta_vs_base,
        "delta_vs_previous": {
            "comparable": comparable,
            "reason": why,
            "metrics": delta_vs_previous if comparable else {},
        },
        "raw": {"base": base.to_dict(), "adapter": adapter.to_dict()},
    }
    report["verdict"] = evaluate_verdict(report, thresholds)
    return report


def _axis_summary(
    sample: _AxisSample, groups: list[str], control_mean: float, confidence: float, has_interval: bool
) -> dict[str, Any]:
    means, boot = sample.means[:, None], sample.boot_means
    gaps, boot_gaps = sample.gaps(means)[:, 0], sample.gaps(boot)
    ratios, boot_ratios = sample.impact_ratios(means)[:, 0], sample.impact_ratios(boot)
    lowest, highest = int(ratios.argmin()), int(ratios.argmax())
    return {
        "ratio": float(ratios.min()),
        "ratio_ci": _interval(boot_ratios.min(0), confidence, has_interval),
        "lowest_group": groups[lowest],
        "highest_group": groups[highest],
        "mean_of_groups": float(means.mean()),
        "groups": {
            group: {
                "n": sample.n_probes,
                "mean": float(means[i, 0]),
                "mean_ci": _interval(boot[i], confidence, has_interval),
                "positive": float(positive_scale(sample.metric, float(means[i, 0]))),
                "gap": float(gaps[i]),
                "gap_ci": _interval(boot_gaps[i], confidence, has_interval),
                "gap_to_control": float(means[i, 0] - control_mean),
                "impact_ratio": float(ratios[i]),
                "impact_ratio_ci": _interval(boot_ratios[i], confidence, has_interval),
            }
            for i, group in enumerate(groups)
        },
    }


def _paired_deltas(
    newer: _AxisSample, older: _AxisSample, groups: list[str], confidence: float, has_interval: bool
) -> dict[str, Any]:
    """Per group: newer - older of mean, gap and impact ratio, with intervals from the shared resampling weights."""
    point_new, point_old = newer.means[:, None], older.means[:, None]
    mean_delta = newer.boot_means - older.boot_means
    gap_delta = newer.gaps(newer.boot_means) - older.gaps(older.boot_means)
    ratio_delta = newer.impact_ratios(newer.boot_means) - older.impact_ratios(older.boot_means)
    point_mean = (point_new - point_old)[:, 0]
    point_gap = (newer.gaps(point_new) - older.gaps(point_old))[:, 0]
    point_ratio = (newer.impact_ratios(point_new) - older.impact_ratios(point_old))[:, 0]
    return {
        group: {
            "mean_delta": float(point_mean[i]),
            "mean_delta_ci": _interval(mean_delta[i], confidence, has_interval),
            "gap_delta": float(point_gap[i]),
            "gap_delta_ci": _interval(gap_delta[i], confidence, has_interval),
            "impact_ratio_delta": float(point_ratio[i]),
            "impact_ratio_delta_ci": _interval(ratio_delta[i], confidence, has_interval),
        }
        for i, group in enumerate(groups)
    }
