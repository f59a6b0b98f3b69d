"""artifact_backup: copies every published artifact to the backup location (PIXTRAIN_BACKUP_URI), verified.

The work is in ``core/backup.py``; this asset passes the stores and reports what happened. Its schedule
(``artifact_backup_schedule``, PIXTRAIN_BACKUP_CRON, default hourly) runs it on its own job, so a backup
never waits behind a training run. The timestamp of the last success is the ``last_success_timestamp``
metadata value and is also kept at the destination, where ``last_backup_success_timestamp()`` reads it
(the monitoring exporter's ``pixtrain_backup_last_success_timestamp_seconds`` gauge).
"""

import os

from dagster import (
    AssetExecutionContext,
    Config,
    DefaultScheduleStatus,
    Failure,
    MetadataValue,
    Output,
    RetryPolicy,
    ScheduleDefinition,
    asset,
    define_asset_job,
)
from pydantic import Field

from ..catalog import PHI_RAW, governance_tags, owners, uri_metadata
from ..core.backup import BACKUP_URI_ENV, BackupError, run_backup, write_metric_textfile
from ..execution import METADATA_DB_PASSWORD_ENV, step_pod_tags
from ..resources import ArtifactStoreResource, TrainingMetadataResource

METRICS_FILE_ENV = "PIXTRAIN_BACKUP_METRICS_FILE"


class ArtifactBackupConfig(Config):
    destination: str | None = Field(
        default=None, description=f"Backup fsspec URI; default ${BACKUP_URI_ENV} (e.g. s3://bucket/pixtrain)."
    )
    verify_existing: bool = Field(
        default=False, description="Also re-hash artifacts already at the destination and repair damaged ones."
    )


@asset(
    group_name="operations",
    # It records each backup in the audit trail: the metadata database password, nothing else (the object
    # store's credentials come from the pod's workload identity or the backup Secret, docs/runbook.md).
    op_tags=step_pod_tags("cpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    kinds={"fsspec", "postgres"},  # any fsspec destination (s3://, gs://, a mounted path); audit event in Postgres
    owners=owners(),
    tags=governance_tags(PHI_RAW, "cpu"),  # copies everything, the raw landing snapshots included
    retry_policy=RetryPolicy(max_retries=2, delay=60),
    description="Verified copy of every published artifact and pointer at the backup location.",
    # Without a backup location (a laptop, `make demo`) the step succeeds without materialising anything.
    output_required=False,
)
def artifact_backup(
    context: AssetExecutionContext,
    config: ArtifactBackupConfig,
    artifact_store: ArtifactStoreResource,
    training_metadata: TrainingMetadataResource,
):
    destination = config.destination or os.environ.get(BACKUP_URI_ENV, "").strip()
    if not destination:
        context.log.warning(f"no backup location configured ({BACKUP_URI_ENV}); nothing backed up")
        return
    try:
        result = run_backup(
            [artifact_store.store(), artifact_store.checkpoint_store()],
            destination,
            verify_existing=config.verify_existing,
        )
    except BackupError as error:
        raise Failure(str(error)) from error  # retryable: a damaged source may be re-published meanwhile
    metrics_file = os.environ.get(METRICS_FILE_ENV, "").strip()
    if metrics_file:
        write_metric_textfile(metrics_file, result.finished_at)
    training_metadata.get_store().append_audit_event(
        "artifacts_backed_up",
        actor=context.run.tags.get("dagster/user") or "dagster",
        artifact_uri=result.destination,
        run_id=context.run.run_id,
        step_key=str(context.op_execution_context.op_handle),
        details={
            "copied": len(result.copied),
            "skipped": len(result.skipped),
            "repaired": len(result.repaired),
            "documents": len(result.documents_copied),
            "bytes": result.bytes_copied,
        },
        idempotency_key=f"artifacts_backed_up:{context.run.run_id}:{context.retry_number}",
    )
    yield Output(
        {
            "destination": result.destination,
            "finished_at": result.finished_at,
            "artifacts": len(result.copied) + len(result.skipped) + len(result.repaired),
        },
        metadata={
            "destination": result.destination,
            **uri_metadata(result.destination),
            "copied": MetadataValue.int(len(result.copied)),
            "skipped_unchanged": MetadataValue.int(len(result.skipped)),
            "repaired": MetadataValue.int(len(result.repaired)),
            "documents_copied": MetadataValue.int(len(result.documents_copied)),
            "bytes_copied": MetadataValue.int(result.bytes_copied),
            "files_verified": MetadataValue.int(result.files_verified),
            "last_success_timestamp": MetadataValue.timestamp(result.finished_at),
        },
    )


artifact_backup_job = define_asset_job("artifact_backup_job", selection=[artifact_backup])

artifact_backup_schedule = ScheduleDefinition(
    name="artifact_backup_schedule",
    job=artifact_backup_job,
    cron_schedule=os.environ.get("PIXTRAIN_BACKUP_CRON", "17 * * * *"),
    execution_timezone="UTC",
    # On wherever a backup location is configured (the cluster); off on laptops.
    default_status=DefaultScheduleStatus.RUNNING if os.environ.get(BACKUP_URI_ENV) else DefaultScheduleStatus.STOPPED,
    tags={"pixtrain/trigger": "artifact_backup_schedule"},
    description="Hourly verified backup of the artifact store to PIXTRAIN_BACKUP_URI (PIXTRAIN_BACKUP_CRON).",
)
