"""Jobs: what a sensor, a schedule or the launchpad runs as one unit."""

from dagster import AssetSelection, define_asset_job

from .execution import GPU_RUN_TAGS

train_adapter_job = define_asset_job(
    "train_adapter",
    selection=AssetSelection.all(),
    description="Snapshot the base model, curate the data, train the LoRA adapter, evaluate, report bias, promote.",
    tags=GPU_RUN_TAGS,  # the QueuedRunCoordinator limits concurrent GPU runs by this tag
)
