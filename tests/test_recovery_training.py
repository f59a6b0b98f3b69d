"""Training recovers by itself: damaged checkpoints are skipped, a SIGKILLed step is retried by Dagster and
resumes exactly, and errors a retry cannot fix fail once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance

from pixtrain_dagster.core.artifacts import MANIFEST_NAME, ArtifactStore
from pixtrain_dagster.core.checkpoints import (
    KILL_AFTER_CHECKPOINT_ENV,
    checkpoint_candidates,
    kill_after_checkpoint_if_requested,
    latest_valid_checkpoint,
)
from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings
from pixtrain_dagster.core.training import train_lora_adapter

from support import SAMPLE_DATASET, materialize_with_cli, tiny_run_config

SETTINGS = LoraTrainingSettings(
    max_steps=6,
    micro_batch_size=2,
    gradient_accumulation_steps=1,
    max_seq_len=160,
    learning_rate=5e-3,
    warmup_steps=1,
    checkpoint_every_n_steps=2,
    seed=5,
)


def _train(store, tiny_model_dir, **kwargs):
    rows = load_conversations(SAMPLE_DATASET)
    return train_lora_adapter(
        store=store,
        base_snapshot_dir=tiny_model_dir,
        base_model_sha256="base",
        dataset_sha256="data",
        train_conversations=rows[:24],
        validation_conversations=rows[24:28],
        settings=SETTINGS,
        runtime=RuntimeSettings(device="cpu", wandb_mode="disabled"),
        base_model_name="models/tiny",
        **kwargs,
    )


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_is_skipped_and_training_resumes_from_the_previous_one(tmp_path, tiny_model_dir):
    store = ArtifactStore(tmp_path / "artifacts")
    reference = _train(store, tiny_model_dir)
    fingerprint = reference.fingerprint
    assert [Path(k).name for k in checkpoint_candidates(store, fingerprint)] == [
        "step-000006",
        "step-000004",
        "step-000002",
    ]

    # A flipped byte in the newest checkpoint: its manifest still says "complete", its sha256 does not match.
    _flip_a_byte(Path(store.uri(f"checkpoints/{fingerprint}/step-000006")) / "checkpoint.ckpt")
    skipped = []
    resumed = _train(store, tiny_model_dir, on_invalid_checkpoint=skipped.append)
    assert [Path(s.key).name for s in skipped] == ["step-000006"] and "sha256" in skipped[0].reason
    assert (resumed.resumed_from_step, resumed.steps_this_run, resumed.final_step) == (4, 2, 6)
    assert resumed.adapter.sha256 == reference.adapter.sha256  # same bytes as the uninterrupted run
    assert latest_valid_checkpoint(store, fingerprint).endswith("step-000006")  # re-published intact

    # Newest one without its manifest and the one before it corrupt: back to step 2.
    (Path(store.uri(f"checkpoints/{fingerprint}/step-000006")) / MANIFEST_NAME).unlink()
    _flip_a_byte(Path(store.uri(f"checkpoints/{fingerprint}/step-000004")) / "checkpoint.ckpt")
    skipped.clear()
    resumed = _train(store, tiny_model_dir, on_invalid_checkpoint=skipped.append)
    assert [Path(s.key).name for s in skipped] == ["step-000006", "step-000004"]
    assert MANIFEST_NAME in skipped[0].reason
    assert (resumed.resumed_from_step, resumed.final_step) == (2, 6)
    assert resumed.adapter.sha256 == reference.adapter.sha256


def test_kill_hook_is_off_by_default_and_validates_its_value():
    kill_after_checkpoint_if_requested(2, environ={})  # returns: nothing set
    kill_after_checkpoint_if_requested(2, environ={KILL_AFTER_CHECKPOINT_ENV: "4"})  # another step
    with pytest.raises(ValueError, match=KILL_AFTER_CHECKPOINT_ENV):
        kill_after_checkpoint_if_requested(2, environ={KILL_AFTER_CHECKPOINT_ENV: "two"})


def _materialize_upstream(tiny_model_dir, config):
    from pixtrain_dagster.definitions import build_definitions

    job = build_definitions().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config=config,
        instance=DagsterInstance.get(),
        asset_selection=[AssetKey(n) for n in ("base_model", "raw_conversations", "training_dataset")],
    )
    assert result.success


def _training_only(config: dict) -> dict:
    import copy

    return {"ops": {"lora_training": copy.deepcopy(config["ops"]["lora_training"])}}


def test_sigkilled_training_step_is_retried_by_dagster_and_ends_byte_identical(pipeline_env, tiny_model_dir, tmp_path):
    """The step process dies by SIGKILL right after checkpoint 2 (an OOM kill, a lost node); Dagster's
    RetryPolicy starts it again, it resumes from that checkpoint, and the adapter equals an uninterrupted run's."""
    config = tiny_run_config(tiny_model_dir, max_steps=4, checkpoint_every_n_steps=2)
    _materialize_upstream(tiny_model_dir, config)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(_training_only(config)))
    env = {
        **os.environ,
        "PIXTRAIN_EXECUTOR": "multiprocess",
        KILL_AFTER_CHECKPOINT_ENV: "2",
        "PIXTRAIN_STEP_RETRY_DELAY_S": "0",
    }
    completed = materialize_with_cli("lora_adapter,training_checkpoints", config_file, env)
    assert completed.returncode == 0, completed.stderr[-4000:]

    instance = DagsterInstance.get()
    [run] = instance.get_run_records(limit=1)
    events = [r.event_log_entry for r in instance.get_records_for_run(run.dagster_run.run_id).records]
    kinds = [e.dagster_event.event_type for e in events if e.dagster_event]
    assert kinds.count(DagsterEventType.STEP_START) == 1 and kinds.count(DagsterEventType.STEP_RESTARTED) == 1
    assert kinds.count(DagsterEventType.STEP_UP_FOR_RETRY) == 1 and DagsterEventType.STEP_FAILURE not in kinds
    crash = [
        e.dagster_event.message
        for e in events
        if e.dagster_event
        and e.dagster_event.event_type == DagsterEventType.ENGINE_EVENT
        and "child process for step lora_training" in (e.dagster_event.message or "")
    ]
    assert len(crash) == 1 and "terminated by signal 9 (SIGKILL)" in crash[0], crash
    materialization = instance.get_latest_materialization_event(AssetKey("lora_adapter")).asset_materialization
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert (metadata["resumed_from_step"], metadata["steps_this_run"], metadata["steps"]) == (2, 2, 4)
    store = ArtifactStore(pipeline_env["artifact_root"])
    adapter_key = store.key_of(metadata["dagster/uri"])
    retried_bytes = (store.local_path(adapter_key) / "adapter_model.safetensors").read_bytes()

    # The same training, uninterrupted and from scratch (resume=False), in-process.
    from pixtrain_dagster.definitions import build_definitions

    fresh = _training_only(config)
    fresh["ops"]["lora_training"]["config"]["resume"] = False
    job = build_definitions().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config=fresh,
        instance=instance,
        asset_selection=[AssetKey("lora_adapter"), AssetKey("training_checkpoints")],
    )
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("lora_adapter")]
    uninterrupted = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (uninterrupted["resumed_from_step"], uninterrupted["steps_this_run"]) == (0, 4)
    assert uninterrupted["sha256"] == metadata["sha256"]
    assert (store.local_path(adapter_key) / "adapter_model.safetensors").read_bytes() == retried_bytes

    # The training record: the killed attempt and its retry are one training run, resumed from step 2.
    from pixtrain_dagster.metadata import TrainingMetadataStore

    records = TrainingMetadataStore.from_url(
        None, sqlite_path=pipeline_env["dagster_home"] / "pixtrain_metadata.sqlite"
    )
    lineage = [row for row in records.lineage(metadata["sha256"]) if row["dagster_run_id"] == run.dagster_run.run_id]
    [row] = lineage
    started = [e for e in row["audit_events"] if e["event"] == "training_run_started"]
    assert sorted(e["details"]["attempt"] for e in started) == [0, 1]
    [resumed] = [e for e in row["audit_events"] if e["event"] == "training_resumed"]
    assert resumed["details"]["from_step"] == 2
    assert [c["global_step"] for c in row["checkpoints"]] == [2, 4]  # each once, across both attempts

    # Damage the newest checkpoint: the next materialisation skips it (warning + audit event), resumes from 2.
    newest = Path(store.uri(f"checkpoints/{metadata['fingerprint']}/step-000004")) / "checkpoint.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    result = job.execute_in_process(
        run_config=_training_only(config),
        instance=instance,
        asset_selection=[AssetKey("lora_adapter"), AssetKey("training_checkpoints")],
    )
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("lora_adapter")]
    again = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (again["resumed_from_step"], again["sha256"]) == (2, metadata["sha256"])
    [row] = [r for r in records.lineage(metadata["sha256"]) if r["dagster_run_id"] == result.run_id]
    [skipped] = [e for e in row["audit_events"] if e["event"] == "checkpoint_skipped_damaged"]
    assert skipped["artifact_uri"].endswith("step-000004") and "sha256" in skipped["details"]["reason"]
    records.dispose()


def test_config_error_fails_once_without_retries(pipeline_env, tiny_model_dir):
    config = tiny_run_config(tiny_model_dir, max_steps=2, lora_target_modules=["no_such_projection"])
    _materialize_upstream(tiny_model_dir, config)
    from pixtrain_dagster.definitions import build_definitions

    job = build_definitions().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config=_training_only(config),
        instance=DagsterInstance.get(),
        asset_selection=[AssetKey("lora_adapter"), AssetKey("training_checkpoints")],
        raise_on_error=False,
    )
    assert not result.success
    kinds = [e.event_type for e in result.all_events]
    assert kinds.count(DagsterEventType.STEP_START) == 1 and DagsterEventType.STEP_UP_FOR_RETRY not in kinds
    [failure] = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = failure.event_specific_data.error.to_string()
    assert "no_such_projection" in message and "do not fit this model" in message and "not retried" in message


def test_a_failed_blocking_gate_is_not_retried(tmp_path, monkeypatch):
    """A gate (blocking asset check) failing on a step with the GPU steps' retry policy fails once."""
    from dagster import AssetCheckResult, AssetCheckSpec, Output, asset, materialize

    from pixtrain_dagster.recovery import GPU_POOL, gpu_step_retry_policy

    monkeypatch.setenv("PIXTRAIN_STEP_RETRY_DELAY_S", "0")
    attempts = []

    @asset(
        pool=GPU_POOL,
        retry_policy=gpu_step_retry_policy(),
        check_specs=[AssetCheckSpec("gate", asset="gated", blocking=True)],
    )
    def gated():
        attempts.append(1)
        yield Output(1)
        yield AssetCheckResult(check_name="gate", passed=False)

    result = materialize([gated], raise_on_error=False)
    assert not result.success and len(attempts) == 1
    kinds = [e.event_type for e in result.all_events]
    assert DagsterEventType.STEP_UP_FOR_RETRY not in kinds and kinds.count(DagsterEventType.STEP_FAILURE) == 1
