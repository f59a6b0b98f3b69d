"""Initial training metadata schema: dataset_versions, training_runs, checkpoints, evaluations,
append-only audit_events and the adapter_lineage view.

Revision ID: 0001_initial_schema
Revises:
Create Date: 2026-11-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_initial_schema"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types as of this revision (a migration must not change when schema.py does).
JsonDocument = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
SurrogateKey = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
Sha256Hex = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "dataset_versions",
        sa.Column("dataset_hash", sa.String(128), primary_key=True),
        sa.Column("source_uri", sa.Text, nullable=False),
        sa.Column("num_rows_raw", sa.Integer, nullable=False),
        sa.Column("num_rows_clean", sa.Integer, nullable=False),
        sa.Column("scrub_counts", JsonDocument, nullable=False),
        sa.Column("recorded_by_run_id", sa.String(64), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
        sa.Column("dagster_run_id", sa.String(64), nullable=False),
        sa.Column("step_key", sa.String(255), nullable=False),
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
    )
    op.create_index("ix_training_runs_adapter_sha256", "training_runs", ["adapter_sha256"])
    op.create_index("ix_training_runs_adapter_uri", "training_runs", ["adapter_uri"])
    op.create_index("ix_training_runs_dataset_hash", "training_runs", ["dataset_hash"])

    op.create_table(
        "checkpoints",
        sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
        sa.Column(
            "training_run_id",
            SurrogateKey,
            sa.ForeignKey("training_runs.id", name="fk_checkpoints_training_run_id"),
            nullable=False,
        ),
        sa.Column("global_step", sa.Integer, nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("sha256", Sha256Hex, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.UniqueConstraint("training_run_id", "global_step", name="uq_checkpoints_run_global_step"),
    )
    op.create_table(
        "evaluations",
        sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
        sa.Column("dagster_run_id", sa.String(64), nullable=False),
        sa.Column("step_key", sa.String(255), nullable=False),
        sa.Column("adapter_sha256", Sha256Hex, nullable=False),
        sa.Column("eval_name", sa.String(255), nullable=False),
        sa.Column("eval_dataset_hash", sa.String(128), nullable=True),
        sa.Column("metrics", JsonDocument, nullable=False),
        sa.Column("passed", sa.Boolean, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.UniqueConstraint(
            "dagster_run_id",
            "step_key",
            "adapter_sha256",
            "eval_name",
            name="uq_evaluations_run_step_adapter_name",
        ),
    )
    op.create_index("ix_evaluations_adapter_sha256", "evaluations", ["adapter_sha256"])

    op.create_table(
        "audit_events",
        sa.Column("id", SurrogateKey, primary_key=True, autoincrement=True),
        sa.Column("event_key", sa.String(512), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("artifact_uri", sa.Text, nullable=True),
        sa.Column("artifact_sha256", sa.String(128), nullable=True),
        sa.Column("dagster_run_id", sa.String(64), nullable=True),
        sa.Column("step_key", sa.String(255), nullable=True),
        sa.Column("details", JsonDocument, nullable=False),
        sa.Column("occurred_at", Timestamp, nullable=False),
        sa.UniqueConstraint("event_key", name="uq_audit_events_event_key"),
    )
    op.create_index("ix_audit_events_artifact_sha256", "audit_events", ["artifact_sha256"])
    op.create_index("ix_audit_events_artifact_uri", "audit_events", ["artifact_uri"])
    op.create_index("ix_audit_events_run_step", "audit_events", ["dagster_run_id", "step_key"])

    dialect = op.get_bind().dialect.name
    for statement in _APPEND_ONLY_TRIGGERS[dialect]:
        op.execute(statement)
    op.execute(_ADAPTER_LINEAGE_VIEW[dialect])


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute("DROP VIEW IF EXISTS adapter_lineage")
    # Dropping the table drops its triggers; the Postgres trigger function is a separate object.
    for table in ("audit_events", "evaluations", "checkpoints", "training_runs", "dataset_versions"):
        op.drop_table(table)
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS pixtrain_reject_audit_event_change()")


# Why a trigger rather than REVOKE UPDATE, DELETE: privileges do not bind the table's owner, and the role that
# runs these migrations owns the table. A trigger fires for every role, owner included. Only a superuser, or the
# owner through ALTER TABLE ... DISABLE TRIGGER (a DDL statement, visible with log_statement = 'ddl'), can get
# around it; production should also run the application as a role that does not own the tables.
_APPEND_ONLY_TRIGGERS = {
    "postgresql": [
        """
        CREATE FUNCTION pixtrain_reject_audit_event_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """,
        """
        CREATE TRIGGER audit_events_append_only
        BEFORE UPDATE OR DELETE ON audit_events
        FOR EACH ROW EXECUTE FUNCTION pixtrain_reject_audit_event_change()
        """,
        # Row triggers do not fire on TRUNCATE.
        """
        CREATE TRIGGER audit_events_no_truncate
        BEFORE TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION pixtrain_reject_audit_event_change()
        """,
    ],
    # SQLite has no TRUNCATE; its DELETE without WHERE still fires row triggers.
    "sqlite": [
        """
        CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE is not allowed'); END
        """,
        """
        CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE is not allowed'); END
        """,
    ],
}

# One row per trained adapter: where it came from (run, dataset, base model, code), its checkpoints, the
# evaluations of its bytes, and the audit events about the adapter (promotions: by sha256 or URI), about its
# training step, or about its Dagster run as a whole (step_key NULL, e.g. the dataset recorded in that run).
# Same columns on both dialects; only the JSON aggregate functions differ. (SQLite 3.40 has no ORDER BY inside
# aggregates, hence the ordered sub-selects.)
_ADAPTER_LINEAGE_VIEW = {
    "postgresql": """
CREATE VIEW adapter_lineage AS
SELECT
    tr.adapter_sha256,
    tr.adapter_uri,
    tr.id AS training_run_id,
    tr.dagster_run_id,
    tr.step_key,
    tr.attempt,
    tr.status,
    tr.started_at,
    tr.finished_at,
    tr.base_model_ref,
    tr.base_model_sha256,
    tr.code_version,
    tr.git_commit,
    tr.hyperparameters,
    tr.metrics,
    dv.dataset_hash,
    dv.source_uri AS dataset_source_uri,
    dv.num_rows_raw AS dataset_num_rows_raw,
    dv.num_rows_clean AS dataset_num_rows_clean,
    dv.scrub_counts AS dataset_scrub_counts,
    COALESCE((
        SELECT json_agg(json_build_object(
            'global_step', c.global_step, 'uri', c.uri, 'sha256', c.sha256,
            'size_bytes', c.size_bytes, 'created_at', c.created_at
        ) ORDER BY c.global_step)
        FROM checkpoints c WHERE c.training_run_id = tr.id
    ), '[]'::json) AS checkpoints,
    COALESCE((
        SELECT json_agg(json_build_object(
            'eval_name', e.eval_name, 'dagster_run_id', e.dagster_run_id, 'step_key', e.step_key,
            'eval_dataset_hash', e.eval_dataset_hash, 'metrics', e.metrics, 'passed', e.passed,
            'created_at', e.created_at
        ) ORDER BY e.created_at, e.id)
        FROM evaluations e WHERE e.adapter_sha256 = tr.adapter_sha256
    ), '[]'::json) AS evaluations,
    COALESCE((
        SELECT json_agg(json_build_object(
            'event', a.event, 'actor', a.actor, 'occurred_at', a.occurred_at,
            'artifact_uri', a.artifact_uri, 'artifact_sha256', a.artifact_sha256,
            'dagster_run_id', a.dagster_run_id, 'step_key', a.step_key, 'details', a.details
        ) ORDER BY a.id)
        FROM audit_events a
        WHERE a.artifact_sha256 = tr.adapter_sha256
           OR a.artifact_uri = tr.adapter_uri
           OR (a.dagster_run_id = tr.dagster_run_id AND (a.step_key = tr.step_key OR a.step_key IS NULL))
    ), '[]'::json) AS audit_events
FROM training_runs tr
JOIN dataset_versions dv ON dv.dataset_hash = tr.dataset_hash
WHERE tr.adapter_sha256 IS NOT NULL
""",
    "sqlite": """
CREATE VIEW adapter_lineage AS
SELECT
    tr.adapter_sha256,
    tr.adapter_uri,
    tr.id AS training_run_id,
    tr.dagster_run_id,
    tr.step_key,
    tr.attempt,
    tr.status,
    tr.started_at,
    tr.finished_at,
    tr.base_model_ref,
    tr.base_model_sha256,
    tr.code_version,
    tr.git_commit,
    tr.hyperparameters,
    tr.metrics,
    dv.dataset_hash,
    dv.source_uri AS dataset_source_uri,
    dv.num_rows_raw AS dataset_num_rows_raw,
    dv.num_rows_clean AS dataset_num_rows_clean,
    dv.scrub_counts AS dataset_scrub_counts,
    (
        SELECT json_group_array(json_object(
            'global_step', c.global_step, 'uri', c.uri, 'sha256', c.sha256,
            'size_bytes', c.size_bytes, 'created_at', c.created_at
        ))
        FROM (SELECT * FROM checkpoints WHERE training_run_id = tr.id ORDER BY global_step) c
    ) AS checkpoints,
    (
        SELECT json_group_array(json_object(
            'eval_name', e.eval_name, 'dagster_run_id', e.dagster_run_id, 'step_key', e.step_key,
            'eval_dataset_hash', e.eval_dataset_hash, 'metrics', json(e.metrics),
            'passed', CASE WHEN e.passed IS NULL THEN NULL WHEN e.passed THEN json('true') ELSE json('false') END,
            'created_at', e.created_at
        ))
        FROM (SELECT * FROM evaluations WHERE adapter_sha256 = tr.adapter_sha256 ORDER BY created_at, id) e
    ) AS evaluations,
    (
        SELECT json_group_array(json_object(
            'event', a.event, 'actor', a.actor, 'occurred_at', a.occurred_at,
            'artifact_uri', a.artifact_uri, 'artifact_sha256', a.artifact_sha256,
            'dagster_run_id', a.dagster_run_id, 'step_key', a.step_key, 'details', json(a.details)
        ))
        FROM (
            SELECT * FROM audit_events
            WHERE artifact_sha256 = tr.adapter_sha256
               OR artifact_uri = tr.adapter_uri
               OR (dagster_run_id = tr.dagster_run_id AND (step_key = tr.step_key OR step_key IS NULL))
            ORDER BY id
        ) a
    ) AS audit_events
FROM training_runs tr
JOIN dataset_versions dv ON dv.dataset_hash = tr.dataset_hash
WHERE tr.adapter_sha256 IS NOT NULL
""",
}
