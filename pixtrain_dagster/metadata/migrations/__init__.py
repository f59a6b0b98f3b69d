"""Alembic migration environment of the training metadata store (run through ``TrainingMetadataStore.migrate``)."""
