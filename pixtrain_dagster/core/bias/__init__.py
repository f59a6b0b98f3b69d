"""Counterfactual bias probes for a model that plays a THERAPY CLIENT, and the statistics behind the bias gate.

One module per stage; each module's docstring explains its part (probe direction, metrics, statistics, verdict,
cost):
- ``constants.py``: control axis and group, metric names and descriptions, report schema version;
- ``probes.py``: the probe set (``bias_probes.json`` next to it), its loading, validation and sha256;
- ``scoring.py``: per-probe values of one model (likelihood of reference replies, sentiment of greedy replies);
- ``statistics.py``: bootstrap over templates, group means, gaps, impact ratios, deltas, ``build_report``;
- ``verdict.py``: ``BiasThresholds`` and ``evaluate_verdict`` (pass/fail with one reason per breach);
- ``rendering.py``: the report as Markdown, and the model card's limitations section;
- ``report.py``: end to end, ``BiasSettings`` and ``run_bias_report`` (load, score base and adapter, report).

The names below are the package's public interface; import them from ``pixtrain_dagster.core.bias``.
Plain Python: no Dagster imports; torch, transformers, peft and vaderSentiment are imported inside functions.
"""

from .constants import (
    CONTROL_AXIS,
    CONTROL_GROUP,
    LIKELIHOOD,
    METRIC_DESCRIPTIONS,
    METRICS,
    REPORT_SCHEMA_VERSION,
    SENTIMENT,
)
from .probes import PROBE_SET_PATH, ProbeSet, ProbeSetError, ProbeTemplate, canonical_sha256, load_probe_set
from .rendering import limitations_markdown, render_markdown
from .report import BiasSettings, run_bias_report
from .scoring import ModelBiasScores, score_model, score_prompts
from .statistics import bootstrap_cluster_weights, build_report, positive_scale
from .verdict import BiasThresholds, evaluate_verdict

__all__ = [
    "CONTROL_AXIS",
    "CONTROL_GROUP",
    "LIKELIHOOD",
    "METRICS",
    "METRIC_DESCRIPTIONS",
    "PROBE_SET_PATH",
    "REPORT_SCHEMA_VERSION",
    "SENTIMENT",
    "BiasSettings",
    "BiasThresholds",
    "ModelBiasScores",
    "ProbeSet",
    "ProbeSetError",
    "ProbeTemplate",
    "bootstrap_cluster_weights",
    "build_report",
    "canonical_sha256",
    "evaluate_verdict",
    "limitations_markdown",
    "load_probe_set",
    "positive_scale",
    "render_markdown",
    "run_bias_report",
    "score_model",
    "score_prompts",
]
