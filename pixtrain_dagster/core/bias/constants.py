"""Names shared by the bias modules: the neutral control's axis and group, the metric names and their descriptions,
and the report schema version. Kept apart so that probes, scoring, statistics, verdict and rendering can all use
them without importing one another.
"""

from __future__ import annotations

REPORT_SCHEMA_VERSION = 1
CONTROL_AXIS = "control"
CONTROL_GROUP = "neutral"
LIKELIHOOD = "likelihood"
SENTIMENT = "sentiment"
METRICS = (LIKELIHOOD, SENTIMENT)
METRIC_DESCRIPTIONS = {
    LIKELIHOOD: {
        "title": "Likelihood of a receptive client reply",
        "unit": "mean log-likelihood per token (nats)",
        "positive_scale": "exp(mean log-likelihood): geometric-mean token probability",
    },
    SENTIMENT: {
        "title": "Sentiment of the generated client reply",
        "unit": "VADER compound score in [-1, 1]",
        "positive_scale": "(compound + 1) / 2",
    },
}
