"""Automation: retrain when new data lands, on a schedule, and alert when a run or a check fails."""

import json
import logging
import os
import urllib.request

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DagsterEventType,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from .core.landing import changed_files, dataset_version, scan_landing
from .jobs import train_adapter_job
from .resources import ArtifactStoreResource

log = logging.getLogger(__name__)

DATASET_VERSION_TAG = "pixtrain/dataset_version"


@sensor(job=train_adapter_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def new_training_data(context: SensorEvaluationContext, artifact_store: ArtifactStoreResource):
    """Requests a retraining run when a chat JSONL file in the landing location is new, changed or removed.

    The run key is the dataset version (content hash of all landing files), so the same data never trains
    twice, even if the cursor were lost; the cursor (kept in the Dagster instance, so it survives restarts)
    remembers each file's hash so unchanged files are not re-hashed on every tick.
    """
    previous = json.loads(context.cursor) if context.cursor else {"files": {}, "version": None}
    state = scan_landing(artifact_store.landing_store(), previous["files"])
    if not state:
        return SkipReason(f"no .jsonl files in {artifact_store.landing_store().root}")
    version = dataset_version(state)
    changed = changed_files(state, previous["files"])
    context.update_cursor(json.dumps({"files": state, "version": version}))
    if version == previous["version"] or not changed:
        return SkipReason("no new, changed or removed files in the landing location")
    return RunRequest(
        run_key=f"dataset-{version[:16]}",
        tags={
            DATASET_VERSION_TAG: version,
            "pixtrain/trigger": "new_training_data",
            "pixtrain/changed_files": ",".join(changed)[:200],
        },
    )


retraining_schedule = ScheduleDefinition(
    name="retraining_schedule",
    job=train_adapter_job,
    cron_schedule=os.environ.get("PIXTRAIN_RETRAIN_CRON", "0 3 * * 1"),
    execution_timezone=os.environ.get("PIXTRAIN_RETRAIN_TIMEZONE", "UTC"),
    default_status=DefaultScheduleStatus.STOPPED,  # data-driven retraining is the default; turn on in the UI
    tags={"pixtrain/trigger": "retraining_schedule"},
    description="Periodic retraining on the current landing data (PIXTRAIN_RETRAIN_CRON / _TIMEZONE).",
)

# Downstream assets declare AutomationCondition rules (evaluation, bias report, promotion follow a new adapter);
# this sensor evaluates them, on by default.
downstream_automation = AutomationConditionSensorDefinition(
    "downstream_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
)


def failed_checks_of_run(instance, run_id: str) -> list[str]:
    """'asset:check' names of the checks that failed in a run."""
    failed = []
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data
        if not evaluation.passed:
            failed.append(f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}")
    return sorted(failed)


def send_alert(message: str, webhook_url: str | None) -> None:
    log.error(message)
    if webhook_url:
        request = urllib.request.Request(
            webhook_url,
            data=json.dumps({"text": message}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass


@run_failure_sensor(default_status=DefaultSensorStatus.RUNNING, monitor_all_code_locations=False)
def alert_on_failure(context: RunFailureSensorContext):
    """Alerts (log, and PIXTRAIN_ALERT_WEBHOOK_URL if set) naming the failed run and any failed checks."""
    run = context.dagster_run
    failed = failed_checks_of_run(context.instance, run.run_id)
    message = f"pixtrain run {run.run_id} ({run.job_name}) failed: {context.failure_event.message}" + (
        f"; failed checks: {', '.join(failed)}" if failed else ""
    )
    send_alert(message, os.environ.get("PIXTRAIN_ALERT_WEBHOOK_URL") or None)
