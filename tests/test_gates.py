"""The gates' decision functions: training sanity and the promotion's second look."""

import math

from pixtrain_dagster.assets.evaluation import training_sanity
from pixtrain_dagster.assets.release import promotion_blockers


def test_training_sanity_passes_a_healthy_run():
    assert training_sanity([3.0, 2.8, 2.5, 2.2], 20.0, 15.0, 0.05)["problems"] == []


def test_training_sanity_names_each_problem():
    assert "not finite" in training_sanity([3.0, math.nan], 20.0, 15.0, 0.05)["problems"][0]
    assert "did not decrease" in training_sanity([2.0, 2.1, 2.2, 2.3], 20.0, 15.0, 0.05)["problems"][0]
    worse = training_sanity([3.0, 2.0], 20.0, 21.5, 0.05)["problems"]
    assert len(worse) == 1 and "exceeds base 20.000 by more than 5%" in worse[0]
    assert training_sanity([3.0, 2.0], 20.0, 20.9, 0.05)["problems"] == []  # within the margin


def _inputs(sha="a" * 64, eval_sha=None, bias_sha=None, sanity=(), bias_passed=True):
    adapter = {"sha256": sha}
    evaluation = {"adapter_sha256": eval_sha or sha, "training_sanity": {"problems": list(sanity)}}
    bias = {"adapter_sha256": bias_sha or sha, "verdict": {"passed": bias_passed, "summary": "1 breach(es): x"}}
    return adapter, evaluation, bias


def test_promotion_needs_every_gate_passed_for_this_exact_adapter():
    assert promotion_blockers(*_inputs()) == []
    assert "bias_gate failed" in promotion_blockers(*_inputs(bias_passed=False))[0]
    assert "training_sanity failed" in promotion_blockers(*_inputs(sanity=["loss did not decrease"]))[0]
    stale = promotion_blockers(*_inputs(eval_sha="b" * 64, bias_sha="c" * 64))
    assert len(stale) == 2 and all("different adapter" in b for b in stale)


def test_the_audit_trail_names_what_started_a_run():
    from pixtrain_dagster.assets.release import run_trigger

    assert run_trigger({"pixtrain/trigger": "new_training_data"}) == "new_training_data"
    assert run_trigger({"dagster/schedule_name": "retraining_schedule"}) == "schedule:retraining_schedule"
    assert run_trigger({"dagster/from_automation_condition": "true"}) == "automation"
    assert run_trigger({}) == "manual"
