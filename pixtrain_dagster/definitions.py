"""The code location: ``dagster dev`` / ``dagster asset materialize -m pixtrain_dagster.definitions``.

Loading must stay fast: nothing here imports torch, transformers, peft, lightning or wandb; the assets import
them inside their bodies.
"""

import os

from dagster import Definitions

from . import warning_filters
from .assets import ALL_ASSET_CHECKS, ALL_ASSETS, OPERATIONS_ASSETS
from .assets.backup import artifact_backup_job, artifact_backup_schedule
from .execution import executor_from_env
from .jobs import recheck_gates_job, train_adapter_job
from .monitoring.pipeline import MONITORING_SENSORS  # Pushgateway pushes; idle without PIXTRAIN_PUSHGATEWAY_URL
from .resources import (
    ArtifactPointerIOManager,
    ArtifactStoreResource,
    BiasDetectionClient,
    ModelHubResource,
    TrainingMetadataResource,
    TrainingRuntimeResource,
)
from .sensors import alert_on_failure, downstream_automation, new_training_data, retraining_schedule


def build_definitions() -> Definitions:
    """Definitions wired from the environment (artifact roots, executor); tests call it after setting env vars."""
    # Runs at import (``defs`` below), so in every process that runs our code: CLI, code server, step
    # subprocesses and pods.
    warning_filters.install()
    artifact_store = ArtifactStoreResource.from_env()
    return Definitions(
        assets=[*ALL_ASSETS, *OPERATIONS_ASSETS],
        asset_checks=ALL_ASSET_CHECKS,
        jobs=[train_adapter_job, recheck_gates_job, artifact_backup_job],
        sensors=[new_training_data, downstream_automation, alert_on_failure, *MONITORING_SENSORS],
        schedules=[retraining_schedule, artifact_backup_schedule],
        resources={
            "artifact_store": artifact_store,
            "io_manager": ArtifactPointerIOManager(artifact_store=artifact_store),
            "training_runtime": TrainingRuntimeResource(),
            "model_hub": ModelHubResource(),
            "training_metadata": TrainingMetadataResource(),
            "bias_detection": BiasDetectionClient(endpoint=os.environ.get("PIXTRAIN_BIAS_SERVICE_URL") or None),
        },
        executor=executor_from_env(),
    )


defs = build_definitions()
