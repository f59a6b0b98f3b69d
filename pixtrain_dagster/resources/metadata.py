"""Dagster resource for the training metadata store (``pixtrain_dagster.metadata``).

The database URL, password included, is read from the environment when a step starts; the resource's config
holds only the *name* of the variable, so nothing secret reaches run config, the Dagster UI or event logs.
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from dagster import (
    AssetCheckExecutionContext,
    AssetExecutionContext,
    ConfigurableResource,
    InitResourceContext,
    OpExecutionContext,
)
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:  # the store pulls in SQLAlchemy and Alembic; import them only when a step needs the store
    from pixtrain_dagster.metadata import TrainingMetadataStore

SQLITE_FILE_NAME = "pixtrain_metadata.sqlite"


class TrainingMetadataResource(ConfigurableResource):
    """The training record on Postgres when a database is configured, else on SQLite under DAGSTER_HOME.

    Configured database: ``$PIXTRAIN_METADATA_DATABASE_URL`` (``postgresql://USER:PASSWORD@HOST:PORT/DB``), or
    ``PIXTRAIN_DB_HOST`` / ``_PORT`` / ``_USER`` / ``_PASSWORD`` / ``_NAME`` / ``_SSLMODE``. The schema is
    migrated when a step using the resource starts, so an unreachable database fails the step within
    ``3 x connect_timeout_s + 1.5`` seconds (3 attempts), with a message naming host:port, never the password.
    """

    database_url_env_var: str = Field(
        default="PIXTRAIN_METADATA_DATABASE_URL",
        description="Name of the variable holding the database URL (the URL itself never goes in config).",
    )
    sqlite_path: str | None = Field(
        default=None,
        description=f"SQLite file used when no database is configured; default $DAGSTER_HOME/{SQLITE_FILE_NAME}.",
    )
    connect_timeout_s: int = Field(default=5, ge=2, description="Bound on establishing one connection.")
    migrate_on_start: bool = Field(
        default=True, description="Create/upgrade the schema when a step starts (serialised, a no-op when current)."
    )

    # Typed Any: pydantic resolves field annotations when the class is created, but the store is imported lazily.
    _store: Any = PrivateAttr(default=None)  # TrainingMetadataStore | None

    def setup_for_execution(self, context: InitResourceContext) -> None:
        store = self.get_store()
        if context.log is not None:
            context.log.info(f"Training metadata store: {store.describe()}")

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._store is not None:
            self._store.dispose()
            self._store = None

    def get_store(self) -> "TrainingMetadataStore":
        """The store, opened (and migrated, unless disabled) on first use."""
        if self._store is None:
            from pixtrain_dagster.metadata import TrainingMetadataStore, database_url_from_env

            store = TrainingMetadataStore.from_url(
                database_url_from_env(url_env_var=self.database_url_env_var),
                sqlite_path=self.resolved_sqlite_path(),
                connect_timeout_s=self.connect_timeout_s,
            )
            try:
                if self.migrate_on_start and not _env_flag(EXTERNAL_MIGRATIONS_ENV_VAR):
                    store.migrate()
                else:
                    _check_deployed_schema(store)
            except BaseException:
                store.dispose()
                raise
            self._store = store
        return self._store

    def resolved_sqlite_path(self) -> Path:
        if self.sqlite_path:
            return Path(self.sqlite_path)
        # Without DAGSTER_HOME (a bare `materialize()` in a script) fall back to the gitignored work folder.
        home = os.environ.get("DAGSTER_HOME") or ".pixtrain"
        return Path(home) / SQLITE_FILE_NAME


# Set in the cluster (pixtrain-execution-env ConfigMap): the schema is migrated by the owner role's Helm hook Job
# (`python -m pixtrain_dagster.cli db-migrate`), and the pipeline's role must not be able to rewrite the audit log.
EXTERNAL_MIGRATIONS_ENV_VAR = "PIXTRAIN_METADATA_EXTERNAL_MIGRATIONS"
REQUIRE_LEAST_PRIVILEGE_ENV_VAR = "PIXTRAIN_METADATA_REQUIRE_LEAST_PRIVILEGE"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _check_deployed_schema(store: "TrainingMetadataStore") -> None:
    """Without migrating: the schema must be at this code's head, and (when required) the role least-privileged."""
    from pixtrain_dagster.metadata import MetadataStoreError

    current, head = store.current_revision(), store.head_revision()
    if current != head:
        raise MetadataStoreError(
            f"metadata schema on {store.describe()} is at {current or 'nothing'}, this code needs {head}: run "
            "`python -m pixtrain_dagster.cli db-migrate` as the owner role (the pixtrain-infra db-migrate hook Job)"
        )
    if _env_flag(REQUIRE_LEAST_PRIVILEGE_ENV_VAR):
        problems = store.least_privilege_problems()
        if problems:
            raise MetadataStoreError(
                f"the pipeline's database role on {store.describe()} is too powerful: "
                + "; ".join(problems)
                + ". Connect as a member of the writer role only (docs/metadata.md, 'Least privilege and audit')"
            )


class StepIdentity(NamedTuple):
    """What the training record keys a step's rows by, and who it records as the actor."""

    run_id: str
    step_key: str
    attempt: int
    actor: str


def step_identity(context: AssetExecutionContext | AssetCheckExecutionContext | OpExecutionContext) -> StepIdentity:
    """(Dagster run id, step key, retry number, actor) of the running step, for the store's calls.

    The actor is the user who launched the run when Dagster knows it (tag ``dagster/user``), else ``dagster``
    (schedules, sensors, CLI).
    """
    context = getattr(context, "op_execution_context", context)  # an asset check's context wraps the op's
    run = context.run
    return StepIdentity(
        run_id=run.run_id,
        step_key=str(context.op_execution_context.op_handle),  # an op context returns itself here
        attempt=context.retry_number,
        actor=run.tags.get("dagster/user") or "dagster",
    )
