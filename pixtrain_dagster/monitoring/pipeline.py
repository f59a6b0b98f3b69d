"""Pipeline metrics and run outcomes, computed from the Dagster instance (run and event-log storage).

Where they are computed, and why nothing is lost when a pod dies: every value here is recomputed from the
Dagster instance (Postgres in the cluster) each time, never accumulated in a process. Counters such as
``pixtrain_pipeline_runs_failed_total`` are counts of rows in the run storage, so a restarted code server
(which evaluates the sensors below) continues at the same value instead of resetting to zero, and a step
pod that dies still shows up, because the daemon marks its run failed in the same storage.

* ``PipelineMetricsCollector``: a ``prometheus_client`` collector: runs started/succeeded/failed per Dagster
  job and trigger, gate (blocking asset check) failures by asset and check and the latest verdict of each,
  the time of the newest dataset version and of the last promotion.
* ``pipeline_metrics_sensor`` pushes those to the Pushgateway (``PIXTRAIN_PUSHGATEWAY_URL``) every minute under
  the fixed grouping key ``job="pixtrain_pipeline"``: each push replaces the previous one.
* ``run_outcome_sensor`` pushes the outcome of every finished run once (duration, result, steps, final losses,
  gate verdicts) under ``job="pixtrain_run_outcome", dagster_job=<job name>``: one group per Dagster job,
  replaced by the next run of that job, so series never pile up per run (no run id label).

Pushing uses ``prometheus_client.push_to_gateway`` directly rather than the ``dagster-prometheus`` resource:
that resource (beta) wraps the same client calls but is built for ops and assets, while these pushes come from
sensors and need a custom registry (a collector) and grouping keys; one less dependency pinned to the Dagster
release, too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any

from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    EventRecordsFilter,
    RunStatusSensorContext,
    SensorEvaluationContext,
    SkipReason,
    run_status_sensor,
    sensor,
)

log = logging.getLogger(__name__)

PUSHGATEWAY_ENV = "PIXTRAIN_PUSHGATEWAY_URL"
PIPELINE_GROUP = "pixtrain_pipeline"
OUTCOME_GROUP = "pixtrain_run_outcome"
DATASET_ASSET = AssetKey("training_dataset")
PROMOTION_ASSET = AssetKey("promoted_adapter")
TRAINING_OUTPUT = AssetKey("lora_adapter")

_STARTED = {
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.SUCCESS,
    DagsterRunStatus.FAILURE,
    DagsterRunStatus.CANCELING,
    DagsterRunStatus.CANCELED,
}


def run_trigger(tags: dict[str, str]) -> str:
    """sensor / schedule / automation / manual (the launchpad, the CLI): low-cardinality trigger label."""
    if tags.get("dagster/sensor_name") or (tags.get("pixtrain/trigger") == "new_training_data"):
        return "sensor"
    if tags.get("dagster/schedule_name") or tags.get("pixtrain/trigger") == "retraining_schedule":
        return "schedule"
    if any(tag.startswith("dagster/from_automation_condition") or tag == "dagster/auto_materialize" for tag in tags):
        return "automation"
    return "manual"


def _check_evaluations(instance, run_id: str | None = None, limit: int = 10_000) -> list[Any]:
    """Asset check evaluation events, oldest first (of one run, or of the whole instance)."""
    if run_id is not None:
        return [
            e.dagster_event.event_specific_data
            for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
        ]
    records = instance.get_event_records(
        EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION), limit=limit, ascending=False
    )
    return [r.event_log_entry.dagster_event.event_specific_data for r in reversed(records)]


class PipelineMetricsCollector:
    """Reads the instance at each collection (a scrape or a sensor tick); keeps no state of its own."""

    def __init__(self, instance, run_limit: int = 10_000, check_limit: int = 10_000):
        self.instance = instance
        self.run_limit = run_limit
        self.check_limit = check_limit

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        started, succeeded, failed = Tally(), Tally(), Tally()
        for run in self.instance.get_runs(limit=self.run_limit):
            key = (run.job_name, run_trigger(run.tags))
            if run.status in _STARTED:
                started[key] += 1
            if run.status == DagsterRunStatus.SUCCESS:
                succeeded[key] += 1
            elif run.status == DagsterRunStatus.FAILURE:
                failed[key] += 1
        for name, tally, text in (
            ("started", started, "Runs that started"),
            ("succeeded", succeeded, "Runs that succeeded"),
            ("failed", failed, "Runs that failed"),
        ):
            family = CounterMetricFamily(
                f"pixtrain_pipeline_runs_{name}",
                f"{text}, per Dagster job and trigger.",
                labels=["dagster_job", "trigger"],
            )
            for key in sorted(started):  # every started key, so a job's first failure is an increase from 0
                family.add_metric(list(key), tally[key])
            yield family

        failures, latest = Tally(), {}
        for evaluation in _check_evaluations(self.instance, limit=self.check_limit):
            key = (evaluation.asset_key.to_user_string(), evaluation.check_name)
            failures[key] += 0 if evaluation.passed else 1
            latest[key] = evaluation.passed
        family = CounterMetricFamily(
            "pixtrain_pipeline_gate_failures", "Failed evaluations of blocking asset checks.", labels=["asset", "check"]
        )
        passed = GaugeMetricFamily(
            "pixtrain_pipeline_gate_passed",
            "1 if the latest evaluation of the check passed.",
            labels=["asset", "check"],
        )
        for key in sorted(latest):
            family.add_metric(list(key), failures[key])
            passed.add_metric(list(key), 1.0 if latest[key] else 0.0)
        yield family
        yield passed

        for asset, name, text in (
            (
                DATASET_ASSET,
                "pixtrain_pipeline_dataset_version_timestamp_seconds",
                "Unix time the current dataset version was materialised.",
            ),
            (
                PROMOTION_ASSET,
                "pixtrain_pipeline_last_promotion_timestamp_seconds",
                "Unix time of the last adapter promotion.",
            ),
        ):
            event = self.instance.get_latest_materialization_event(asset)
            if event is not None:  # never materialised: the series is absent (docs/monitoring.md)
                family = GaugeMetricFamily(name, text)
                family.add_metric([], event.timestamp)
                yield family


def pipeline_registry(instance):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineMetricsCollector(instance))
    return registry


def run_outcome(instance, run) -> dict[str, Any]:
    """What one finished run achieved: duration, result, training steps and losses, gate verdicts."""
    record = instance.get_run_record_by_id(run.run_id)
    start = record.start_time if record and record.start_time else None
    end = record.end_time if record and record.end_time else time.time()
    outcome: dict[str, Any] = {
        "dagster_job": run.job_name,
        "trigger": run_trigger(run.tags),
        "success": run.status == DagsterRunStatus.SUCCESS,
        "duration_seconds": (end - start) if start else None,
        "finished_timestamp": end,
        "steps": None,
        "final_train_loss": None,
        "final_validation_loss": None,
        "gates": {},
    }
    for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.dagster_event.event_specific_data.materialization
        if materialization.asset_key != TRAINING_OUTPUT:
            continue
        metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        outcome["steps"] = metadata.get("steps")
        outcome["final_train_loss"] = metadata.get("train_loss")
        outcome["final_validation_loss"] = metadata.get("validation_loss")
    for evaluation in _check_evaluations(instance, run_id=run.run_id):
        outcome["gates"][(evaluation.asset_key.to_user_string(), evaluation.check_name)] = evaluation.passed
    return outcome


def outcome_registry(outcome: dict[str, Any]):
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry(auto_describe=False)
    labels = {"trigger": outcome["trigger"]}

    def gauge(name: str, text: str, value: Any) -> None:
        number = None if value is None else float(value)
        if number is not None and math.isfinite(number):
            Gauge(name, text, list(labels), registry=registry).labels(**labels).set(number)

    gauge(
        "pixtrain_run_success", "1 if the last run of this Dagster job succeeded, 0 if it failed.", outcome["success"]
    )
    gauge(
        "pixtrain_run_duration_seconds", "Wall time of the last run of this Dagster job.", outcome["duration_seconds"]
    )
    gauge(
        "pixtrain_run_finished_timestamp_seconds",
        "Unix time the last run of this Dagster job finished.",
        outcome["finished_timestamp"],
    )
    gauge("pixtrain_run_training_steps", "Optimizer steps of the adapter trained by the last run.", outcome["steps"])
    gauge("pixtrain_run_final_train_loss", "Final training loss of the last run.", outcome["final_train_loss"])
    gauge(
        "pixtrain_run_final_validation_loss", "Final validation loss of the last run.", outcome["final_validation_loss"]
    )
    if outcome["gates"]:
        gates = Gauge(
            "pixtrain_run_gate_passed",
            "1 if the check passed in the last run of this Dagster job.",
            ["trigger", "asset", "check"],
            registry=registry,
        )
        for (asset, check), passed in sorted(outcome["gates"].items()):
            gates.labels(trigger=outcome["trigger"], asset=asset, check=check).set(1.0 if passed else 0.0)
    return registry


def push_run_outcome(gateway: str, outcome: dict[str, Any], timeout: float = 10.0) -> None:
    """PUT to the group job=pixtrain_run_outcome, dagster_job=<job>: replaces that job's previous outcome."""
    from prometheus_client import push_to_gateway

    push_to_gateway(
        gateway,
        job=OUTCOME_GROUP,
        registry=outcome_registry(outcome),
        grouping_key={"dagster_job": outcome["dagster_job"]},
        timeout=timeout,
    )


def push_pipeline_metrics(gateway: str, instance, timeout: float = 10.0) -> None:
    from prometheus_client import push_to_gateway

    push_to_gateway(gateway, job=PIPELINE_GROUP, registry=pipeline_registry(instance), timeout=timeout)


def _gateway() -> str | None:
    return (os.environ.get(PUSHGATEWAY_ENV) or "").strip() or None


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def pipeline_metrics(context: SensorEvaluationContext):
    """Pushes the pipeline metrics (recomputed from the instance) to the Pushgateway; idle without one."""
    gateway = _gateway()
    if not gateway:
        return SkipReason(f"{PUSHGATEWAY_ENV} is not set: pipeline metrics are not pushed")
    try:
        push_pipeline_metrics(gateway, context.instance)
    except OSError as error:  # the gateway is down: the next tick pushes again, nothing accumulates here
        return SkipReason(f"Pushgateway {gateway} unreachable ({error}); retrying next tick")
    return SkipReason("pipeline metrics pushed")


def _push_outcome_of(context: RunStatusSensorContext) -> None:
    gateway = _gateway()
    if not gateway:
        return
    outcome = run_outcome(context.instance, context.dagster_run)
    try:
        push_run_outcome(gateway, outcome)
    except OSError as error:
        context.log.warning(f"run outcome not pushed to {gateway}: {error}")


@run_status_sensor(
    run_status=DagsterRunStatus.SUCCESS, name="push_run_outcome_success", default_status=DefaultSensorStatus.RUNNING
)
def push_run_outcome_success(context: RunStatusSensorContext):
    """Pushes the outcome of every successful run once (PIXTRAIN_PUSHGATEWAY_URL)."""
    _push_outcome_of(context)


@run_status_sensor(
    run_status=DagsterRunStatus.FAILURE, name="push_run_outcome_failure", default_status=DefaultSensorStatus.RUNNING
)
def push_run_outcome_failure(context: RunStatusSensorContext):
    """Pushes the outcome of every failed run once (PIXTRAIN_PUSHGATEWAY_URL)."""
    _push_outcome_of(context)


MONITORING_SENSORS = [pipeline_metrics, push_run_outcome_success, push_run_outcome_failure]
