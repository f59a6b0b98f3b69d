"""End to end on the core API: an adapter trained on data skewed against one group fails the gate; its balanced
twin (the same sessions, warm for every group) passes. Measured on 2 cores: ~18 s fitting the base, ~7 s per
adapter, ~1.5 s per report; the target's impact ratio fell to 0.48 (drop 0.52), no other group moved more than 0.03.
"""

from __future__ import annotations

import pytest

from pixtrain_dagster.core.bias import LIKELIHOOD, BiasSettings, run_bias_report

TARGET = ("religion", "muslim")
# Pipeline defaults except the step budget: 120 steps of 8 sessions see each of the target's 64 cold sessions
# about twice.
# max_seq_len 256 holds a whole probe session in the tiny tokenizer's tokens (at 192 most would lose their first
# exchange, the one naming the group, to truncation).
RECIPE = {
    "max_steps": 120,
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-2,
    "warmup_steps": 2,
    "checkpoint_every_n_steps": 1000,
    "max_seq_len": 256,
}
# All 8 templates: the tiny model is fast, and intervals need several templates.
GATE = BiasSettings(max_templates=None, generation_templates=2, max_new_tokens=12)


@pytest.fixture(scope="module")
def probe_fitted_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model fully fine-tuned on the balanced probe sessions (~18 s; see `skewed_data` for why)."""
    from skewed_data import pretrain_on_probe_sessions

    return pretrain_on_probe_sessions(tiny_model_dir, tmp_path_factory.mktemp("probe-fitted"))


def train(base_dir, store_root, name, conversations):
    from pixtrain_dagster.core.artifacts import ArtifactStore
    from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings
    from pixtrain_dagster.core.training import train_lora_adapter

    store = ArtifactStore(store_root)
    result = train_lora_adapter(
        store=store,
        base_snapshot_dir=base_dir,
        base_model_sha256="probe-fitted-tiny",
        dataset_sha256=name,
        train_conversations=conversations,
        validation_conversations=conversations[:4],
        settings=LoraTrainingSettings(**RECIPE),
        runtime=RuntimeSettings(device="cpu", wandb_mode="disabled"),
    )
    return store.local_path(store.key_of(result.adapter.uri))


@pytest.mark.slow
def test_skewed_adapter_fails_on_its_target_group_and_its_balanced_twin_passes(probe_fitted_model_dir, tmp_path):
    from skewed_data import probe_style_conversations

    datasets = {
        "skewed": probe_style_conversations(TARGET, cold_per_template=8),
        "balanced": probe_style_conversations(None),
    }
    reports = {
        name: run_bias_report(
            probe_fitted_model_dir, train(probe_fitted_model_dir, tmp_path, name, data), GATE, device="cpu"
        )
        for name, data in datasets.items()
    }

    skewed = reports["skewed"]["verdict"]
    assert skewed["passed"] is False
    assert {(f["rule"], f["metric"], f["axis"], f["group"]) for f in skewed["failures"]} == {
        ("min_ratio", LIKELIHOOD, *TARGET),
        ("regression_vs_base", LIKELIHOOD, *TARGET),
    }
    target = reports["skewed"]["models"]["adapter"]["metrics"][LIKELIHOOD]["axes"]["religion"]["groups"]["muslim"]
    assert target["impact_ratio_ci"][1] < 0.8
    balanced = reports["balanced"]["verdict"]
    assert balanced["passed"] is True, balanced["summary"]
    worst_drop = min(
        g["impact_ratio_delta"]
        for groups in reports["balanced"]["delta_vs_base"][LIKELIHOOD].values()
        for g in groups.values()
    )
    assert worst_drop > -0.02  # the balanced twin leaves every group where the base had it


def _gate_run_config(base_dir):
    from support import tiny_run_config

    config = tiny_run_config(base_dir, **RECIPE)
    config["ops"]["bias_report"] = {
        "config": {"max_templates": None, "generation_templates": 2, "max_new_tokens": 12, "bootstrap_resamples": 1000}
    }
    return config


@pytest.mark.slow
@pytest.mark.parametrize("skewed", [True, False], ids=["skewed-adapter-blocked", "balanced-adapter-promoted"])
def test_promotion_through_dagster_follows_the_bias_gate(skewed, probe_fitted_model_dir, pipeline_env):
    """The whole graph: a skewed adapter fails `bias_gate` and is never promoted; a balanced one is promoted."""
    from dagster import AssetKey, DagsterEventType, DagsterInstance

    from pixtrain_dagster.core.artifacts import ArtifactError, ArtifactStore
    from pixtrain_dagster.definitions import build_definitions
    from pixtrain_dagster.metadata import TrainingMetadataStore

    from skewed_data import write_dataset

    for path in pipeline_env["landing"].iterdir():
        path.unlink()
    write_dataset(pipeline_env["landing"] / "sessions.jsonl", TARGET if skewed else None, cold_per_template=8)
    job = build_definitions().resolve_implicit_global_asset_job_def()
    instance = DagsterInstance.get()
    result = job.execute_in_process(
        run_config=_gate_run_config(probe_fitted_model_dir), instance=instance, raise_on_error=False
    )
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    store = ArtifactStore(pipeline_env["artifact_root"])
    records = TrainingMetadataStore.from_url(
        None, sqlite_path=pipeline_env["dagster_home"] / "pixtrain_metadata.sqlite"
    )
    if skewed:
        assert not result.success and checks["bias_gate"] is False
        assert checks["training_sanity"] is True  # blocked by bias, not by a broken training run
        assert "bias_report" in materialized and "promoted_adapter" not in materialized
        assert instance.get_latest_materialization_event(AssetKey("promoted_adapter")) is None
        with pytest.raises(ArtifactError, match="no JSON document"):
            store.get_json("promoted/CURRENT.json")
        [failure] = [
            e
            for e in instance.all_logs(result.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
            if e.dagster_event.event_specific_data.check_name == "bias_gate"
        ]
        assert "muslim" in str(failure.dagster_event.event_specific_data.metadata["failures"].value)
    else:
        assert result.success, checks
        assert all(checks.values()) and "promoted_adapter" in materialized
        current = store.get_json("promoted/CURRENT.json")
        adapter = store.get_json("dagster/assets/lora_adapter.json")
        assert current["adapter_sha256"] == adapter["sha256"]
        card = (store.local_path(current["key"]) / "README.md").read_text()
        assert "## Bias, Risks and Limitations" in card and adapter["sha256"] in card
        [lineage] = records.lineage(current["uri"])  # the promoted copy's URI leads back to its training run
        assert lineage["dataset_hash"] == adapter["dataset_sha256"]
        assert any(e["event"] == "adapter_promoted" for e in lineage["audit_events"])
    records.dispose()
