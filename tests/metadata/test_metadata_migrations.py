"""Versioned migrations: from empty, re-run, round trip, concurrent callers, and agreement with schema.py."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from pixtrain_dagster.metadata import TrainingMetadataStore
from pixtrain_dagster.metadata.schema import VERSION_TABLE, metadata

OUR_TABLES = {"dataset_versions", "training_runs", "checkpoints", "evaluations", "audit_events"}


def _tables_and_views(store: TrainingMetadataStore) -> tuple[set[str], set[str]]:
    inspector = sa.inspect(store.engine)
    return set(inspector.get_table_names()), set(inspector.get_view_names())


def test_migrate_from_empty_creates_every_table_and_the_lineage_view(store):
    assert store.current_revision() is None
    assert _tables_and_views(store) == (set(), set())

    revision = store.migrate()

    assert revision == TrainingMetadataStore.head_revision() == "0001_initial_schema"
    tables, views = _tables_and_views(store)
    assert tables == OUR_TABLES | {VERSION_TABLE}
    assert views == {"adapter_lineage"}


def test_migrate_again_is_a_no_op_that_keeps_data(store, record_training):
    store.migrate()
    record_training(store)
    counts_before = {table: store.count_rows(table) for table in OUR_TABLES}

    assert store.migrate() == "0001_initial_schema"

    assert {table: store.count_rows(table) for table in OUR_TABLES} == counts_before
    with store.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar_one() == 1


def test_migrated_schema_matches_table_definitions(store):
    """The runtime's tables (schema.py) and the migrations' tables must not drift apart."""
    store.migrate()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_downgrade_to_base_then_upgrade_round_trips(store, record_training):
    store.migrate()
    record_training(store)

    assert store.downgrade("base") is None
    assert _tables_and_views(store) == ({VERSION_TABLE}, set())

    store.migrate()
    assert _tables_and_views(store)[1] == {"adapter_lineage"}
    assert store.count_rows("training_runs") == 0
    record_training(store)  # the schema works after the round trip (triggers and view re-created)
    assert store.count_rows("training_runs") == 1


def test_concurrent_migrate_calls_serialise(store):
    """Parallel step processes all call migrate() at start; exactly one creates the schema."""
    stores = [TrainingMetadataStore(store.engine.engine) for _ in range(4)]
    errors: list[BaseException] = []
    revisions: list[str | None] = []

    def migrate(each: TrainingMetadataStore) -> None:
        try:
            revisions.append(each.migrate())
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(each,)) for each in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert revisions == ["0001_initial_schema"] * 4
    with store.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar_one() == 1
