"""A real scrape: a tiny-model training run serves /metrics, a real Prometheus on 127.0.0.1 scrapes it every
second, and the tests read the training series back through Prometheus's HTTP API. Every PromQL expression of
the dashboard and the alert rules runs against that Prometheus; run outcomes and pipeline metrics travel through
a real Pushgateway. One Prometheus, one Pushgateway and one training run serve the whole module."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.request

import pytest
import yaml

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.settings import RuntimeSettings
from pixtrain_dagster.core.telemetry import MetricsServer, StepTelemetry, training_metrics_callback
from pixtrain_dagster.core.training import train_lora_adapter
from pixtrain_dagster.monitoring.dashboard import build_dashboard
from pixtrain_dagster.monitoring.pipeline import push_pipeline_metrics, push_run_outcome, run_outcome

from .prom_support import Prometheus, Pushgateway, free_port, http_get, monitoring_objects, tool, wait_for
from support import SAMPLE_DATASET, tiny_training_settings

pytestmark = pytest.mark.slow

MAX_STEPS = 12
SETTINGS = tiny_training_settings(
    max_steps=MAX_STEPS,
    checkpoint_every_n_steps=4,
    validate_every_n_steps=6,
    seed=3,
)
STEP = '{job="pixtrain-step"}'


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """(prometheus, pushgateway, metrics server, training result): training finished, all of it scraped."""
    workdir = tmp_path_factory.mktemp("monitoring")
    rules = monitoring_objects()["PrometheusRule"]["spec"]
    rules_file = workdir / "pixtrain.rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))
    telemetry = StepTelemetry("lora_training", "tiny-llama")
    server = MetricsServer(telemetry, port=0, host="127.0.0.1", max_idle_seconds=600).start()
    gateway = Pushgateway(workdir)
    prometheus = Prometheus(
        workdir,
        {"pixtrain-step": f"127.0.0.1:{server.port}", "pushgateway": gateway.address},
        rule_files=[rules_file],
        honor_labels_jobs=("pushgateway",),
    )
    try:
        wait_for(lambda: prometheus.query(f"up{STEP} == 1"), 30, "the first scrape of the step")
        callback = training_metrics_callback(telemetry, fingerprint="f00d")
        rows = load_conversations(SAMPLE_DATASET)
        result = train_lora_adapter(
            store=ArtifactStore(workdir / "artifacts"),
            base_snapshot_dir=tiny_model_dir,
            base_model_sha256="base",
            dataset_sha256="data",
            train_conversations=rows[:40],
            validation_conversations=rows[40:46],
            settings=SETTINGS,
            runtime=RuntimeSettings(device="cpu", wandb_mode="disabled"),
            base_model_name="models/tiny-llama",
            extra_callbacks=[callback],
        )
        wait_for(
            lambda: prometheus.query(f"pixtrain_training_step{STEP} == {MAX_STEPS}"),
            30,
            "Prometheus to scrape the last step",
        )
        time.sleep(2)  # a couple more scrapes after the end, so rates over the run have samples on both sides
        yield prometheus, gateway, server, result
    finally:
        prometheus.stop()
        gateway.stop()
        server.stop()


def _value(prometheus, expr: str) -> float:
    result = prometheus.query(expr)
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


def test_training_series_are_scraped_with_sane_values(stack):
    prometheus, _, _, result = stack
    assert result.final_step == MAX_STEPS
    labels = prometheus.query(f"pixtrain_training_step{STEP}")[0]["metric"]
    assert {labels[k] for k in ("asset", "model", "fingerprint")} == {"lora_training", "tiny-llama", "f00d"}
    # steps increase over the run, as Prometheus recorded them
    # Steps never go back, and the last one was scraped. (In fresh-clone CI runs the scrapes during this tiny-model
    # CPU training returned nothing twice, keeping only [11, 12, 12, 12] and [12, 12, 12]; the pipeline test in
    # test_step_metrics_in_pipeline.py sees steps while training runs.)
    series = prometheus.query_range(f"pixtrain_training_step{STEP}", time.time() - 900, time.time())[0]["values"]
    steps = [float(v) for _, v in series]
    assert steps == sorted(steps) and steps[-1] == MAX_STEPS
    loss = _value(prometheus, f"pixtrain_training_loss{STEP}")
    assert math.isfinite(loss) and 0 < loss < 20
    assert _value(prometheus, f"pixtrain_training_perplexity{STEP}") == pytest.approx(math.exp(loss), rel=1e-6)
    validation = _value(prometheus, f"pixtrain_training_validation_loss{STEP}")
    assert math.isfinite(validation) and validation > 0
    assert 0 < _value(prometheus, f"pixtrain_training_learning_rate{STEP}") <= SETTINGS.learning_rate
    assert _value(prometheus, f"pixtrain_training_grad_norm{STEP}") > 0
    assert 0 < _value(prometheus, f"pixtrain_training_padding_efficiency{STEP}") <= 1
    assert _value(prometheus, f"pixtrain_training_max_steps{STEP}") == MAX_STEPS
    # 12 steps x 2 micro-batches x 2 rows over 40 conversations (packed into fewer rows): more than one pass
    assert _value(prometheus, f"pixtrain_training_epochs{STEP}") > 1
    tokens = _value(prometheus, f"pixtrain_training_tokens_total{STEP}")
    assistant = _value(prometheus, f"pixtrain_training_assistant_tokens_total{STEP}")
    assert 0 < assistant < tokens
    assert tokens == result.trained_tokens or assistant == result.trained_tokens  # the module's own counter
    assert _value(prometheus, f"pixtrain_training_tokens_per_second{STEP}") > 0
    assert _value(prometheus, f"pixtrain_training_optimizer_step_seconds_count{STEP}") == MAX_STEPS
    assert _value(prometheus, f"pixtrain_training_data_wait_seconds_count{STEP}") == MAX_STEPS
    assert _value(prometheus, f"pixtrain_training_data_wait_seconds_sum{STEP}") < _value(
        prometheus, f"pixtrain_training_optimizer_step_seconds_sum{STEP}"
    )
    assert _value(prometheus, f"pixtrain_training_checkpoint_save_seconds_count{STEP}") == len(result.checkpoints) == 3
    assert _value(prometheus, f"pixtrain_training_checkpoint_size_bytes{STEP}") > 1000
    assert 0 <= time.time() - _value(prometheus, f"pixtrain_training_last_step_timestamp_seconds{STEP}") < 120
    assert _value(prometheus, f"pixtrain_process_resident_memory_bytes{STEP}") > 50e6
    assert _value(prometheus, f"pixtrain_process_cpu_seconds_total{STEP}") > 0
    # no NVML on this machine: GPU series are absent, not zero, and nothing failed
    assert prometheus.query('{__name__=~"pixtrain_gpu_.*"}') == []


def test_exposition_passes_promtool_check_metrics(stack):
    _, _, server, _ = stack
    status, text = http_get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200 and "pixtrain_training_last_step_timestamp_seconds" in text
    result = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )  # no lint findings


def test_healthz_reports_recent_progress(stack):
    _, _, server, _ = stack
    status, body = http_get(f"http://127.0.0.1:{server.port}/healthz")
    assert status == 200 and body.startswith("ok")


def _dashboard_queries() -> list[tuple[str, str, bool]]:
    found = []
    for panel in build_dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$asset", ".*")
            found.append((panel["title"], expr, panel.get("pixtrainTraining", False)))
    return found


def test_every_dashboard_query_runs_and_training_panels_return_data(stack):
    prometheus = stack[0]
    empty_training = []
    for title, expr, training in _dashboard_queries():
        assert "$" not in expr, f"{title}: unreplaced variable in {expr}"
        result = prometheus.query(expr)  # raises on a PromQL error
        if training and not result:
            empty_training.append(f"{title}: {expr}")
    assert not empty_training, "training panels without data:\n" + "\n".join(empty_training)


def test_every_alert_expression_runs_and_prometheus_loaded_the_rules(stack):
    prometheus = stack[0]
    rules = monitoring_objects()["PrometheusRule"]["spec"]
    for group in rules["groups"]:
        for rule in group["rules"]:
            prometheus.query(rule["expr"])  # raises on a PromQL error
    status, body = http_get(f"{prometheus.url}/api/v1/rules")
    loaded = json.loads(body)["data"]["groups"]
    states = {r["name"]: r for g in loaded for r in g["rules"]}
    assert set(states) == {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert all(r["health"] != "err" for r in states.values()), {n: r.get("lastError") for n, r in states.items()}
    # a healthy, just-finished run fires none of the training alerts
    assert states["PixtrainTrainingStalled"]["state"] == "inactive"


# ---- pushes through a real Pushgateway, from a real Dagster instance ---------------------------------------


@pytest.fixture(scope="module")
def dagster_instance():
    from dagster import AssetCheckResult, AssetCheckSpec, Output, asset, materialize
    from dagster._core.test_utils import instance_for_test

    @asset(name="training_dataset")
    def training_dataset():
        return 1

    @asset(name="lora_adapter", check_specs=[AssetCheckSpec("training_sanity", asset="lora_adapter", blocking=True)])
    def lora_adapter(context, training_dataset):
        passed = context.run.tags.get("passes") == "yes"
        yield Output(1, metadata={"steps": 12, "train_loss": 2.5, "validation_loss": 2.75})
        yield AssetCheckResult(check_name="training_sanity", passed=passed)

    @asset(name="promoted_adapter")
    def promoted_adapter(lora_adapter):
        return 1

    with instance_for_test() as instance:
        graph = [training_dataset, lora_adapter, promoted_adapter]
        good = materialize(graph, instance=instance, tags={"passes": "yes", "pixtrain/trigger": "new_training_data"})
        bad = materialize(graph, instance=instance, tags={"passes": "no"}, raise_on_error=False)
        assert good.success and not bad.success
        yield instance, instance.get_run_by_id(good.run_id), instance.get_run_by_id(bad.run_id)


def _pushed(prometheus, expr: str) -> list[dict]:
    return wait_for(lambda: prometheus.query(expr), 15, f"{expr} to reach Prometheus via the Pushgateway")


def test_run_outcome_push_is_visible_through_prometheus_and_replaces_the_previous_one(stack, dagster_instance):
    prometheus, gateway = stack[0], stack[1]
    instance, good, bad = dagster_instance
    outcome = run_outcome(instance, good)
    assert outcome["success"] and outcome["steps"] == 12 and outcome["trigger"] == "sensor"
    assert outcome["gates"] == {("lora_adapter", "training_sanity"): True} and outcome["duration_seconds"] > 0
    push_run_outcome(gateway.address, outcome)
    series = _pushed(prometheus, 'pixtrain_run_success{job="pixtrain_run_outcome"} == 1')
    assert series[0]["metric"]["dagster_job"] == good.job_name
    assert _value(prometheus, 'pixtrain_run_final_train_loss{job="pixtrain_run_outcome"}') == 2.5
    assert _value(prometheus, 'pixtrain_run_training_steps{job="pixtrain_run_outcome"}') == 12

    push_run_outcome(gateway.address, run_outcome(instance, bad))  # the next run of the same job
    _pushed(prometheus, 'pixtrain_run_success{job="pixtrain_run_outcome"} == 0')
    wait_for(
        lambda: len(prometheus.query('pixtrain_run_success{job="pixtrain_run_outcome"}')) == 1,
        15,
        "one series per Dagster job (no pile-up per run)",
    )
    assert _value(prometheus, 'pixtrain_run_gate_passed{check="training_sanity"}') == 0
    assert "run_id" not in json.dumps(prometheus.query('{job="pixtrain_run_outcome"}'))


def test_pipeline_metrics_from_the_instance_reach_prometheus(stack, dagster_instance):
    prometheus, gateway = stack[0], stack[1]
    instance, good, bad = dagster_instance
    push_pipeline_metrics(gateway.address, instance)
    job = good.job_name
    _pushed(prometheus, 'pixtrain_pipeline_runs_started_total{job="pixtrain_pipeline"}')
    assert _value(prometheus, f'pixtrain_pipeline_runs_succeeded_total{{dagster_job="{job}", trigger="sensor"}}') == 1
    assert _value(prometheus, f'pixtrain_pipeline_runs_failed_total{{dagster_job="{job}", trigger="manual"}}') == 1
    started = prometheus.query(f'pixtrain_pipeline_runs_started_total{{dagster_job="{job}"}}')
    assert {s["metric"]["trigger"]: float(s["value"][1]) for s in started} == {"sensor": 1, "manual": 1}
    assert (
        _value(prometheus, 'pixtrain_pipeline_gate_failures_total{asset="lora_adapter", check="training_sanity"}') == 1
    )
    assert _value(prometheus, 'pixtrain_pipeline_gate_passed{asset="lora_adapter", check="training_sanity"}') == 0
    promoted = _value(prometheus, "pixtrain_pipeline_last_promotion_timestamp_seconds")
    assert 0 <= time.time() - promoted < 600
    assert _value(prometheus, "pixtrain_pipeline_dataset_version_timestamp_seconds") >= promoted - 600
    # the pipeline panels and alerts now have data too
    assert prometheus.query("pixtrain_pipeline_gate_passed == 0")


def test_pipeline_counters_survive_a_restart_because_they_are_recomputed_from_the_instance(dagster_instance):
    from prometheus_client import generate_latest

    from pixtrain_dagster.monitoring.pipeline import pipeline_registry

    instance = dagster_instance[0]
    first = generate_latest(pipeline_registry(instance)).decode()
    again = generate_latest(pipeline_registry(instance)).decode()  # a fresh collector, as after a pod restart
    counters = [line for line in first.splitlines() if re.match(r"pixtrain_pipeline_runs_\w+_total\{", line)]
    assert counters and all(line in again for line in counters)


def test_pipeline_metrics_sensor_pushes_when_a_gateway_is_configured(stack, dagster_instance, monkeypatch):
    from dagster import build_sensor_context

    from pixtrain_dagster.monitoring.pipeline import PUSHGATEWAY_ENV, pipeline_metrics

    prometheus, gateway = stack[0], stack[1]
    instance = dagster_instance[0]
    monkeypatch.delenv(PUSHGATEWAY_ENV, raising=False)
    skipped = pipeline_metrics(build_sensor_context(instance=instance))
    assert "not set" in skipped.skip_message
    # start from an empty group, so the push below is what Prometheus then sees
    urllib.request.urlopen(
        urllib.request.Request(f"{gateway.url}/metrics/job/pixtrain_pipeline", method="DELETE"), timeout=5
    )
    wait_for(
        lambda: not prometheus.query('pixtrain_pipeline_gate_passed{job="pixtrain_pipeline"}'),
        15,
        "the deleted group to vanish from Prometheus",
    )
    monkeypatch.setenv(PUSHGATEWAY_ENV, gateway.address)
    assert pipeline_metrics(build_sensor_context(instance=instance)).skip_message == "pipeline metrics pushed"
    _pushed(prometheus, 'pixtrain_pipeline_gate_passed{job="pixtrain_pipeline"}')
    monkeypatch.setenv(PUSHGATEWAY_ENV, f"127.0.0.1:{free_port()}")  # nothing listens: skipped, not raised
    assert "unreachable" in pipeline_metrics(build_sensor_context(instance=instance)).skip_message


def test_run_status_sensors_push_the_outcome_of_a_finished_run(stack, dagster_instance, monkeypatch):
    from dagster import DagsterEventType, build_run_status_sensor_context

    from pixtrain_dagster.monitoring.pipeline import PUSHGATEWAY_ENV, push_run_outcome_failure, push_run_outcome_success

    prometheus, gateway = stack[0], stack[1]
    instance, good, bad = dagster_instance
    monkeypatch.setenv(PUSHGATEWAY_ENV, gateway.address)
    for sensor_def, run, event_type, success in (
        (push_run_outcome_success, good, DagsterEventType.RUN_SUCCESS, 1),
        (push_run_outcome_failure, bad, DagsterEventType.RUN_FAILURE, 0),
    ):
        (entry,) = instance.all_logs(run.run_id, of_type=event_type)
        context = build_run_status_sensor_context(
            sensor_name=sensor_def.name, dagster_event=entry.dagster_event, dagster_instance=instance, dagster_run=run
        )
        sensor_def(context)
        wait_for(
            lambda success=success: prometheus.query(
                f'pixtrain_run_success{{job="pixtrain_run_outcome"}} == {success}'
            ),
            15,
            f"the outcome pushed by {sensor_def.name}",
        )
