"""Dagster assets and their blocking checks, grouped by domain: models, data, training, evaluation, release."""

from ..catalog import with_code_links, with_code_versions
from .backup import artifact_backup
from .bias import bias_gate, bias_report
from .data import raw_conversations, training_dataset, training_dataset_checks
from .evaluation import adapter_evaluation, training_sanity_check
from .models import base_model
from .release import promoted_adapter
from .training import lora_training

# Code versions derived from the code each asset runs, and links to it (catalog.py).
ALL_ASSETS = with_code_links(
    with_code_versions(
        [
            base_model,
            raw_conversations,
            training_dataset,
            lora_training,
            adapter_evaluation,
            bias_report,
            promoted_adapter,
        ]
    )
)
ALL_ASSET_CHECKS = [training_dataset_checks, training_sanity_check, bias_gate]
OPERATIONS_ASSETS = with_code_links(with_code_versions([artifact_backup]))
