"""Table definitions of the training metadata store (SQLAlchemy Core, one definition for PostgreSQL and SQLite).

The runtime code builds its statements from these tables. The migrations in ``migrations/versions`` are the
frozen history that creates them; ``tests/metadata/test_migrations.py`` checks that the two agree on both
dialects, so a column added here without a migration fails the tests.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

# Alembic's bookkeeping table. Not the default ``alembic_version``: Dagster's own Postgres storage keeps its
# migration state in ``alembic_version``, and both may share one database.
VERSION_TABLE = "pixtrain_metadata_alembic_version"

TRAINING_RUN_STATUSES = ("running", "succeeded", "failed", "canceled")
FINISHED_STATUSES = TRAINING_RUN_STATUSES[1:]

# JSONB on Postgres (indexable, normalised); JSON text on SQLite. none_as_null: Python None is SQL NULL,
# not the JSON literal 'null', so "no metrics yet" reads the same on both dialects.
JsonDocument = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
SurrogateKey = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Always written as aware UTC. SQLite stores it as naive text; the store re-attaches UTC when reading.
Timestamp = sa.DateTime(timezone=True)
Sha256Hex = sa.String(64)

metadata = sa.MetaData()

dataset_versions = sa.Table(
    "dataset_versions",
    metadata,
    # Content hash of the cleaned dataset: the same bytes are the same version, whoever recorded them.
    sa.Column("dataset_hash", sa.String(128), primary_key=True),
    sa.Column("source_uri", sa.Text, nullable=False),
    sa.Column("num_rows_raw", sa.Integer, nullable=False),
    sa.Column("num_rows_clean", sa.Integer, nullable=False),
    # e.g. {"email": 12, "phone": 3}: how many PHI spans of each kind were scrubbed. Counts only, never text.
    sa.Column("scrub_counts", JsonDocument, nullable=False),
    sa.Column("recorded_by_run_id", sa.String(64), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
)

training_runs = sa.Table(
    "training_runs",
    metadata,
    sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    sa.Column("dagster_run_id", sa.String(64), nullable=False),
    sa.Column("step_key", sa.String(255), nullable=False),
    # Dagster's retry number of the step; a retried step updates this row instead of adding one.
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column(
        "dataset_hash",
        sa.String(128),
        sa.ForeignKey("dataset_versions.dataset_hash", name="fk_training_runs_dataset_hash"),
        nullable=False,
    ),
    sa.Column("base_model_ref", sa.Text, nullable=False),
    sa.Column("base_model_sha256", Sha256Hex, nullable=False),
    sa.Column("code_version", sa.Text, nullable=False),
    sa.Column("git_commit", sa.String(64), nullable=True),
    sa.Column("hyperparameters", JsonDocument, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp, nullable=True),
    sa.Column("metrics", JsonDocument, nullable=True),
    sa.Column("adapter_uri", sa.Text, nullable=True),
    sa.Column("adapter_sha256", Sha256Hex, nullable=True),
    sa.UniqueConstraint("dagster_run_id", "step_key", name="uq_training_runs_run_step"),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'canceled')", name="ck_training_runs_status"),
    sa.Index("ix_training_runs_adapter_sha256", "adapter_sha256"),
    sa.Index("ix_training_runs_adapter_uri", "adapter_uri"),
    sa.Index("ix_training_runs_dataset_hash", "dataset_hash"),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    sa.Column(
        "training_run_id",
        SurrogateKey,
        sa.ForeignKey("training_runs.id", name="fk_checkpoints_training_run_id"),
        nullable=False,
    ),
    # The optimizer step the checkpoint was taken at (not the Dagster step).
    sa.Column("global_step", sa.Integer, nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("sha256", Sha256Hex, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.UniqueConstraint("training_run_id", "global_step", name="uq_checkpoints_run_global_step"),
)

evaluations = sa.Table(
    "evaluations",
    metadata,
    sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    # The Dagster run/step that ran the evaluation (often not the one that trained the adapter).
    sa.Column("dagster_run_id", sa.String(64), nullable=False),
    sa.Column("step_key", sa.String(255), nullable=False),
    # What was evaluated: the adapter's bytes, so the result follows the adapter wherever it is copied.
    sa.Column("adapter_sha256", Sha256Hex, nullable=False),
    sa.Column("eval_name", sa.String(255), nullable=False),
    sa.Column("eval_dataset_hash", sa.String(128), nullable=True),
    sa.Column("metrics", JsonDocument, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.UniqueConstraint(
        "dagster_run_id", "step_key", "adapter_sha256", "eval_name", name="uq_evaluations_run_step_adapter_name"
    ),
    sa.Index("ix_evaluations_adapter_sha256", "adapter_sha256"),
)

# Append-only: a trigger rejects UPDATE, DELETE (and TRUNCATE on Postgres); see the initial migration.
audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    # Idempotency key: a retried write (or a re-run step) inserts the same key, which is then a no-op.
    sa.Column("event_key", sa.String(512), nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("artifact_uri", sa.Text, nullable=True),
    sa.Column("artifact_sha256", sa.String(128), nullable=True),
    sa.Column("dagster_run_id", sa.String(64), nullable=True),
    sa.Column("step_key", sa.String(255), nullable=True),
    # Identifiers and decisions only; never dataset text (PHI).
    sa.Column("details", JsonDocument, nullable=False),
    sa.Column("occurred_at", Timestamp, nullable=False),
    sa.UniqueConstraint("event_key", name="uq_audit_events_event_key"),
    sa.Index("ix_audit_events_artifact_sha256", "artifact_sha256"),
    sa.Index("ix_audit_events_artifact_uri", "artifact_uri"),
    sa.Index("ix_audit_events_run_step", "dagster_run_id", "step_key"),
)

# The ``adapter_lineage`` view (created by the migrations, dialect-specific SQL) described for typed reads.
# Kept out of ``metadata`` so that schema comparison and create_all never treat it as a table.
view_metadata = sa.MetaData()
adapter_lineage = sa.Table(
    "adapter_lineage",
    view_metadata,
    sa.Column("adapter_sha256", Sha256Hex),
    sa.Column("adapter_uri", sa.Text),
    sa.Column("training_run_id", SurrogateKey),
    sa.Column("dagster_run_id", sa.String(64)),
    sa.Column("step_key", sa.String(255)),
    sa.Column("attempt", sa.Integer),
    sa.Column("status", sa.String(16)),
    sa.Column("started_at", Timestamp),
    sa.Column("finished_at", Timestamp),
    sa.Column("base_model_ref", sa.Text),
    sa.Column("base_model_sha256", Sha256Hex),
    sa.Column("code_version", sa.Text),
    sa.Column("git_commit", sa.String(64)),
    sa.Column("hyperparameters", sa.JSON),
    sa.Column("metrics", sa.JSON),
    sa.Column("dataset_hash", sa.String(128)),
    sa.Column("dataset_source_uri", sa.Text),
    sa.Column("dataset_num_rows_raw", sa.Integer),
    sa.Column("dataset_num_rows_clean", sa.Integer),
    sa.Column("dataset_scrub_counts", sa.JSON),
    sa.Column("checkpoints", sa.JSON),
    sa.Column("evaluations", sa.JSON),
    sa.Column("audit_events", sa.JSON),
)
