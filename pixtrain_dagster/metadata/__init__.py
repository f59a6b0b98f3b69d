"""Training metadata store: which dataset, base model and code produced which adapter, who promoted it, when.

Plain Python (SQLAlchemy Core + Alembic, no Dagster) so any pod, script or auditor tool can use it.
PostgreSQL through psycopg 3 in production; an embedded SQLite file when no database URL is configured.
"""

from pixtrain_dagster.core.backoff import Backoff
from pixtrain_dagster.metadata.store import (
    DEFAULT_STARTUP_RETRY,
    DEFAULT_WRITE_RETRY,
    MetadataStoreError,
    MetadataStoreUnavailable,
    TrainingMetadataStore,
    UnknownTrainingRun,
    lineage_statement,
)
from pixtrain_dagster.metadata.urls import (
    DATABASE_URL_ENV_VAR,
    database_url_from_env,
    describe_database,
    normalize_database_url,
)

__all__ = [
    "DATABASE_URL_ENV_VAR",
    "DEFAULT_STARTUP_RETRY",
    "DEFAULT_WRITE_RETRY",
    "MetadataStoreError",
    "MetadataStoreUnavailable",
    "Backoff",
    "TrainingMetadataStore",
    "UnknownTrainingRun",
    "database_url_from_env",
    "describe_database",
    "lineage_statement",
    "normalize_database_url",
]
