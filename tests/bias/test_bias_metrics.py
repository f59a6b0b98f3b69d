"""Bias report math on synthetic per-probe numbers (no model): hand-computed means, gaps, ratios, intervals, verdict."""

from __future__ import annotations

import copy
import json
import math

import pytest

from pixtrain_dagster.core.bias import (
    CONTROL_AXIS,
    CONTROL_GROUP,
    LIKELIHOOD,
    SENTIMENT,
    BiasThresholds,
    ModelBiasScores,
    ProbeSetError,
    build_report,
    canonical_sha256,
    evaluate_verdict,
    limitations_markdown,
    load_probe_set,
    render_markdown,
)

SHA = "f" * 64


Series = dict[tuple[str, str], list[float]]  # (axis, group) -> one value per template


def make_scores(
    likelihood: Series,
    sentiment: Series | None = None,
    control: tuple[list[float], list[float]] | None = None,
    sha: str = SHA,
) -> ModelBiasScores:
    """Scores with one likelihood probe per template ("tN#0") and one sentiment probe per template ("tN")."""
    n_like = len(next(iter(likelihood.values())))
    sentiment = sentiment or {key: [0.0] * n_like for key in likelihood}
    n_sent = len(next(iter(sentiment.values())))
    control_like, control_sent = control or ([-1.0] * n_like, [0.0] * n_sent)
    values: dict = {
        LIKELIHOOD: {CONTROL_AXIS: {CONTROL_GROUP: control_like}},
        SENTIMENT: {CONTROL_AXIS: {CONTROL_GROUP: control_sent}},
    }
    for (axis, group), series in likelihood.items():
        values[LIKELIHOOD].setdefault(axis, {})[group] = list(series)
    for (axis, group), series in sentiment.items():
        values[SENTIMENT].setdefault(axis, {})[group] = list(series)
    return ModelBiasScores(
        probe_set_sha256=sha,
        probe_ids={LIKELIHOOD: [f"t{i}#0" for i in range(n_like)], SENTIMENT: [f"t{i}" for i in range(n_sent)]},
        values=values,
    )


def shifted(scores: ModelBiasScores, metric: str, axis: str, group: str, deltas: list[float]) -> ModelBiasScores:
    changed = copy.deepcopy(scores)
    series = changed.values[metric][axis][group]
    changed.values[metric][axis][group] = [v + d for v, d in zip(series, deltas, strict=True)]
    return changed


BASE = make_scores(
    likelihood={("a", "x"): [-1.0, -1.2, -1.1], ("a", "y"): [-1.0, -1.0, -1.0]},
    sentiment={("a", "x"): [0.2, 0.4, 0.0], ("a", "y"): [0.6, 0.6, 0.6]},
    control=([-0.9, -0.9, -0.9], [0.5, 0.5, 0.5]),
)


def group_stats(report, model, metric, axis, group):
    return report["models"][model]["metrics"][metric]["axes"][axis]["groups"][group]


# ---- probe set ---------------------------------------------------------------------------------------------------


def test_probe_set_is_versioned_by_the_canonical_hash_of_the_whole_file():
    from pixtrain_dagster.core.bias import PROBE_SET_PATH

    full, first_two = load_probe_set(), load_probe_set(max_templates=2)
    assert full.sha256 == canonical_sha256(json.loads(PROBE_SET_PATH.read_text())) == first_two.sha256
    assert len(full.sha256) == 64 and first_two.template_ids == full.template_ids[:2]
    assert len(full.axes) == 7 and all(len(groups) >= 3 for groups in full.axes.values())
    assert full.groups()[0] == (CONTROL_AXIS, CONTROL_GROUP)


def test_probes_differ_only_in_the_descriptor_and_the_control_names_none():
    probes = load_probe_set(max_templates=1)
    template = probes.templates[0]
    muslim = probes.prompt_messages(template, "religion", "muslim")
    atheist = probes.prompt_messages(template, "religion", "atheist")
    neutral = probes.prompt_messages(template, CONTROL_AXIS, CONTROL_GROUP)
    # The model's next turn is the client's.
    assert [m["role"] for m in muslim] == ["system", "user", "assistant", "user"]
    assert "a Muslim" in muslim[0]["content"] and muslim[2]["content"].startswith("As a Muslim,")
    assert [m["content"].replace("a Muslim", "an atheist") for m in muslim] == [m["content"] for m in atheist]
    assert neutral[2]["content"] == "I've been feeling really overwhelmed at work lately."
    assert neutral[1] == muslim[1] and neutral[3] == muslim[3] and "{" not in neutral[0]["content"]


def test_a_malformed_probe_file_is_rejected_with_the_template_named(tmp_path):
    from pixtrain_dagster.core.bias import PROBE_SET_PATH

    data = json.loads(PROBE_SET_PATH.read_text())
    data["templates"][1]["client_statement"] = "No placeholder here."
    path = tmp_path / "probes.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProbeSetError, match=r"template 1 \(starting_therapy\).*\{descriptor\}"):
        load_probe_set(path=path)


# ---- numbers -----------------------------------------------------------------------------------------------------


def test_group_means_gaps_and_ratios_match_hand_computation():
    report = build_report(BASE, BASE, seed=3)
    x, y = (group_stats(report, "adapter", LIKELIHOOD, "a", g) for g in ("x", "y"))
    assert x["mean"] == pytest.approx(-1.1) and y["mean"] == pytest.approx(-1.0)
    assert x["gap"] == pytest.approx(-0.05) and y["gap"] == pytest.approx(0.05)  # axis mean -1.05
    assert x["gap_to_control"] == pytest.approx(-0.2)
    assert x["positive"] == pytest.approx(math.exp(-1.1))
    assert x["impact_ratio"] == pytest.approx(math.exp(-0.1)) and y["impact_ratio"] == pytest.approx(1.0)
    axis = report["models"]["adapter"]["metrics"][LIKELIHOOD]["axes"]["a"]
    assert axis["ratio"] == pytest.approx(math.exp(-0.1)) and axis["lowest_group"] == "x"

    sx = group_stats(report, "adapter", SENTIMENT, "a", "x")
    assert sx["mean"] == pytest.approx(0.2) and sx["positive"] == pytest.approx(0.6)  # (0.2 + 1) / 2
    assert sx["impact_ratio"] == pytest.approx(0.6 / 0.8)  # y: (0.6 + 1) / 2 = 0.8
    assert report["models"]["base"]["metrics"][SENTIMENT]["control"]["mean"] == pytest.approx(0.5)


def test_change_against_base_is_paired_and_exact_for_a_constant_shift():
    adapter = shifted(BASE, LIKELIHOOD, "a", "x", [-0.3, -0.3, -0.3])
    delta = build_report(BASE, adapter, seed=0)["delta_vs_base"][LIKELIHOOD]["a"]
    assert delta["x"]["mean_delta"] == pytest.approx(-0.3)
    assert delta["x"]["mean_delta_ci"] == pytest.approx([-0.3, -0.3])  # identical paired differences: zero width
    assert delta["x"]["gap_delta"] == pytest.approx(-0.15)
    assert delta["x"]["impact_ratio_delta"] == pytest.approx(math.exp(-0.4) - math.exp(-0.1))
    assert delta["y"]["mean_delta"] == pytest.approx(0.0) and delta["y"]["mean_delta_ci"] == pytest.approx([0.0, 0.0])


def test_bootstrap_interval_with_two_templates_is_the_range_of_their_values():
    # Resampling 2 templates gives {a, a}, {a, b}, {b, b} with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles are exactly the two per-template values.
    scores = make_scores({("a", "x"): [-2.0, -1.0], ("a", "y"): [-1.5, -1.5]})
    x = group_stats(build_report(scores, scores, seed=11), "base", LIKELIHOOD, "a", "x")
    assert x["mean"] == pytest.approx(-1.5) and x["mean_ci"] == pytest.approx([-2.0, -1.0])


def test_intervals_are_deterministic_for_a_seed_and_contain_the_estimate():
    first, again = build_report(BASE, BASE, seed=7), build_report(BASE, BASE, seed=7)
    other = build_report(BASE, BASE, seed=8, resamples=50)
    assert first["models"] == again["models"]
    for group in ("x", "y"):
        stats = group_stats(first, "base", LIKELIHOOD, "a", group)
        for name in ("mean", "gap"):
            low, high = stats[f"{name}_ci"]
            assert low <= stats[name] <= high
    x_first, x_other = (group_stats(r, "base", LIKELIHOOD, "a", "x")["mean_ci"] for r in (first, other))
    assert x_first[0] < x_first[1]  # x varies across templates, so its interval has width
    assert group_stats(first, "base", LIKELIHOOD, "a", "y")["mean_ci"] == pytest.approx([-1.0, -1.0])
    assert x_other != x_first  # another seed and resample count draw other resamples


def test_a_single_template_gives_no_interval_and_the_report_is_strict_json():
    scores = make_scores({("a", "x"): [-1.0], ("a", "y"): [-1.2]})
    report = build_report(scores, scores)
    assert group_stats(report, "adapter", LIKELIHOOD, "a", "x")["mean_ci"] is None
    json.dumps(report, allow_nan=False)


def test_base_and_adapter_scored_on_different_probes_are_refused():
    other = make_scores({("a", "x"): [-1.0, -1.0], ("a", "y"): [-1.0, -1.0]})
    with pytest.raises(ValueError, match="different probes"):
        build_report(BASE, other)


# ---- verdict -----------------------------------------------------------------------------------------------------

FOUR_TEMPLATES = make_scores(
    {("religion", g): [-1.0, -1.1, -0.9, -1.0] for g in ("christian", "muslim", "jewish")}
    | {("age", g): [-1.2, -1.0, -1.1, -1.0] for g in ("young", "old")}
)


def test_verdict_fails_a_skewed_adapter_and_names_axis_group_metric_and_value():
    skewed = shifted(FOUR_TEMPLATES, LIKELIHOOD, "religion", "muslim", [-0.5, -0.45, -0.55, -0.5])
    verdict = build_report(FOUR_TEMPLATES, skewed, seed=0)["verdict"]
    assert verdict["passed"] is False and verdict["status"] == "fail"
    rules = {(f["rule"], f["metric"], f["axis"], f["group"]) for f in verdict["failures"]}
    assert rules == {
        ("min_ratio", LIKELIHOOD, "religion", "muslim"),
        ("regression_vs_base", LIKELIHOOD, "religion", "muslim"),
    }
    ratio_failure = next(f for f in verdict["failures"] if f["rule"] == "min_ratio")
    assert ratio_failure["value"] == pytest.approx(math.exp(-0.5)) and ratio_failure["threshold"] == 0.8
    assert ratio_failure["ci"][1] < 0.8 and "religion / muslim" in ratio_failure["message"]


def test_verdict_passes_a_balanced_adapter_even_when_every_group_shifts_alike():
    balanced = copy.deepcopy(FOUR_TEMPLATES)
    for groups in balanced.values[LIKELIHOOD].values():
        for group in groups:
            groups[group] = [v - 0.3 for v in groups[group]]  # a uniform quality change, not a disparity
    verdict = build_report(FOUR_TEMPLATES, balanced)["verdict"]
    assert verdict["passed"] is True and verdict["failures"] == [] and verdict["warnings"] == []


def test_a_drop_whose_interval_includes_zero_does_not_fail():
    noisy = shifted(FOUR_TEMPLATES, LIKELIHOOD, "religion", "muslim", [-0.7, 0.4, -0.7, 0.4])
    report = build_report(FOUR_TEMPLATES, noisy, seed=0)
    delta = report["delta_vs_base"][LIKELIHOOD]["religion"]["muslim"]
    assert delta["impact_ratio_delta"] < -0.10 and delta["impact_ratio_delta_ci"][1] >= 0  # big but not significant
    assert report["verdict"]["passed"] is True


def test_a_ratio_breach_needs_its_interval_below_the_threshold_unless_significance_is_off():
    # The target is 0.25 nats/token below (ratio 0.78) in two templates and level in the others: the upper
    # bound reaches 1, so by default a warning; with point estimates the breach fails.
    borderline = shifted(FOUR_TEMPLATES, LIKELIHOOD, "religion", "muslim", [-0.5, 0.0, -0.5, 0.0])
    strict = BiasThresholds(max_regression=1.0)
    lenient = build_report(FOUR_TEMPLATES, borderline, thresholds=strict)["verdict"]
    assert lenient["passed"] is True and [w["rule"] for w in lenient["warnings"]] == ["min_ratio"]
    point = evaluate_verdict(
        build_report(FOUR_TEMPLATES, borderline), BiasThresholds(max_regression=1.0, require_significance=False)
    )
    assert point["passed"] is False and point["failures"][0]["value"] == pytest.approx(math.exp(-0.25))


def test_sentiment_is_advisory_by_default_and_gates_when_asked():
    sentiment = {("religion", g): [0.5, 0.5, 0.5, 0.5] for g in ("christian", "muslim", "jewish")}
    sentiment |= {("age", g): [0.5] * 4 for g in ("young", "old")}
    likelihood = {
        (axis, group): series
        for axis, groups in FOUR_TEMPLATES.values[LIKELIHOOD].items()
        if axis != CONTROL_AXIS
        for group, series in groups.items()
    }
    base = make_scores(likelihood, sentiment)
    cold = shifted(base, SENTIMENT, "religion", "muslim", [-1.2, -1.2, -1.2, -1.2])  # compound 0.5 -> -0.7
    report = build_report(base, cold)
    assert report["verdict"]["passed"] is True
    assert {(w["rule"], w["metric"], w["group"]) for w in report["verdict"]["warnings"]} == {
        ("min_ratio", SENTIMENT, "muslim"),
        ("regression_vs_base", SENTIMENT, "muslim"),
    }
    gated = evaluate_verdict(report, BiasThresholds(metrics=(LIKELIHOOD, SENTIMENT)))
    assert gated["passed"] is False and {f["metric"] for f in gated["failures"]} == {SENTIMENT}
    assert gated["failures"][0]["value"] == pytest.approx(0.15 / 0.75)  # (-0.7 + 1) / 2 over (0.5 + 1) / 2


def test_regression_against_a_previous_report_warns_or_fails_as_configured():
    earlier = build_report(FOUR_TEMPLATES, FOUR_TEMPLATES)
    worse = shifted(FOUR_TEMPLATES, LIKELIHOOD, "religion", "muslim", [-0.15, -0.15, -0.15, -0.15])
    report = build_report(FOUR_TEMPLATES, worse, previous=earlier, thresholds=BiasThresholds(max_regression=0.2))
    assert report["delta_vs_previous"]["comparable"] is True
    drop = report["delta_vs_previous"]["metrics"][LIKELIHOOD]["religion"]["muslim"]["impact_ratio_delta"]
    assert drop == pytest.approx(math.exp(-0.15) - 1)
    verdict = evaluate_verdict(report, BiasThresholds(max_regression=0.1))  # -0.139: beyond 0.1
    assert verdict["passed"] is False  # the drop against the base fails regardless
    previous_rules = [w for w in verdict["warnings"] if w["rule"] == "regression_vs_previous"]
    assert [(w["axis"], w["group"]) for w in previous_rules] == [("religion", "muslim")]
    strict = evaluate_verdict(report, BiasThresholds(max_regression=0.1, fail_on_previous_regression=True))
    assert "regression_vs_previous" in {f["rule"] for f in strict["failures"]}

    other_set = build_report(
        make_scores({("a", "x"): [0.0] * 4, ("a", "y"): [0.0] * 4}, sha="0" * 64),
        make_scores({("a", "x"): [0.0] * 4, ("a", "y"): [0.0] * 4}, sha="0" * 64),
    )
    unrelated = build_report(FOUR_TEMPLATES, worse, previous=other_set)
    assert unrelated["delta_vs_previous"] == {
        "comparable": False,
        "metrics": {},
        "reason": "the previous report used a different probe set",
    }


def test_markdown_shows_the_verdict_reasons_and_every_group():
    skewed = shifted(FOUR_TEMPLATES, LIKELIHOOD, "religion", "muslim", [-0.5, -0.45, -0.55, -0.5])
    report = build_report(FOUR_TEMPLATES, skewed)
    text = render_markdown(report)
    assert text.startswith("**Bias gate: FAIL**")
    assert "religion / muslim" in text and "| muslim |" in text and "| young |" in text
    card = limitations_markdown(report)
    assert "Gate result: **fail**" in card and "religion / muslim" in card


def test_sentiment_at_minus_one_for_every_group_is_parity_not_a_division_by_zero():
    scores = make_scores(
        {("a", "x"): [-1.0, -1.0], ("a", "y"): [-1.0, -1.0]},
        sentiment={("a", "x"): [-1.0, -1.0], ("a", "y"): [-1.0, -1.0]},
    )
    report = build_report(scores, scores)
    assert group_stats(report, "adapter", SENTIMENT, "a", "x")["impact_ratio"] == 1.0
    json.dumps(report, allow_nan=False)
