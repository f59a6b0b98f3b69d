"""Jobs: what a sensor, a schedule or the launchpad runs as one unit."""

from dagster import AssetSelection, define_asset_job

from .execution import GPU_RUN_TAGS

train_adapter_job = define_asset_job(
    "train_adapter",
    selection=AssetSelection.all(),
    description="Snapshot the base model, curate the data, train the LoRA adapter, evaluate, report bias, promote.",
    tags=GPU_RUN_TAGS,  # the QueuedRunCoordinator limits concurrent GPU runs by this tag
)

# After a rule or policy change: every blocking check re-reads the current artifacts; nothing is re-materialised.
recheck_gates_job = define_asset_job(
    "recheck_gates",
    selection=AssetSelection.all_asset_checks(),
    description="Re-run the dataset, training-sanity and bias gates on the latest artifacts (no training).",
)
