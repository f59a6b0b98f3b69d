"""Dagster assets and their blocking checks, grouped by domain: models, data, training, evaluation, release."""

from .bias import bias_gate, bias_report
from .data import raw_conversations, training_dataset, training_dataset_checks
from .evaluation import adapter_evaluation, training_sanity_check
from .models import base_model
from .release import promoted_adapter
from .training import lora_training

ALL_ASSETS = [base_model, raw_conversations, training_dataset, lora_training, adapter_evaluation, bias_report,
              promoted_adapter]
ALL_ASSET_CHECKS = [training_dataset_checks, training_sanity_check, bias_gate]
