"""The assets wire the metrics in: with PIXTRAIN_METRICS_PORT set (as the k8s executor sets it), the training,
evaluation and bias steps of a real in-process run each serve /metrics while they run."""

from __future__ import annotations

import urllib.request

import pytest
from dagster import DagsterInstance
from prometheus_client.parser import text_string_to_metric_families

from .prom_support import free_port
from support import tiny_run_config

pytestmark = pytest.mark.slow


def _scrape(port: int) -> dict[str, float]:
    """{asset: pixtrain_training_step (or -1 when the step serves only the process series)} from one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            asset = sample.labels.get("asset")
            if sample.name == "pixtrain_training_step":
                found[asset] = max(found.get(asset, -1), sample.value)
            elif sample.name == "pixtrain_process_resident_memory_bytes":
                found.setdefault(asset, -1)
    return found


def test_training_evaluation_and_bias_steps_serve_metrics_while_they_run(pipeline_env, tiny_model_dir, monkeypatch):
    """Scraped from inside each step, right after its server starts and right before it stops: deterministic,
    unlike a background poller, which on a loaded 2-core machine sometimes missed a short step entirely."""
    from pixtrain_dagster.core import telemetry
    from pixtrain_dagster.definitions import build_definitions

    port = free_port()
    monkeypatch.setenv("PIXTRAIN_METRICS_PORT", str(port))
    monkeypatch.setenv("PIXTRAIN_METRICS_HOST", "127.0.0.1")
    at_start: dict[str, float] = {}
    at_end: dict[str, float] = {}
    original = telemetry.serve_step_metrics

    class Observed:
        def __init__(self, server):
            self.server = server

        def __enter__(self):
            return self.server.__enter__()

        def __exit__(self, *exc_info):
            at_end.update(_scrape(port))
            return self.server.__exit__(*exc_info)

    def observed_serve_step_metrics(*args, **kwargs):
        server = original(*args, **kwargs)  # listening from here on
        at_start.update(_scrape(port))
        return Observed(server)

    monkeypatch.setattr(telemetry, "serve_step_metrics", observed_serve_step_metrics)
    job = build_definitions().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(run_config=tiny_run_config(tiny_model_dir), instance=DagsterInstance.get())
    assert result.success
    assert set(at_start) == set(at_end) == {"lora_training", "adapter_evaluation", "bias_report"}
    assert at_start["lora_training"] <= 0  # nothing trained yet when the server comes up
    assert at_end["lora_training"] == 4  # TINY_TRAINING_CONFIG: 4 optimizer steps, all counted before it stops
