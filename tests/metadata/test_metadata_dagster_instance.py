"""docker/dagster.yaml: the production Dagster instance on Postgres, configured only from the environment."""

from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from dagster import DagsterInstance

from pixtrain_dagster.metadata import TrainingMetadataStore

REPO_ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_DAGSTER_YAML = REPO_ROOT / "docker" / "dagster.yaml"
CONNECTION_ENV_VARS = {
    "hostname": "DAGSTER_PG_HOST",
    "port": "DAGSTER_PG_PORT",
    "username": "DAGSTER_PG_USER",
    "password": "DAGSTER_PG_PASSWORD",
    "db_name": "DAGSTER_PG_DB",
}


def test_every_connection_setting_comes_from_an_environment_variable():
    config = yaml.safe_load(PRODUCTION_DAGSTER_YAML.read_text())
    postgres_db = config["storage"]["postgres"]["postgres_db"]
    connection = {field: value for field, value in postgres_db.items() if field != "scheme"}
    assert connection == {field: {"env": name} for field, name in CONNECTION_ENV_VARS.items()}
    # dagster-postgres needs psycopg2: with psycopg 3 (SQLAlchemy 2.1's default) its NOTIFY fails.
    assert postgres_db["scheme"] == "postgresql+psycopg2"


@pytest.fixture
def production_dagster_home(tmp_path, monkeypatch, postgres_database_url) -> Path:
    """A DAGSTER_HOME holding docker/dagster.yaml, with the DAGSTER_PG_* variables pointing at the test database."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(PRODUCTION_DAGSTER_YAML.read_text())
    url = postgres_database_url
    values = {
        "hostname": url.host,
        "port": str(url.port),
        "username": url.username,
        "password": "any-password-trust-auth",
        "db_name": url.database,
    }
    for field, name in CONNECTION_ENV_VARS.items():
        monkeypatch.setenv(name, values[field])
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_production_instance_stores_runs_in_postgres_next_to_the_training_record(
    production_dagster_home, postgres_database_url
):
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_runs() == []

    # Our store can share the database: its own tables and its own Alembic version table.
    store = TrainingMetadataStore.from_url(postgres_database_url)
    store.migrate()
    tables = set(sa.inspect(store.engine).get_table_names())
    store.dispose()
    assert {"runs", "event_logs", "alembic_version"} <= tables  # Dagster's
    assert {"training_runs", "audit_events", "pixtrain_metadata_alembic_version"} <= tables  # ours
