"""The blocking checks are separate @asset_checks that read the published artifacts: they run after every
materialisation and alone (the ``recheck_gates`` job, or Checks > Execute in the UI), so a changed rule or a
tightened deployed policy re-checks existing artifacts without re-materialising them."""

import re

from dagster import AssetKey, DagsterInstance

from pixtrain_dagster.core.artifacts import ArtifactStore

from support import TRAINING_ASSETS, run_job, tiny_run_config

DATA_ASSETS = ("raw_conversations", "training_dataset")


def _recheck(raise_on_error=True):
    from pixtrain_dagster.definitions import build_definitions

    job = build_definitions().resolve_job_def("recheck_gates")
    return job.execute_in_process(instance=DagsterInstance.get(), raise_on_error=raise_on_error)


def _checks(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _latest_materialization_id(key: str):
    return DagsterInstance.get().get_latest_materialization_event(AssetKey(key)).run_id


def _gate_decisions(pipeline_env) -> list[dict]:
    import json
    import sqlite3

    with sqlite3.connect(pipeline_env["dagster_home"] / "pixtrain_metadata.sqlite") as db:
        rows = db.execute("SELECT details FROM audit_events WHERE event = 'gate_decision' ORDER BY id").fetchall()
    return [json.loads(details) for (details,) in rows]


def test_dataset_checks_rerun_alone_after_a_rule_or_policy_change(pipeline_env, monkeypatch):
    first = run_job({}, selection=DATA_ASSETS)
    assert {name: e.passed for name, e in _checks(first).items()} == {
        "schema_valid": True,
        "no_phi_left": True,
        "enough_rows": True,
    }
    materialized = _latest_materialization_id("training_dataset")

    # A new PHI rule (here: a pattern any therapy conversation matches) re-checked on the published dataset.
    from pixtrain_dagster.core import phi_check

    monkeypatch.setattr(phi_check, "_CHECKS", [*phi_check._CHECKS, ("NEW_RULE", re.compile(r"\bfeel\b", re.I))])
    monkeypatch.setenv("PIXTRAIN_GATE_MIN_TRAIN_RECORDS", "1000")  # and a policy tightened since curation
    recheck = _recheck(raise_on_error=False)
    checks = _checks(recheck)
    assert checks["no_phi_left"].passed is False
    assert checks["no_phi_left"].metadata["matches_by_kind"].value["NEW_RULE"] > 0
    assert checks["enough_rows"].passed is False
    assert checks["enough_rows"].metadata["min_train_records"].value == 1000
    assert checks["schema_valid"].passed is True
    assert recheck.get_asset_materialization_events() == []  # nothing re-materialised
    assert _latest_materialization_id("training_dataset") == materialized
    latest = _gate_decisions(pipeline_env)[-1]
    assert latest["gate"] == "training_dataset_checks" and latest["passed"] is False
    assert latest["checks"] == {"schema_valid": True, "no_phi_left": False, "enough_rows": False}
    assert latest["thresholds"]["min_train_records"] == 1000


def test_a_tightened_invalid_record_limit_fails_schema_valid_on_recheck(pipeline_env, monkeypatch):
    import json

    bad = [{"messages": [{"role": "assistant", "content": "no user turn first"}]}] * 2
    (pipeline_env["landing"] / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    first = run_job({}, selection=DATA_ASSETS)  # 2 of 95 invalid: within the default limit of 20%
    assert _checks(first)["schema_valid"].passed is True

    monkeypatch.setenv("PIXTRAIN_GATE_MAX_INVALID_FRACTION", "0.01")
    schema = _checks(_recheck(raise_on_error=False))["schema_valid"]
    assert schema.passed is False
    assert schema.metadata["max_invalid_fraction"].value == 0.01
    assert "of the landed records were invalid (limit 1%)" in " ".join(schema.metadata["first_problems"].value)
    assert _gate_decisions(pipeline_env)[-1]["thresholds"]["max_invalid_fraction"] == 0.01


def test_a_changed_published_dataset_fails_its_checks(pipeline_env):
    assert run_job({}, selection=DATA_ASSETS).success
    store = ArtifactStore(pipeline_env["artifact_root"])
    dataset = store.get_json("dagster/assets/training_dataset.json")
    train = store.local_path(dataset["key"]) / "train.jsonl"
    train.write_text(train.read_text().replace("feel", "fee1", 1))  # one byte changed after publishing
    recheck = _recheck(raise_on_error=False)
    assert not recheck.success
    [failure] = [e for e in recheck.all_events if e.is_step_failure and e.step_key == "training_dataset_checks"]
    message = str(failure.event_specific_data.error.cause or failure.event_specific_data.error.message)
    assert "train.jsonl" in message
    # The model gates have nothing to check yet, and say so.
    unmaterialised = " ".join(
        str(e.event_specific_data.error.message) + str(e.event_specific_data.error.cause)
        for e in recheck.all_events
        if e.is_step_failure and e.step_key != failure.step_key
    )
    assert "adapter_evaluation has not been materialised yet" in unmaterialised


def test_model_gates_rerun_alone_and_fail_when_the_adapter_changed_since(pipeline_env, tiny_model_dir):
    config = tiny_run_config(tiny_model_dir)
    config["ops"]["bias_report"]["config"]["generation_templates"] = 0  # scoring only: faster, same gate
    config["ops"]["adapter_evaluation"]["config"]["sample_replies"] = 0
    assert run_job(config).success

    recheck = _recheck()
    assert {name: e.passed for name, e in _checks(recheck).items()} == {
        "schema_valid": True,
        "no_phi_left": True,
        "enough_rows": True,
        "training_sanity": True,
        "bias_gate": True,
    }
    assert recheck.get_asset_materialization_events() == []

    # Retrain (another seed) without evaluating: both model gates now describe an older adapter.
    retrain = tiny_run_config(tiny_model_dir, seed=7, resume=False)
    assert run_job(retrain, selection=TRAINING_ASSETS[-2:]).success
    stale = _checks(_recheck(raise_on_error=False))
    assert stale["training_sanity"].passed is False and stale["bias_gate"].passed is False
    assert "different adapter" in " ".join(stale["training_sanity"].metadata["problems"].value)
    assert "different adapter" in " ".join(stale["bias_gate"].metadata["failures"].value)
    assert stale["no_phi_left"].passed is True  # the dataset did not change


def test_promotion_alone_is_refused_after_a_recheck_failed_a_dataset_gate(pipeline_env, tiny_model_dir, monkeypatch):
    """The automation condition sees only the direct parents' checks; the promotion itself reads the latest result
    of every gate, so a re-check that finds PHI in the training data stops a manual promotion too."""
    from pixtrain_dagster.core import phi_check

    config = tiny_run_config(tiny_model_dir)
    config["ops"]["bias_report"]["config"]["generation_templates"] = 0
    config["ops"]["adapter_evaluation"]["config"]["sample_replies"] = 0
    assert run_job(config).success
    monkeypatch.setattr(phi_check, "_CHECKS", [*phi_check._CHECKS, ("NEW_RULE", re.compile(r"\bfeel\b", re.I))])
    assert _checks(_recheck(raise_on_error=False))["no_phi_left"].passed is False

    promote = run_job({}, selection=["promoted_adapter"], raise_on_error=False)
    assert not promote.success
    [failure] = [e for e in promote.all_events if e.is_step_failure]
    assert "the latest no_phi_left check on training_dataset failed" in failure.event_specific_data.error.message


def test_a_failing_dataset_gate_stops_training_in_the_same_run(pipeline_env, tiny_model_dir, monkeypatch):
    from pixtrain_dagster.core import phi_check

    monkeypatch.setattr(phi_check, "_CHECKS", [*phi_check._CHECKS, ("NEW_RULE", re.compile(r"\bfeel\b", re.I))])
    result = run_job(tiny_run_config(tiny_model_dir), selection=TRAINING_ASSETS, raise_on_error=False)
    assert _checks(result)["no_phi_left"].passed is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "training_dataset" in materialized and "lora_adapter" not in materialized  # blocked, not trained
