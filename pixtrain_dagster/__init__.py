"""pixtrain-dagster: LoRA fine-tuning as Dagster assets. The ML core lives in ``pixtrain_dagster.core``."""
