"""The code location: ``dagster dev`` / ``dagster asset materialize -m pixtrain_dagster.definitions``.

Loading must stay fast: nothing here imports torch, transformers, peft, lightning or wandb; the assets import
them inside their bodies.
"""

from dagster import AssetSelection, Definitions, define_asset_job

from .assets import ALL_ASSETS
from .execution import executor_from_env
from .resources import ArtifactPointerIOManager, ArtifactStoreResource, ModelHubResource, TrainingRuntimeResource

train_adapter_job = define_asset_job(
    "train_adapter",
    selection=AssetSelection.all(),
    description="Snapshot the base model, curate the data, train the LoRA adapter and evaluate it.",
)


def build_definitions() -> Definitions:
    """Definitions wired from the environment (artifact roots, executor); tests call it after setting env vars."""
    artifact_store = ArtifactStoreResource.from_env()
    return Definitions(
        assets=ALL_ASSETS,
        jobs=[train_adapter_job],
        resources={
            "artifact_store": artifact_store,
            "io_manager": ArtifactPointerIOManager(artifact_store=artifact_store),
            "training_runtime": TrainingRuntimeResource(),
            "model_hub": ModelHubResource(),
        },
        executor=executor_from_env(),
    )


defs = build_definitions()
