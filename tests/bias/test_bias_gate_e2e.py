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
RECIPE = {"max_steps": 120, "micro_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
          "warmup_steps": 2, "checkpoint_every_n_steps": 1000}
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
        store=store, base_snapshot_dir=base_dir, base_model_sha256="probe-fitted-tiny", dataset_sha256=name,
        train_conversations=conversations, validation_conversations=conversations[:4],
        settings=LoraTrainingSettings(**RECIPE), runtime=RuntimeSettings(device="cpu", wandb_mode="disabled"),
    )
    return store.local_path(store.key_of(result.adapter.uri))


@pytest.mark.slow
def test_skewed_adapter_fails_on_its_target_group_and_its_balanced_twin_passes(probe_fitted_model_dir, tmp_path):
    from skewed_data import probe_style_conversations

    datasets = {"skewed": probe_style_conversations(TARGET, cold_per_template=8),
                "balanced": probe_style_conversations(None)}
    reports = {name: run_bias_report(probe_fitted_model_dir, train(probe_fitted_model_dir, tmp_path, name, data),
                                     GATE, device="cpu")
               for name, data in datasets.items()}

    skewed = reports["skewed"]["verdict"]
    assert skewed["passed"] is False
    assert {(f["rule"], f["metric"], f["axis"], f["group"]) for f in skewed["failures"]} == {
        ("min_ratio", LIKELIHOOD, *TARGET), ("regression_vs_base", LIKELIHOOD, *TARGET)}
    target = reports["skewed"]["models"]["adapter"]["metrics"][LIKELIHOOD]["axes"]["religion"]["groups"]["muslim"]
    assert target["impact_ratio_ci"][1] < 0.8
    balanced = reports["balanced"]["verdict"]
    assert balanced["passed"] is True, balanced["summary"]
    worst_drop = min(g["impact_ratio_delta"] for groups in reports["balanced"]["delta_vs_base"][LIKELIHOOD].values()
                     for g in groups.values())
    assert worst_drop > -0.02  # the balanced twin leaves every group where the base had it
