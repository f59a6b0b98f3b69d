"""The audit trail the pipeline cannot rewrite (issue 9, point 4), on the real PostgreSQL server.

A throwaway database and unique roles per test, set up the way a DBA would (`db-setup-sql`), migrated by the
owner role through the CLI (`db-migrate`), then used AS the pipeline's login role: every store write works;
rewriting, truncating or re-defining the audit log, DDL and an Alembic downgrade all fail. Roles and database
are dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from pixtrain_dagster import cli
from pixtrain_dagster.metadata import TrainingMetadataStore
from pixtrain_dagster.metadata.roles import RoleSetupError, dba_setup_sql

from .conftest import _admin_engine, _create_database
from .metadata_samples import record_training


@dataclass
class Deployment:
    owner: TrainingMetadataStore
    app: TrainingMetadataStore
    app_url: URL
    owner_url: URL
    admin_db_url: URL
    roles: dict[str, str]


def _run_as_admin(url: URL, sql: str) -> None:
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            for statement in sql.split(";\n"):
                lines = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
                if "".join(lines).strip():
                    conn.exec_driver_sql("\n".join(lines))
    finally:
        engine.dispose()


@pytest.fixture
def deployment(postgres_admin_url: URL, monkeypatch) -> Iterator[Deployment]:
    suffix = uuid.uuid4().hex[:10]
    roles = {"owner": f"pxo_{suffix}", "writer": f"pxw_{suffix}", "login": f"pxa_{suffix}"}
    db_url = _create_database(postgres_admin_url)
    created_roles = list(roles.values())
    stores: list[TrainingMetadataStore] = []
    try:
        # 1. The DBA's one-time setup, exactly as printed by `db-setup-sql`.
        _run_as_admin(db_url, dba_setup_sql(roles["writer"], roles["login"], roles["owner"], db_url.database))
        owner_url = db_url.set(username=roles["owner"], password=None)
        app_url = db_url.set(username=roles["login"], password=None)
        # 2. The Helm hook Job: db-migrate as the owner (no CREATEROLE, not a superuser).
        monkeypatch.setenv(cli.OWNER_URL_ENV_VAR, owner_url.render_as_string(hide_password=False))
        assert cli.main(["db-migrate", "--writer-role", roles["writer"]]) == 0
        owner = TrainingMetadataStore.from_url(owner_url)
        app = TrainingMetadataStore.from_url(app_url)
        stores += [owner, app]
        yield Deployment(owner, app, app_url, owner_url, db_url, roles)
    finally:
        for store in stores:
            store.dispose()
        admin = _admin_engine(postgres_admin_url)
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db_url.database}" WITH (FORCE)')
                for role in [*created_roles, f"pxn_{suffix}"]:
                    conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        finally:
            admin.dispose()


def _audit_snapshot(store: TrainingMetadataStore) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text("SELECT * FROM audit_events ORDER BY id"))]


def test_the_pipeline_role_does_every_write_of_the_store(deployment):
    app = deployment.app
    assert app.current_revision() == TrainingMetadataStore.head_revision()
    assert app.migrate() == TrainingMetadataStore.head_revision()  # at head: a no-op the pipeline may call
    adapter_sha256, _ = record_training(app, "run-1")
    record_training(app, "run-1")  # a re-run upserts (UPDATE) its own rows
    app.record_evaluation(
        "run-1",
        "adapter_evaluation",
        adapter_sha256=adapter_sha256,
        eval_name="heldout",
        metrics={"ppl": 3.2},
        passed=True,
    )
    app.record_evaluation(
        "run-1",
        "adapter_evaluation",
        adapter_sha256=adapter_sha256,
        eval_name="heldout",
        metrics={"ppl": 3.1},
        passed=True,
    )
    app.append_audit_event(
        "adapter_promoted",
        actor="tester",
        artifact_sha256=adapter_sha256,
        run_id="run-1",
        details={"thresholds": {"min_ratio": 0.8}},
    )
    (lineage,) = app.lineage(adapter_sha256)
    assert [e["event"] for e in lineage["audit_events"]][-1] == "adapter_promoted"
    assert app.count_rows("audit_events") == 4  # dataset, start, finish (re-run: idempotent) + promotion
    assert app.least_privilege_problems() == []
    owner_problems = deployment.owner.least_privilege_problems()
    assert any("owns" in p for p in owner_problems) and any("CREATE" in p for p in owner_problems)


FORBIDDEN = {
    "update": "UPDATE audit_events SET actor = 'someone else'",
    "delete": "DELETE FROM audit_events",
    "truncate": "TRUNCATE audit_events",
    "alter_table": "ALTER TABLE audit_events ADD COLUMN note text",
    "disable_trigger": "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
    "drop_trigger": "DROP TRIGGER audit_events_append_only ON audit_events",
    "replace_trigger_function": (
        "CREATE OR REPLACE FUNCTION pixtrain_reject_audit_event_change() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$"
    ),
    "drop_table": "DROP TABLE audit_events",
    "rename_table": "ALTER TABLE audit_events RENAME TO audit_events_old",
    "create_table": "CREATE TABLE audit_events_shadow (id int)",
    "take_ownership": "ALTER TABLE audit_events OWNER TO CURRENT_USER",
    # GRANT without the grant option only warns ("no privileges were granted"); the DELETE after it fails.
    "grant_itself_then_delete": "GRANT UPDATE, DELETE ON audit_events TO CURRENT_USER; DELETE FROM audit_events",
    "drop_view": "DROP VIEW adapter_lineage",
    "update_migration_version": "UPDATE pixtrain_metadata_alembic_version SET version_num = 'x'",
}


@pytest.mark.parametrize("statement", FORBIDDEN.values(), ids=FORBIDDEN.keys())
def test_the_pipeline_role_cannot_rewrite_or_redefine_the_audit_log(deployment, statement):
    record_training(deployment.app, "run-1")
    before = _audit_snapshot(deployment.owner)
    assert before  # there is something to tamper with
    with deployment.app.engine.connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError) as error:
            conn.exec_driver_sql(statement)
    message = str(error.value.orig)
    # Refused by privileges, not by the trigger: the role never even reaches the table's rows.
    assert "permission denied" in message or "must be owner" in message, message
    assert _audit_snapshot(deployment.owner) == before


def test_set_role_to_the_owner_is_refused(deployment):
    with deployment.app.engine.connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied to set role"):
            conn.exec_driver_sql(f"SET ROLE {deployment.roles['owner']}")


def test_an_alembic_downgrade_as_the_pipeline_role_fails_and_changes_nothing(deployment):
    record_training(deployment.app, "run-1")
    before = _audit_snapshot(deployment.owner)
    with pytest.raises(sa.exc.ProgrammingError, match="must be owner"):
        deployment.app.downgrade("base")
    assert deployment.app.current_revision() == TrainingMetadataStore.head_revision()
    assert _audit_snapshot(deployment.owner) == before


def test_db_migrate_reapplies_grants_and_takes_back_extra_privileges(deployment):
    record_training(deployment.app, "run-1")
    with deployment.owner.engine.begin() as conn:  # someone widened the writer role by hand
        conn.exec_driver_sql(f"GRANT DELETE ON audit_events TO {deployment.roles['writer']}")
    assert any("DELETE" in p for p in deployment.app.least_privilege_problems())
    assert cli.main(["db-migrate", "--writer-role", deployment.roles["writer"]]) == 0  # idempotent re-run
    assert deployment.app.least_privilege_problems() == []
    with deployment.app.engine.connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.exec_driver_sql("DELETE FROM audit_events")


def test_a_missing_writer_role_is_a_clear_error_when_the_owner_cannot_create_roles(deployment, capsys):
    missing = f"pxn_{deployment.roles['owner'][4:]}"
    with pytest.raises(RoleSetupError, match="no CREATEROLE.*db-setup-sql"):
        deployment.owner.apply_grants(missing, create_role=True)
    assert cli.main(["db-migrate", "--writer-role", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    with deployment.owner.engine.connect() as conn:
        assert not conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": missing}).first()
    _run_as_admin(deployment.admin_db_url, f"ALTER ROLE {deployment.roles['owner']} CREATEROLE")
    assert cli.main(["db-migrate", "--writer-role", missing, "--create-role"]) == 0  # an owner with CREATEROLE


def test_the_step_resource_refuses_an_owner_connection_when_least_privilege_is_required(deployment, monkeypatch):
    from pixtrain_dagster.metadata import MetadataStoreError
    from pixtrain_dagster.resources.metadata import TrainingMetadataResource

    monkeypatch.setenv("PIXTRAIN_METADATA_EXTERNAL_MIGRATIONS", "true")
    monkeypatch.setenv("PIXTRAIN_METADATA_REQUIRE_LEAST_PRIVILEGE", "true")
    monkeypatch.setenv("PIXTRAIN_METADATA_DATABASE_URL", deployment.owner_url.render_as_string(hide_password=False))
    with pytest.raises(MetadataStoreError, match="too powerful: .*owns"):
        TrainingMetadataResource().get_store()
    monkeypatch.setenv("PIXTRAIN_METADATA_DATABASE_URL", deployment.app_url.render_as_string(hide_password=False))
    resource = TrainingMetadataResource()
    store = resource.get_store()
    try:
        record_training(store, "run-2")
    finally:
        store.dispose()
