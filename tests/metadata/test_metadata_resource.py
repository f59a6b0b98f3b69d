"""TrainingMetadataResource inside Dagster: database from the environment at runtime, SQLite fallback under
DAGSTER_HOME, fast and secret-free failure when the database is unreachable, light import."""

# No `from __future__ import annotations` here: Dagster checks the asset's `context` annotation as a real type.
import socket
import subprocess
import sys
import time

import pytest
from dagster import AssetExecutionContext, DagsterInstance, asset, materialize

from pixtrain_dagster.metadata import database_url_from_env
from pixtrain_dagster.resources.metadata import TrainingMetadataResource, step_identity

PASSWORD = "pw-must-not-leak-91c2"
DB_ENV_VARS = (
    "PIXTRAIN_METADATA_DATABASE_URL",
    "PIXTRAIN_DB_HOST",
    "PIXTRAIN_DB_PORT",
    "PIXTRAIN_DB_USER",
    "PIXTRAIN_DB_PASSWORD",
    "PIXTRAIN_DB_NAME",
    "PIXTRAIN_DB_SSLMODE",
)


@pytest.fixture(autouse=True)
def no_database_configured(monkeypatch, tmp_path):
    for name in DB_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()


@asset
def recorded_dataset(context: AssetExecutionContext, training_metadata: TrainingMetadataResource) -> str:
    store = training_metadata.get_store()
    step = step_identity(context)
    store.record_dataset_version(
        "d" * 64, source_uri="file:///d", num_rows_raw=2, num_rows_clean=2, scrub_counts={}, run_id=step.run_id
    )
    assert (step.run_id, step.step_key, step.attempt, step.actor) == (
        context.run.run_id,
        "recorded_dataset",
        0,
        "dagster",
    )
    return store.backend


def _materialize(resource: TrainingMetadataResource) -> tuple[bool, str]:
    """Materialise ``recorded_dataset``; returns (success, everything the run logged: events and messages)."""
    with DagsterInstance.ephemeral() as instance:
        result = materialize(
            [recorded_dataset], resources={"training_metadata": resource}, instance=instance, raise_on_error=False
        )
        logged = "\n".join(
            f"{entry.user_message} {entry.dagster_event!r}" for entry in instance.all_logs(result.run_id)
        )
        logged += f"\nrun config: {result.dagster_run.run_config}"
        backend = result.output_for_node("recorded_dataset") if result.success else None
    return backend, logged


def test_without_a_database_url_the_store_is_sqlite_under_dagster_home(tmp_path):
    backend, _ = _materialize(TrainingMetadataResource())

    assert backend == "sqlite"
    assert (tmp_path / "dagster_home" / "pixtrain_metadata.sqlite").is_file()


def test_database_url_is_read_from_the_environment_at_runtime_and_never_shown(monkeypatch, postgres_url):
    url_with_password = postgres_url.set(password=PASSWORD)  # trust auth: any password is accepted
    monkeypatch.setenv("PIXTRAIN_METADATA_DATABASE_URL", url_with_password.render_as_string(hide_password=False))
    resource = TrainingMetadataResource()

    backend, logged = _materialize(resource)

    assert backend == "postgresql"
    assert f"{postgres_url.host}:{postgres_url.port}" in logged  # the run log says where the store is...
    assert PASSWORD not in logged  # ...but not how to log in (run config included)
    assert PASSWORD not in repr(resource)


def test_unreachable_database_fails_the_step_fast_naming_host_port_without_password(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PIXTRAIN_DB_HOST", "127.0.0.1")
    monkeypatch.setenv("PIXTRAIN_DB_PORT", str(port))
    monkeypatch.setenv("PIXTRAIN_DB_PASSWORD", PASSWORD)

    started = time.monotonic()
    backend, logged = _materialize(TrainingMetadataResource())
    elapsed = time.monotonic() - started

    assert backend is None  # the run failed
    assert elapsed < 20  # Dagster's own start-up included; the store gives up after ~1.5 s
    assert "MetadataStoreUnavailable" in logged
    assert f"127.0.0.1:{port}" in logged
    assert PASSWORD not in logged


def test_url_is_assembled_from_parts_with_the_password_escaped():
    url = database_url_from_env(
        {
            "PIXTRAIN_DB_HOST": "db.internal",
            "PIXTRAIN_DB_PORT": "6432",
            "PIXTRAIN_DB_USER": "pixtrain",
            "PIXTRAIN_DB_PASSWORD": "p@ss:w/rd",
            "PIXTRAIN_DB_NAME": "training",
            "PIXTRAIN_DB_SSLMODE": "verify-full",
        }
    )
    assert (url.drivername, url.host, url.port, url.username, url.database) == (
        "postgresql+psycopg",
        "db.internal",
        6432,
        "pixtrain",
        "training",
    )
    assert url.password == "p@ss:w/rd"
    assert url.query == {"sslmode": "verify-full"}
    assert "p@ss" not in str(url)


def test_a_whole_url_wins_over_parts_and_nothing_configured_means_sqlite():
    url = database_url_from_env({"PIXTRAIN_METADATA_DATABASE_URL": "postgresql://u@h1/db", "PIXTRAIN_DB_HOST": "h2"})
    assert (url.drivername, url.host) == ("postgresql+psycopg", "h1")
    assert database_url_from_env({}) is None


def test_importing_the_resource_module_loads_no_database_code():
    code = (
        "import sys, pixtrain_dagster.resources.metadata\n"
        "loaded = [m for m in ('pixtrain_dagster.metadata', 'alembic', 'psycopg', 'torch') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
