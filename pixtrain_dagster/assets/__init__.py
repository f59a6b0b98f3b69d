"""Dagster assets, grouped by domain: models, data, training, evaluation (and release)."""

from .data import raw_conversations, training_dataset
from .evaluation import adapter_evaluation
from .models import base_model
from .training import lora_training

ALL_ASSETS = [base_model, raw_conversations, training_dataset, lora_training, adapter_evaluation]
