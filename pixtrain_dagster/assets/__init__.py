"""Dagster assets, grouped by domain: models, data, training, evaluation, release."""

from .bias import bias_report
from .data import raw_conversations, training_dataset
from .evaluation import adapter_evaluation
from .models import base_model
from .release import promoted_adapter
from .training import lora_training

ALL_ASSETS = [base_model, raw_conversations, training_dataset, lora_training, adapter_evaluation, bias_report,
              promoted_adapter]
