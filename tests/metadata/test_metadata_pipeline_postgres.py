"""The whole pipeline (tiny model) with the production instance config: Dagster's run and event storage and our
training record both land in PostgreSQL, and a second materialisation adds a run without duplicating data."""

# No `from __future__ import annotations`: consistent with the Dagster-facing modules.

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from pixtrain_dagster.metadata import TrainingMetadataStore

from .test_metadata_dagster_instance import CONNECTION_ENV_VARS, PRODUCTION_DAGSTER_YAML
from support import tiny_run_config

METADATA_RESOURCE_KEY = "training_metadata"


def _materialization_metadata(result, asset_key: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset_key]
    return {name: value.value for name, value in event.materialization.metadata.items()}


@pytest.fixture
def production_instance_env(pipeline_env, monkeypatch, postgres_database_url) -> sa.URL:
    """pipeline_env's DAGSTER_HOME with docker/dagster.yaml; Dagster and the training record on one database."""
    url = postgres_database_url
    (pipeline_env["dagster_home"] / "dagster.yaml").write_text(PRODUCTION_DAGSTER_YAML.read_text())
    values = {
        "hostname": url.host,
        "port": str(url.port),
        "username": url.username,
        "password": "",
        "db_name": url.database,
    }
    for field, name in CONNECTION_ENV_VARS.items():
        monkeypatch.setenv(name, values[field])
    monkeypatch.setenv("PIXTRAIN_METADATA_DATABASE_URL", url.render_as_string(hide_password=False))
    return url


@pytest.mark.slow
def test_whole_pipeline_on_postgres_records_dagster_runs_and_training_lineage(
    production_instance_env, tiny_model_dir, request
):
    from pixtrain_dagster.definitions import build_definitions

    defs = build_definitions()
    if METADATA_RESOURCE_KEY not in (defs.resources or {}):
        pytest.fail(f"the pipeline has no {METADATA_RESOURCE_KEY!r} resource (TrainingMetadataResource) yet")
    run_config = tiny_run_config(tiny_model_dir)
    job = defs.resolve_implicit_global_asset_job_def()

    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        first = job.execute_in_process(run_config=run_config, instance=instance)
        assert first.success
        second = job.execute_in_process(run_config=run_config, instance=instance)  # resumes: nothing to train
        assert second.success

    materialized = {e.asset_key.to_user_string() for e in first.get_asset_materialization_events()}
    engine = sa.create_engine(production_instance_env)
    with engine.connect() as conn:
        # Dagster's own records, in Postgres.
        assert conn.execute(
            sa.text("SELECT count(*) FROM runs WHERE run_id IN (:a, :b)"), {"a": first.run_id, "b": second.run_id}
        ).scalar_one() == 2  # fmt: skip
        materialization_events = conn.execute(
            sa.text("SELECT count(*) FROM event_logs WHERE run_id = :run_id AND dagster_event_type = :event_type"),
            {"run_id": first.run_id, "event_type": "ASSET_MATERIALIZATION"},
        ).scalar_one()
        assert materialization_events == len(materialized)
    engine.dispose()

    # Our training record, in the same database.
    adapter = _materialization_metadata(first, "lora_adapter")
    base_model = _materialization_metadata(first, "base_model")
    store = TrainingMetadataStore.from_url(production_instance_env)
    lineage = store.lineage(adapter["sha256"])
    first_run = [row for row in lineage if row["dagster_run_id"] == first.run_id]
    assert len(first_run) == 1, lineage
    [row] = first_run
    assert row["status"] == "succeeded"
    assert row["adapter_uri"] == str(adapter["dagster/uri"])
    assert row["base_model_sha256"] == base_model["sha256"]
    assert len(row["checkpoints"]) == 2  # max_steps 4, a checkpoint every 2 steps
    assert row["evaluations"], "adapter_evaluation recorded nothing"
    # Re-materialising: one more training run, the same (content-addressed) dataset version, no duplicates.
    assert store.count_rows("training_runs") == 2
    assert store.count_rows("dataset_versions") == 1
    with store.engine.connect() as conn:
        duplicated_checkpoints = conn.execute(
            sa.text("SELECT count(*) FROM (SELECT uri FROM checkpoints GROUP BY uri HAVING count(*) > 1) d")
        ).scalar_one()
    assert duplicated_checkpoints == 0
    store.dispose()
