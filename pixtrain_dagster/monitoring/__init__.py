"""Monitoring glue of the Dagster layer: the Grafana dashboard (as code), run-outcome pushes and pipeline
metrics (docs/monitoring.md). The in-step metrics live in ``pixtrain_dagster.core.telemetry``."""
