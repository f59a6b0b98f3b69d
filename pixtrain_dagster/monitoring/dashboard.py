"""The Grafana dashboard ``/d/training`` as code.

``python -m pixtrain_dagster.monitoring.dashboard`` writes ``k8s/pixtrain-infra/files/dashboards/training.json``,
which the chart ships as a ConfigMap for the Grafana sidecar; ``tests/monitoring`` checks that the committed
file is what this module generates and runs every query against a real Prometheus.
Plain JSON (Grafana schema 39, Grafana 10/11): no SDK needed, and the file diffs readably.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

UID = "training"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
OUTPUT = Path(__file__).resolve().parents[2] / "k8s" / "pixtrain-infra" / "files" / "dashboards" / "training.json"

# Series selectors shared by the panels; `$asset` narrows to one step type, all by default.
TRAIN = '{asset=~"$asset"}'


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    x: int,
    y: int,
    w: int = 8,
    h: int = 8,
    kind: str = "timeseries",
    description: str = "",
    training: bool = False,
) -> dict[str, Any]:
    panel = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "stat":
        panel["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": "auto",
        }
    # Marks the panels that must return data right after a training run (checked by tests/monitoring).
    panel["pixtrainTraining"] = training  # Grafana ignores unknown panel keys
    return panel


def _row(title: str, y: int) -> dict[str, Any]:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def build_dashboard() -> dict[str, Any]:
    rate = "$__rate_interval"
    panels: list[dict[str, Any]] = [
        _row("Resources", 0),
        _panel(
            "GPU utilisation per pod",
            [(f"pixtrain_gpu_utilization_ratio{TRAIN}", "{{pod}} gpu {{gpu}}")],
            "percentunit",
            0,
            1,
            description="NVML, sampled at each scrape. Absent on nodes without a GPU.",
        ),
        _panel(
            "GPU memory per pod",
            [
                (f"pixtrain_gpu_memory_used_bytes{TRAIN}", "{{pod}} gpu {{gpu}} used"),
                (f"pixtrain_gpu_memory_total_bytes{TRAIN}", "{{pod}} gpu {{gpu}} total"),
            ],
            "bytes",
            8,
            1,
            description="Alert PixtrainGPUMemoryHigh fires above 95% for 5 minutes.",
        ),
        _panel(
            "Process CPU (cores)",
            [(f"rate(pixtrain_process_cpu_seconds_total{TRAIN}[{rate}])", "{{pod}} {{asset}}")],
            "short",
            16,
            1,
            training=True,
        ),
        _panel(
            "Process memory (RSS)",
            [(f"pixtrain_process_resident_memory_bytes{TRAIN}", "{{pod}} {{asset}}")],
            "bytes",
            0,
            9,
            training=True,
        ),
        _panel(
            "Process I/O",
            [
                (f"rate(pixtrain_process_read_bytes_total{TRAIN}[{rate}])", "{{pod}} read"),
                (f"rate(pixtrain_process_written_bytes_total{TRAIN}[{rate}])", "{{pod}} written"),
            ],
            "Bps",
            8,
            9,
            training=True,
        ),
        _panel(
            "Checkpoint save time",
            [
                (
                    f"rate(pixtrain_training_checkpoint_save_seconds_sum{TRAIN}[{rate}])"
                    f" / rate(pixtrain_training_checkpoint_save_seconds_count{TRAIN}[{rate}])",
                    "{{pod}} mean",
                ),
                (f"pixtrain_training_checkpoint_size_bytes{TRAIN} / 1e6", "{{pod}} last size (MB)"),
            ],
            "s",
            16,
            9,
            training=True,
        ),
        _row("Training", 17),
        _panel(
            "Loss",
            [
                (f"pixtrain_training_loss{TRAIN}", "{{pod}} train"),
                (f"pixtrain_training_validation_loss{TRAIN}", "{{pod}} validation"),
            ],
            "short",
            0,
            18,
            training=True,
        ),
        _panel(
            "Tokens per second",
            [
                (f"rate(pixtrain_training_tokens_total{TRAIN}[{rate}])", "{{pod}} all tokens"),
                (f"rate(pixtrain_training_assistant_tokens_total{TRAIN}[{rate}])", "{{pod}} assistant tokens"),
            ],
            "short",
            8,
            18,
            training=True,
        ),
        _panel(
            "MFU",
            [(f"pixtrain_training_mfu_ratio{TRAIN}", "{{pod}}")],
            "percentunit",
            16,
            18,
            description="Model FLOPs utilisation, when the training core reports it.",
        ),
        _panel(
            "Step time vs data wait",
            [
                (
                    f"rate(pixtrain_training_optimizer_step_seconds_sum{TRAIN}[{rate}])"
                    f" / rate(pixtrain_training_optimizer_step_seconds_count{TRAIN}[{rate}])",
                    "{{pod}} optimizer step",
                ),
                (
                    f"rate(pixtrain_training_data_wait_seconds_sum{TRAIN}[{rate}])"
                    f" / rate(pixtrain_training_data_wait_seconds_count{TRAIN}[{rate}])",
                    "{{pod}} data wait",
                ),
                (
                    "histogram_quantile(0.95, sum by (le, pod) "
                    f"(rate(pixtrain_training_optimizer_step_seconds_bucket{TRAIN}[{rate}])))",
                    "{{pod}} step p95",
                ),
            ],
            "s",
            0,
            26,
            training=True,
            description="Data wait close to step time means the GPU waits for data.",
        ),
        _panel(
            "Learning rate and gradient norm",
            [
                (f"pixtrain_training_learning_rate{TRAIN}", "{{pod}} lr"),
                (f"pixtrain_training_grad_norm{TRAIN}", "{{pod}} grad norm"),
            ],
            "short",
            8,
            26,
            training=True,
        ),
        _panel(
            "Progress",
            [
                (f"pixtrain_training_step{TRAIN} / pixtrain_training_max_steps{TRAIN}", "{{pod}} steps done"),
                (f"pixtrain_training_padding_efficiency{TRAIN}", "{{pod}} padding efficiency"),
            ],
            "percentunit",
            16,
            26,
            training=True,
        ),
        _panel(
            "Passes over the data",
            [(f"pixtrain_training_epochs{TRAIN}", "{{pod}}")],
            "short",
            0,
            34,
            w=6,
            h=6,
            kind="stat",
            training=True,
        ),
        _panel(
            "Time since last step",
            [(f"time() - pixtrain_training_last_step_timestamp_seconds{TRAIN}", "{{pod}}")],
            "s",
            6,
            34,
            w=6,
            h=6,
            kind="stat",
            training=True,
            description="Alert PixtrainTrainingStalled fires when this passes the stall limit before max_steps.",
        ),
        _panel(
            "Perplexity",
            [
                (f"pixtrain_training_perplexity{TRAIN}", "{{pod}} train"),
                (f"pixtrain_training_validation_perplexity{TRAIN}", "{{pod}} validation"),
            ],
            "short",
            12,
            34,
            w=12,
            h=6,
            training=True,
        ),
        _row("Pipeline", 40),
        _panel(
            "Runs per job and trigger (24h)",
            [
                (
                    "sum by (dagster_job, trigger) (increase(pixtrain_pipeline_runs_started_total[24h]))",
                    "{{dagster_job}} {{trigger}} started",
                ),
                (
                    "sum by (dagster_job, trigger) (increase(pixtrain_pipeline_runs_succeeded_total[24h]))",
                    "{{dagster_job}} {{trigger}} succeeded",
                ),
                (
                    "sum by (dagster_job, trigger) (increase(pixtrain_pipeline_runs_failed_total[24h]))",
                    "{{dagster_job}} {{trigger}} failed",
                ),
            ],
            "short",
            0,
            41,
        ),
        _panel(
            "Gate failures by check (24h)",
            [
                ("sum by (asset, check) (increase(pixtrain_pipeline_gate_failures_total[24h]))", "{{asset}}:{{check}}"),
            ],
            "short",
            8,
            41,
        ),
        _panel(
            "Time since last promotion",
            [("time() - pixtrain_pipeline_last_promotion_timestamp_seconds", "promoted_adapter")],
            "s",
            16,
            41,
            w=4,
            kind="stat",
        ),
        _panel(
            "Dataset version age",
            [("time() - pixtrain_pipeline_dataset_version_timestamp_seconds", "training_dataset")],
            "s",
            20,
            41,
            w=4,
            kind="stat",
        ),
        _panel(
            "Last run outcome",
            [
                ("pixtrain_run_success", "{{dagster_job}} success"),
                ("pixtrain_run_duration_seconds", "{{dagster_job}} duration (s)"),
                ("pixtrain_run_final_train_loss", "{{dagster_job}} final train loss"),
            ],
            "short",
            0,
            49,
            w=24,
            h=6,
            kind="stat",
            description="Pushed once per run to the Pushgateway.",
        ),
    ]
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "uid": UID,
        "title": "pixtrain training",
        "tags": ["pixtrain", "training", "gpu"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "asset",
                    "label": "Step",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(pixtrain_process_resident_memory_bytes, asset)", "refId": "asset"},
                    "definition": "label_values(pixtrain_process_resident_memory_bytes, asset)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "hide": 0,
                    "sort": 1,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or [str(OUTPUT)])[0])
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
