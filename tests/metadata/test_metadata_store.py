"""Store behaviour on both backends: idempotent writes, retried steps, append-only audit log, lineage."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from pixtrain_dagster.metadata import UnknownTrainingRun, lineage_statement

from .metadata_samples import BASE_MODEL_SHA256, DATASET_HASH, sha256_of

OUR_TABLES = ("dataset_versions", "training_runs", "checkpoints", "evaluations", "audit_events")


def _counts(store) -> dict[str, int]:
    return {table: store.count_rows(table) for table in OUR_TABLES}


def test_rerunning_the_same_step_writes_no_duplicate_rows(migrated_store, record_training):
    store = migrated_store
    record_training(store, "run-1", num_checkpoints=3)
    store.record_evaluation(
        "run-1", "evaluate", adapter_sha256=sha256_of("adapter-1"), eval_name="heldout", metrics={"ppl": 9.1}
    )
    first = _counts(store)
    assert first == {
        "dataset_versions": 1,
        "training_runs": 1,
        "checkpoints": 3,
        "evaluations": 1,
        # dataset recorded, training started, training finished
        "audit_events": 3,
    }

    # The same step replayed (a resumed run, or a call repeated after an ambiguous failure).
    record_training(store, "run-1", num_checkpoints=3)
    store.record_evaluation(
        "run-1", "evaluate", adapter_sha256=sha256_of("adapter-1"), eval_name="heldout", metrics={"ppl": 9.0}
    )

    assert _counts(store) == first
    assert store.lineage(sha256_of("adapter-1"))[0]["evaluations"][0]["metrics"] == {"ppl": 9.0}  # upserted


def test_a_new_dagster_run_is_a_new_training_run_but_not_a_new_dataset_version(migrated_store, record_training):
    record_training(migrated_store, "run-1", adapter_name="adapter-1")
    record_training(migrated_store, "run-2", adapter_name="adapter-2")
    counts = _counts(migrated_store)
    assert counts["dataset_versions"] == 1
    assert counts["training_runs"] == 2


def test_retried_step_updates_its_row_and_logs_each_attempt(migrated_store, record_training):
    store = migrated_store
    store.record_dataset_version(
        DATASET_HASH, source_uri="file:///d", num_rows_raw=1, num_rows_clean=1, scrub_counts={}
    )
    first_id = store.start_training_run(
        "run-1", "lora_adapter", dataset_hash=DATASET_HASH, base_model_ref="m", base_model_sha256=BASE_MODEL_SHA256,
        code_version="0.1.0", hyperparameters={}, attempt=0,
    )  # fmt: skip
    store.finish_training_run("run-1", "lora_adapter", status="failed", metrics={"error": "OOM"}, attempt=0)

    adapter_sha256, _ = record_training(store, "run-1", attempt=1)

    assert store.count_rows("training_runs") == 1
    [row] = store.lineage(adapter_sha256)
    assert row["training_run_id"] == first_id
    assert (row["attempt"], row["status"], row["metrics"]) == (1, "succeeded", {"train_loss": 1.25})
    events = [(event["event"], event["details"].get("attempt")) for event in row["audit_events"]]
    assert events == [
        ("training_run_started", 0),
        ("training_run_finished", 0),
        ("dataset_version_recorded", None),  # by run-1 (the first record, without a run id, is not this run's)
        ("training_run_started", 1),
        ("training_run_finished", 1),
    ]


def test_results_for_a_training_run_that_never_started_are_rejected(migrated_store):
    with pytest.raises(UnknownTrainingRun, match="run-x"):
        migrated_store.record_checkpoint("run-x", "lora_adapter", global_step=1, uri="u", sha256="0" * 64, size_bytes=1)
    with pytest.raises(UnknownTrainingRun, match="run-x"):
        migrated_store.finish_training_run("run-x", "lora_adapter", status="succeeded")
    assert migrated_store.count_rows("checkpoints") == 0
    assert migrated_store.count_rows("audit_events") == 0  # the whole transaction rolled back


def test_invalid_status_is_rejected(migrated_store):
    with pytest.raises(ValueError, match="status"):
        migrated_store.finish_training_run("run-1", "lora_adapter", status="done")


def test_audit_event_idempotency_key_deduplicates_and_default_key_does_not(migrated_store):
    store = migrated_store
    for _ in range(2):
        store.append_audit_event(
            "adapter_promoted", actor="alice", artifact_sha256="a" * 64, idempotency_key="promote:aaa:run-9"
        )
    assert store.count_rows("audit_events") == 1
    store.append_audit_event("adapter_viewed", actor="bob")
    store.append_audit_event("adapter_viewed", actor="bob")  # two separate calls: two events happened
    assert store.count_rows("audit_events") == 3


def test_audit_events_reject_update_and_delete(migrated_store):
    store = migrated_store
    store.append_audit_event("adapter_promoted", actor="alice", artifact_sha256="a" * 64, details={"to": "prod"})
    attempts = [
        "UPDATE audit_events SET actor = 'mallory'",
        "DELETE FROM audit_events",
    ]
    if store.backend == "postgresql":
        attempts.append("TRUNCATE audit_events")
    for statement in attempts:
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):
            with store.engine.begin() as conn:
                conn.execute(sa.text(statement))

    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT actor FROM audit_events")).all()
    assert rows == [("alice",)]


def test_lineage_answers_where_an_adapter_came_from(migrated_store, record_training):
    store = migrated_store
    adapter_sha256, adapter_uri = record_training(store, "run-1", num_checkpoints=2)
    record_training(store, "run-2", adapter_name="some-other-adapter")  # must not leak into the answer
    store.record_evaluation(
        "run-3", "evaluate", adapter_sha256=adapter_sha256, eval_name="safety", metrics={"refusals": 0}, passed=True
    )
    store.append_audit_event(
        "adapter_promoted",
        actor="alice@example.org",
        artifact_uri=adapter_uri,
        artifact_sha256=adapter_sha256,
        details={"stage": "production"},
    )

    by_sha, by_uri = store.lineage(adapter_sha256), store.lineage(adapter_uri)

    assert by_sha == by_uri
    [row] = by_sha
    assert row["dagster_run_id"] == "run-1"
    assert row["step_key"] == "lora_adapter"
    assert row["status"] == "succeeded"
    assert row["base_model_ref"] == "tests/tiny-llama"
    assert row["base_model_sha256"] == BASE_MODEL_SHA256
    assert (row["code_version"], row["git_commit"]) == ("0.1.0", "a0c3e2c")
    assert row["hyperparameters"] == {"lora_r": 8, "learning_rate": 2e-4}
    assert row["dataset_hash"] == DATASET_HASH
    assert (row["dataset_num_rows_raw"], row["dataset_num_rows_clean"]) == (120, 117)
    assert row["dataset_scrub_counts"] == {"email": 4, "phone": 2}
    assert [checkpoint["global_step"] for checkpoint in row["checkpoints"]] == [10, 20]
    assert row["checkpoints"][0]["uri"] == "file:///artifacts/run-1/checkpoint-10"
    [evaluation] = row["evaluations"]
    assert (evaluation["eval_name"], evaluation["passed"], evaluation["metrics"]) == ("safety", True, {"refusals": 0})
    promotion = row["audit_events"][-1]
    assert (promotion["event"], promotion["actor"], promotion["details"]) == (
        "adapter_promoted",
        "alice@example.org",
        {"stage": "production"},
    )
    assert isinstance(promotion["occurred_at"], datetime) and promotion["occurred_at"].tzinfo == UTC
    assert row["started_at"] <= row["finished_at"] <= promotion["occurred_at"]
    assert not any(event["dagster_run_id"] == "run-2" for event in row["audit_events"])


def test_lineage_follows_the_adapter_to_the_uri_it_was_promoted_to(migrated_store, record_training):
    adapter_sha256, _ = record_training(migrated_store, "run-1")
    record_training(migrated_store, "run-2", adapter_name="other")
    promoted_uri = "s3://models/promoted/adapter-1"
    migrated_store.append_audit_event(
        "adapter_promoted", actor="alice", artifact_uri=promoted_uri, artifact_sha256=adapter_sha256
    )

    [row] = migrated_store.lineage(promoted_uri)

    assert (row["dagster_run_id"], row["adapter_sha256"]) == ("run-1", adapter_sha256)
    assert row["audit_events"][-1]["artifact_uri"] == promoted_uri


def test_lineage_lists_every_step_that_produced_the_same_bytes_newest_first(migrated_store, record_training):
    # Deterministic training can reproduce an adapter bit for bit in a later run: both runs are its lineage.
    record_training(migrated_store, "run-1", adapter_name="same-bytes")
    record_training(migrated_store, "run-2", adapter_name="same-bytes")
    assert [row["dagster_run_id"] for row in migrated_store.lineage(sha256_of("same-bytes"))] == ["run-2", "run-1"]


def test_lineage_of_an_unknown_adapter_is_empty(migrated_store, record_training):
    record_training(migrated_store)
    assert migrated_store.lineage("0" * 64) == []


def test_lineage_is_one_sql_statement(migrated_store, record_training):
    adapter_sha256, _ = record_training(migrated_store)
    statements: list[str] = []

    def remember(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    sa.event.listen(migrated_store.engine, "before_cursor_execute", remember)
    try:
        assert len(migrated_store.lineage(adapter_sha256)) == 1
    finally:
        sa.event.remove(migrated_store.engine, "before_cursor_execute", remember)
    # SQLite's explicit BEGIN IMMEDIATE is transaction control, not a query.
    queries = [statement for statement in statements if not statement.startswith("BEGIN")]
    assert len(queries) == 1 and "adapter_lineage" in queries[0]
    assert "adapter_lineage" in str(lineage_statement(adapter_sha256))


def test_documented_lineage_queries_answer_the_auditor(postgres_store, record_training):
    """The SQL in docs/metadata.md runs as written (Postgres) and answers who promoted what, when."""
    store = postgres_store
    store.migrate()
    adapter_sha256, adapter_uri = record_training(store)
    promoted_uri = "s3://models/promoted/adapter-1"
    store.append_audit_event(
        "adapter_promoted", actor="alice@example.org", artifact_uri=promoted_uri, artifact_sha256=adapter_sha256
    )
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metadata.md").read_text()
    lineage_sql, auditor_sql = re.findall(r"```sql\n(.*?)```", docs, flags=re.DOTALL)

    with store.engine.connect() as conn:
        for adapter in (adapter_sha256, adapter_uri, promoted_uri):
            [lineage_row] = conn.execute(sa.text(lineage_sql), {"adapter": adapter}).mappings().all()
            assert lineage_row["dagster_run_id"] == "run-1"
        [auditor_row] = conn.execute(sa.text(auditor_sql), {"adapter": promoted_uri}).mappings().all()
    assert (auditor_row["base_model_sha256"], auditor_row["dataset_hash"], auditor_row["git_commit"]) == (
        BASE_MODEL_SHA256,
        DATASET_HASH,
        "a0c3e2c",
    )
    assert auditor_row["promoted_by"] == "alice@example.org" and auditor_row["promoted_at"]
