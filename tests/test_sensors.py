"""Sensors: retraining requests from the landing location, and alerts naming failed runs and checks."""

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from dagster import (
    DagsterEventType,
    DagsterInstance,
    RunRequest,
    SkipReason,
    build_run_status_sensor_context,
    build_sensor_context,
)

from pixtrain_dagster.resources import ArtifactStoreResource

from support import SAMPLE_DATASET, tiny_run_config


def evaluate(cursor, instance):
    from pixtrain_dagster.sensors import new_training_data

    context = build_sensor_context(
        cursor=cursor, instance=instance, resources={"artifact_store": ArtifactStoreResource.from_env()}
    )
    result = new_training_data(context)
    return result, context.cursor


def test_new_changed_and_unchanged_files(pipeline_env):
    instance = DagsterInstance.ephemeral()
    landing = pipeline_env["landing"]

    first, cursor = evaluate(None, instance)  # the seeded sample file is new
    assert isinstance(first, RunRequest) and first.run_key.startswith("dataset-")
    assert first.tags["pixtrain/changed_files"] == SAMPLE_DATASET.name

    again, cursor_after = evaluate(cursor, instance)  # nothing changed
    assert isinstance(again, SkipReason) and cursor_after == cursor

    # A restarted daemon has only the cursor string it stored: with it, a fresh instance still has nothing to do.
    restarted, _ = evaluate(cursor, DagsterInstance.ephemeral())
    assert isinstance(restarted, SkipReason)

    extra = landing / "week-48.jsonl"
    extra.write_text(SAMPLE_DATASET.read_text().splitlines()[0] + "\n")
    added, cursor = evaluate(cursor, instance)
    assert isinstance(added, RunRequest) and added.run_key != first.run_key
    assert added.tags["pixtrain/changed_files"] == "week-48.jsonl"

    time.sleep(0.01)
    extra.write_text(SAMPLE_DATASET.read_text().splitlines()[1] + "\n")  # same name, new content
    changed, cursor = evaluate(cursor, instance)
    assert isinstance(changed, RunRequest) and changed.run_key not in (first.run_key, added.run_key)

    os.utime(extra)  # touched but identical: hashed again, no request
    touched, cursor = evaluate(cursor, instance)
    assert isinstance(touched, SkipReason)

    extra.unlink()  # data removed (e.g. a deletion request): a new dataset version to train without it
    removed, _ = evaluate(cursor, instance)
    assert isinstance(removed, RunRequest) and removed.tags["pixtrain/changed_files"] == "week-48.jsonl"
    assert removed.run_key == first.run_key  # same files as at first: already trained, Dagster skips the key


def test_run_key_is_the_dataset_version_raw_conversations_records(pipeline_env, tiny_model_dir):
    from test_pipeline import _keys

    from support import materialized_metadata, run_job

    request, _ = evaluate(None, DagsterInstance.ephemeral())
    result = run_job(tiny_run_config(tiny_model_dir), selection=_keys("raw_conversations"))
    version = materialized_metadata(result, "raw_conversations")["dataset_version"]
    assert request.run_key == f"dataset-{version[:16]}"
    assert request.tags["pixtrain/dataset_version"] == version


class _Webhook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_failure_alert_names_the_run_and_the_failed_check(pipeline_env, tiny_model_dir, monkeypatch, caplog):
    from test_pipeline import _keys, run_job

    from pixtrain_dagster.sensors import alert_on_failure

    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIXTRAIN_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    config = tiny_run_config(tiny_model_dir)
    config["ops"]["training_dataset"] = {"config": {"min_train_records": 10_000}}  # enough_rows must fail
    result = run_job(
        config,
        selection=_keys("raw_conversations", "training_dataset", "lora_adapter", "training_checkpoints"),
        raise_on_error=False,
    )
    assert not result.success
    instance = DagsterInstance.get()
    run = instance.get_run_by_id(result.run_id)
    [failure] = [e.dagster_event for e in instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)]
    context = build_run_status_sensor_context(
        sensor_name="alert_on_failure", dagster_event=failure, dagster_instance=instance, dagster_run=run
    ).for_run_failure()
    with caplog.at_level(logging.ERROR, logger="pixtrain_dagster.sensors"):
        alert_on_failure(context)
    server.shutdown()
    [payload] = _Webhook.received
    assert result.run_id in payload["text"] and "training_dataset:enough_rows" in payload["text"]
    assert any("training_dataset:enough_rows" in r.message for r in caplog.records)
