"""The whole asset graph through Dagster: in-process, through the real CLI, resume and bad input."""

import json
import os
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from dagster._serdes import serialize_value
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pixtrain_dagster.core.artifacts import ArtifactStore

from support import materialize_with_cli, materialized_metadata, run_job, tiny_run_config

ALL_KEYS = {
    "base_model",
    "raw_conversations",
    "training_dataset",
    "lora_adapter",
    "training_checkpoints",
    "adapter_evaluation",
    "bias_report",
    "promoted_adapter",
}


SECRET = "hf_do-not-leak-1f9a2b7c"


def test_whole_graph_materialises_in_process(pipeline_env, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)  # present, as in production; must never be written anywhere
    result = run_job(tiny_run_config(tiny_model_dir))
    assert result.success
    keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert keys == ALL_KEYS
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {
        "schema_valid": True,
        "no_phi_left": True,
        "enough_rows": True,
        "training_sanity": True,
        "bias_gate": True,
    }

    dataset = materialized_metadata(result, "training_dataset")
    assert dataset["duplicates_dropped"] == 3 and dataset["records_with_phi"] == 79  # personas name the client
    assert dataset["train_records"] + dataset["validation_records"] == 90 == dataset["dagster/row_count"]
    assert [column.name for column in dataset["dagster/column_schema"].columns] == ["messages"]
    raw = materialized_metadata(result, "raw_conversations")
    assert raw["dagster/row_count"] == 93 and raw["dagster/uri"].startswith(str(pipeline_env["artifact_root"]))
    adapter = materialized_metadata(result, "lora_adapter")
    assert adapter["steps"] == 4 and adapter["tokens_per_second"] > 0 and adapter["trainable_parameters"] > 0
    assert adapter["wandb_run_id"] not in ("", "disabled")  # offline W&B run recorded
    assert Path(adapter["wandb_dir"]).is_relative_to(pipeline_env["wandb_dir"])
    evaluation = materialized_metadata(result, "adapter_evaluation")
    assert evaluation["base_perplexity"] > 1 and evaluation["adapter_perplexity"] > 1
    assert "Perplexity ratio" in evaluation["report"] and "### Sample" not in evaluation["report"]

    store = ArtifactStore(pipeline_env["artifact_root"])
    adapter_dir = store.local_path(store.key_of(adapter["dagster/uri"]))  # verifies the manifest too
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    assert model.peft_config["default"].r == 8
    # Nothing secret or half-written anywhere: artifacts, W&B files, Dagster's event log.
    assert not list((pipeline_env["artifact_root"] / ".staging").iterdir())
    for folder in ("artifact_root", "wandb_dir", "dagster_home"):
        for path in pipeline_env[folder].rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    events = DagsterInstance.get().all_logs(result.run_id)
    assert events and not any(SECRET in serialize_value(e) for e in events)


def test_resume_through_dagster_after_a_crash(pipeline_env, tiny_model_dir):
    """A training step killed mid-run; re-materialising continues from its newest checkpoint."""
    from test_training import CrashAfterStep

    from pixtrain_dagster.assets.training import LoraTrainingConfig
    from pixtrain_dagster.core.conversations import load_conversations
    from pixtrain_dagster.core.settings import RuntimeSettings
    from pixtrain_dagster.core.training import train_lora_adapter

    config = tiny_run_config(tiny_model_dir, max_steps=6)
    assert run_job(config, selection=_keys("base_model", "raw_conversations", "training_dataset")).success
    store = ArtifactStore(pipeline_env["artifact_root"])
    base = store.get_json("dagster/assets/base_model.json")
    dataset = store.get_json("dagster/assets/training_dataset.json")
    data_dir = store.local_path(dataset["key"])
    # The same work the training step does, killed after step 3 (checkpoints every 2 steps).
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora_adapter(
            store=store,
            base_snapshot_dir=store.local_path(base["key"]),
            base_model_sha256=base["sha256"],
            dataset_sha256=dataset["sha256"],
            train_conversations=load_conversations(data_dir / "train.jsonl"),
            validation_conversations=load_conversations(data_dir / "validation.jsonl"),
            settings=LoraTrainingConfig(**config["ops"]["lora_training"]["config"]).to_settings(),
            runtime=RuntimeSettings(device="cpu", wandb_mode="disabled"),
            extra_callbacks=[CrashAfterStep(3)],
        )
    result = run_job(config, selection=_keys("lora_adapter", "training_checkpoints"))
    metadata = materialized_metadata(result, "lora_adapter")
    assert (metadata["resumed_from_step"], metadata["steps_this_run"], metadata["steps"]) == (2, 4, 6)
    # The training record links the resumed run to the checkpoint it continued from.
    from pixtrain_dagster.metadata import TrainingMetadataStore

    records = TrainingMetadataStore.from_url(
        None, sqlite_path=pipeline_env["dagster_home"] / "pixtrain_metadata.sqlite"
    )
    [lineage] = records.lineage(metadata["sha256"])
    [resumed] = [e for e in lineage["audit_events"] if e["event"] == "training_resumed"]
    assert resumed["artifact_uri"].endswith("step-000002") and resumed["details"]["from_step"] == 2
    assert [c["global_step"] for c in lineage["checkpoints"]] == [4, 6]  # what this run wrote itself
    records.dispose()


def test_malformed_landing_file_fails_with_location_and_publishes_nothing(pipeline_env, tiny_model_dir):
    (pipeline_env["landing"] / "new-batch.jsonl").write_text('{"messages": []}\n{"messages": [ broken\n')
    result = run_job(tiny_run_config(tiny_model_dir), selection=_keys("raw_conversations"), raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.to_string()
    assert "new-batch.jsonl line 2: malformed JSON" in message
    assert not (pipeline_env["artifact_root"] / "datasets").exists()
    assert not list((pipeline_env["artifact_root"] / ".staging").iterdir())


def test_empty_landing_location_is_a_clear_error(pipeline_env, tiny_model_dir):
    for path in pipeline_env["landing"].iterdir():
        path.unlink()
    result = run_job(tiny_run_config(tiny_model_dir), selection=_keys("raw_conversations"), raise_on_error=False)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no .jsonl files in the landing location" in failure.event_specific_data.error.to_string()


def test_cli_materialises_the_graph(pipeline_env, tiny_model_dir, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, max_steps=2)))
    completed = materialize_with_cli("*", config_file, {**os.environ, "PIXTRAIN_EXECUTOR": "in_process"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "RUN_SUCCESS" in completed.stderr
    instance = DagsterInstance.get()
    for key in ALL_KEYS:
        assert instance.get_latest_materialization_event(_keys(key)[0]) is not None, key
    pointer = json.loads((pipeline_env["artifact_root"] / "dagster/assets/lora_adapter.json").read_text())
    assert pointer["training"]["final_step"] == 2


def _keys(*names):
    from dagster import AssetKey

    return [AssetKey(n) for n in names]
