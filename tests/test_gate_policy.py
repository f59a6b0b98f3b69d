"""Gate policy (issue 9, point 3): the deployment sets the gates' limits; whoever launches a run may only tighten
them, and every gate decision and promotion records the thresholds it used in the audit trail."""

from __future__ import annotations

import pytest

from pixtrain_dagster.core.gate_policy import GatePolicy, GatePolicyError, policy_env_names

DEPLOYED = GatePolicy()  # the defaults: 0.05, 0.8, 0.10, [likelihood], significance, 2 templates, 20, 0.2


# ---- the core rule: each threshold, looser -> error naming field, deployed limit and where to change it ------

LOOSER = [
    # (policy field, run-config field, looser value, tighter value, env variable)
    ("max_perplexity_increase", "max_perplexity_increase", 0.5, 0.01, "PIXTRAIN_GATE_MAX_PERPLEXITY_INCREASE"),
    ("bias_min_ratio", "min_ratio", 0.5, 0.9, "PIXTRAIN_GATE_BIAS_MIN_RATIO"),
    ("bias_max_regression", "max_regression", 0.5, 0.05, "PIXTRAIN_GATE_BIAS_MAX_REGRESSION"),
    ("bias_min_templates", "max_templates", 1, 4, "PIXTRAIN_GATE_BIAS_MIN_TEMPLATES"),
    ("min_train_records", "min_train_records", 1, 50, "PIXTRAIN_GATE_MIN_TRAIN_RECORDS"),
    ("max_invalid_fraction", "max_invalid_fraction", 0.9, 0.1, "PIXTRAIN_GATE_MAX_INVALID_FRACTION"),
]


@pytest.mark.parametrize("name, field, looser, tighter, env", LOOSER, ids=[row[1] for row in LOOSER])
def test_a_looser_numeric_threshold_is_refused_with_a_clear_error(name, field, looser, tighter, env):
    deployed = getattr(DEPLOYED, name)
    with pytest.raises(GatePolicyError) as error:
        DEPLOYED.numeric(name, looser, field=field)
    message = str(error.value)
    assert f"{field}={looser!r}" in message and repr(deployed) in message  # the field, its value, the limit
    assert env in message and "gatePolicy." in message  # how to change the limit
    assert DEPLOYED.numeric(name, tighter, field=field) == tighter  # tightening is fine
    assert DEPLOYED.numeric(name, deployed, field=field) == deployed  # equal is fine
    assert DEPLOYED.numeric(name, None, field=field) == deployed  # unset: the deployed limit


def test_significance_and_gated_metrics_may_only_tighten():
    lenient = GatePolicy(bias_require_significance=False, bias_gated_metrics=("likelihood", "sentiment"))
    with pytest.raises(GatePolicyError, match=r"require_significance=True .*PIXTRAIN_GATE_BIAS_REQUIRE_SIGNIFICANCE"):
        lenient.require_significance(True)
    assert lenient.require_significance(False) is False and DEPLOYED.require_significance(False) is False
    with pytest.raises(GatePolicyError, match=r"drops \['sentiment'\].*PIXTRAIN_GATE_BIAS_GATED_METRICS"):
        lenient.gated_metrics(["likelihood"])
    with pytest.raises(GatePolicyError, match="drops"):
        DEPLOYED.gated_metrics([])  # an empty list would turn the gate off
    assert DEPLOYED.gated_metrics(["likelihood", "sentiment"]) == ("likelihood", "sentiment")  # adding tightens
    assert DEPLOYED.bias_templates(None) is None  # None = every template: the strictest


def test_the_deployed_policy_comes_from_the_environment_and_bad_values_fail_clearly():
    env = {
        "PIXTRAIN_GATE_MAX_PERPLEXITY_INCREASE": "0.02",
        "PIXTRAIN_GATE_BIAS_MIN_RATIO": "0.85",
        "PIXTRAIN_GATE_BIAS_MAX_REGRESSION": "0.05",
        "PIXTRAIN_GATE_BIAS_MIN_TEMPLATES": "4",
        "PIXTRAIN_GATE_MIN_TRAIN_RECORDS": "100",
        "PIXTRAIN_GATE_MAX_INVALID_FRACTION": "0.1",
        "PIXTRAIN_GATE_BIAS_GATED_METRICS": "likelihood,sentiment",
        "PIXTRAIN_GATE_BIAS_REQUIRE_SIGNIFICANCE": "false",
        "PIXTRAIN_GATE_BIAS_FAIL_ON_PREVIOUS_REGRESSION": "true",
    }
    assert sorted(env) == policy_env_names()
    policy = GatePolicy.from_env(env)
    assert policy == GatePolicy(
        max_perplexity_increase=0.02,
        bias_min_ratio=0.85,
        bias_max_regression=0.05,
        bias_min_templates=4,
        min_train_records=100,
        max_invalid_fraction=0.1,
        bias_gated_metrics=("likelihood", "sentiment"),
        bias_require_significance=False,
        bias_fail_on_previous_regression=True,
    )
    assert GatePolicy.from_env({}) == DEPLOYED
    with pytest.raises(GatePolicyError, match="PIXTRAIN_GATE_BIAS_MIN_RATIO='lots' is not a number"):
        GatePolicy.from_env({"PIXTRAIN_GATE_BIAS_MIN_RATIO": "lots"})
    with pytest.raises(GatePolicyError, match=r"bias_min_ratio must be in \(0, 1\]"):
        GatePolicy.from_env({"PIXTRAIN_GATE_BIAS_MIN_RATIO": "1.5"})
    with pytest.raises(GatePolicyError, match="unknown"):
        GatePolicy.from_env({"PIXTRAIN_GATE_BIAS_GATED_METRICS": "vibes"})


def test_policy_metric_names_are_the_bias_module_metrics():
    from pixtrain_dagster.core import bias, gate_policy

    assert set(gate_policy.KNOWN_BIAS_METRICS) == set(bias.METRICS)
    assert GatePolicy().bias_gated_metrics == bias.BiasThresholds().metrics
    assert GatePolicy().bias_min_ratio == bias.BiasThresholds().min_ratio
    assert GatePolicy().bias_max_regression == bias.BiasThresholds().max_regression


# ---- the bias gate's run config ------------------------------------------------------------------------------

BIAS_LOOSER = {"min_ratio": 0.5, "max_regression": 0.9, "gated_metrics": [], "max_templates": 1}


@pytest.mark.parametrize("field", sorted(BIAS_LOOSER))
def test_bias_report_config_cannot_loosen_the_bias_gate(field):
    from pixtrain_dagster.assets.bias import BiasReportConfig

    with pytest.raises(GatePolicyError, match=field):
        BiasReportConfig(**{field: BIAS_LOOSER[field]}).to_settings(DEPLOYED)
    with pytest.raises(GatePolicyError, match="require_significance"):
        BiasReportConfig(require_significance=True).to_settings(GatePolicy(bias_require_significance=False))
    settings = BiasReportConfig(min_ratio=0.9, max_regression=0.05).to_settings(DEPLOYED)
    assert (settings.thresholds.min_ratio, settings.thresholds.max_regression) == (0.9, 0.05)
    deployed = BiasReportConfig().to_settings(GatePolicy(bias_min_ratio=0.85, bias_fail_on_previous_regression=True))
    assert deployed.thresholds.min_ratio == 0.85 and deployed.thresholds.fail_on_previous_regression is True


# ---- through Dagster: the gated steps refuse, and the audit trail holds the thresholds ------------------------


def _materialize_data(pipeline_env, run_config=None, tags=None):
    from dagster import DagsterInstance, materialize

    from pixtrain_dagster.assets.data import raw_conversations, training_dataset, training_dataset_checks
    from pixtrain_dagster.definitions import build_definitions

    resources = build_definitions().resources
    return materialize(
        [raw_conversations, training_dataset, training_dataset_checks],
        resources=resources,
        run_config=run_config or {},
        tags=tags,
        instance=DagsterInstance.get(),
        raise_on_error=False,
    )


def _audit_events(pipeline_env, event):
    import json
    import sqlite3

    path = pipeline_env["dagster_home"] / "pixtrain_metadata.sqlite"
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT details FROM audit_events WHERE event = ? ORDER BY id", (event,)).fetchall()
    return [json.loads(details) for (details,) in rows]


def _failure_message(result) -> str:
    return " ".join(
        str(event.event_specific_data.error.message) + str(event.event_specific_data.error.cause)
        for event in result.all_events
        if event.is_step_failure
    )


def test_run_config_cannot_lower_enough_rows_and_the_decision_records_its_thresholds(pipeline_env, monkeypatch):
    monkeypatch.setenv("PIXTRAIN_GATE_MIN_TRAIN_RECORDS", "10")
    looser = _materialize_data(pipeline_env, {"ops": {"training_dataset": {"config": {"min_train_records": 1}}}})
    assert not looser.success
    message = _failure_message(looser)
    assert "min_train_records=1" in message and "at least 10" in message
    assert "PIXTRAIN_GATE_MIN_TRAIN_RECORDS" in message
    assert _audit_events(pipeline_env, "gate_decision") == []  # refused before any work or decision

    tighter = _materialize_data(pipeline_env, {"ops": {"training_dataset": {"config": {"min_train_records": 15}}}})
    assert tighter.success
    (decision,) = _audit_events(pipeline_env, "gate_decision")
    assert decision["gate"] == "training_dataset_checks" and decision["passed"] is True
    assert decision["thresholds"] == {"min_train_records": 15, "max_invalid_fraction": 0.2}
    assert decision["deployed_policy"]["min_train_records"] == 10


def test_a_run_tag_that_sets_gate_variables_in_the_pod_is_refused(pipeline_env):
    tag = '{"container_config": {"env": [{"name": "PIXTRAIN_GATE_MIN_TRAIN_RECORDS", "value": "1"}]}}'
    result = _materialize_data(pipeline_env, tags={"dagster-k8s/config": tag})
    assert not result.success
    assert "gate limits come from the deployment only" in _failure_message(result)


def _invoke(asset_fn, config, **inputs):
    """Call the asset's body directly with the given config; upstream inputs are never reached."""
    from dagster import build_asset_context

    from pixtrain_dagster.definitions import build_definitions

    resources = {k: v for k, v in build_definitions().resources.items() if k != "io_manager"}
    with build_asset_context() as context:
        params = asset_fn.__code__.co_varnames[: asset_fn.__code__.co_argcount]
        return list(asset_fn(context, config=config, **inputs, **{k: v for k, v in resources.items() if k in params}))


def test_adapter_evaluation_refuses_a_looser_perplexity_margin(pipeline_env, monkeypatch):
    from dagster import Failure

    from pixtrain_dagster.assets.evaluation import AdapterEvaluationConfig, adapter_evaluation

    monkeypatch.setenv("PIXTRAIN_GATE_MAX_PERPLEXITY_INCREASE", "0.02")
    stub = {"key": "missing", "sha256": "0" * 64, "uri": "missing", "train_losses": [1.0]}
    with pytest.raises(Failure, match=r"max_perplexity_increase=0.05 is looser .*at most 0.02"):
        _invoke(
            adapter_evaluation.op.compute_fn.decorated_fn,
            AdapterEvaluationConfig(max_perplexity_increase=0.05),
            base_model=stub,
            training_dataset=stub,
            lora_adapter=stub,
        )


@pytest.mark.parametrize("field", sorted(BIAS_LOOSER))
def test_bias_report_refuses_each_looser_threshold(pipeline_env, field):
    from dagster import Failure

    from pixtrain_dagster.assets.bias import BiasReportConfig, bias_report

    stub = {"key": "missing", "sha256": "0" * 64, "uri": "missing"}
    with pytest.raises(Failure, match=field):
        _invoke(
            bias_report.op.compute_fn.decorated_fn,
            BiasReportConfig(**{field: BIAS_LOOSER[field]}),
            base_model=stub,
            lora_adapter=stub,
        )


# ---- promotion: a second look against the policy in force now ------------------------------------------------


def test_promotion_is_blocked_when_the_gates_ran_under_looser_thresholds_than_deployed_now():
    from pixtrain_dagster.assets.release import gate_thresholds_used, promotion_blockers

    sha = "a" * 64
    evaluation = {
        "adapter_sha256": sha,
        "training_sanity": {"problems": [], "thresholds": {"max_perplexity_increase": 0.05}},
    }
    bias = {
        "adapter_sha256": sha,
        "max_templates": 2,
        "verdict": {
            "passed": True,
            "summary": "ok",
            "thresholds": {
                "min_ratio": 0.8,
                "max_regression": 0.1,
                "metrics": ["likelihood"],
                "require_significance": True,
            },
        },
    }
    assert promotion_blockers({"sha256": sha}, evaluation, bias, DEPLOYED) == []
    assert gate_thresholds_used(evaluation, bias)["bias_gate"]["max_templates"] == 2
    stricter_now = GatePolicy(max_perplexity_increase=0.01, bias_min_ratio=0.9)
    blockers = promotion_blockers({"sha256": sha}, evaluation, bias, stricter_now)
    assert len(blockers) == 2
    assert "training_sanity" in blockers[0] and "at most 0.01" in blockers[0]
    assert "bias_gate" in blockers[1] and "at least 0.9" in blockers[1]
    unrecorded = {"adapter_sha256": sha, "training_sanity": {"problems": []}}
    assert "recorded no max_perplexity_increase" in promotion_blockers({"sha256": sha}, unrecorded, bias, DEPLOYED)[0]


def test_every_gate_decision_and_the_promotion_record_the_thresholds_used(pipeline_env, tiny_model_dir, monkeypatch):
    """The whole graph on the tiny model: three gate_decision events and the promotion carry the thresholds; a
    later promotion under a stricter deployed policy is refused and that refusal is audited too."""
    from dagster import AssetKey, DagsterInstance

    from pixtrain_dagster.definitions import build_definitions

    from support import tiny_run_config

    monkeypatch.setenv("PIXTRAIN_GATE_BIAS_MIN_RATIO", "0.75")
    config = tiny_run_config(tiny_model_dir)
    config["ops"]["bias_report"]["config"]["min_ratio"] = 0.78  # tighter than deployed: accepted and used
    config["ops"]["bias_report"]["config"]["generation_templates"] = 0  # scoring only: faster, same gate
    config["ops"]["adapter_evaluation"]["config"]["sample_replies"] = 0
    job = build_definitions().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(run_config=config, instance=DagsterInstance.get())
    assert result.success
    decisions = {d["gate"]: d for d in _audit_events(pipeline_env, "gate_decision")}
    assert set(decisions) == {"training_dataset_checks", "training_sanity", "bias_gate"}
    assert all(d["passed"] for d in decisions.values())
    assert decisions["training_sanity"]["thresholds"] == {"max_perplexity_increase": 0.05}
    bias = decisions["bias_gate"]
    assert bias["thresholds"]["min_ratio"] == 0.78 and bias["deployed_policy"]["bias_min_ratio"] == 0.75
    assert bias["thresholds"]["max_regression"] == 0.1 and bias["thresholds"]["metrics"] == ["likelihood"]
    (promotion,) = _audit_events(pipeline_env, "adapter_promoted")
    assert promotion["gate_thresholds"]["bias_gate"]["min_ratio"] == 0.78
    assert promotion["gate_thresholds"]["training_sanity"] == {"max_perplexity_increase": 0.05}
    assert promotion["deployed_policy"]["bias_min_ratio"] == 0.75

    # The deployment tightens the policy after the gates ran: promoting the same adapter again is refused.
    monkeypatch.setenv("PIXTRAIN_GATE_BIAS_MIN_RATIO", "0.9")
    again = job.execute_in_process(
        instance=DagsterInstance.get(), asset_selection=[AssetKey("promoted_adapter")], raise_on_error=False
    )
    assert not again.success
    (refusal,) = _audit_events(pipeline_env, "promotion_refused")
    assert any("min_ratio=0.78" in b and "at least 0.9" in b for b in refusal["blockers"])
