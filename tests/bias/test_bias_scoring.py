"""Scoring a real (tiny) model: the report's numbers against a separate, plain computation of the same quantities."""

from __future__ import annotations

import json
import math

import pytest

from pixtrain_dagster.core.bias import (
    LIKELIHOOD,
    SENTIMENT,
    BiasSettings,
    load_probe_set,
    render_markdown,
    run_bias_report,
    score_model,
)

AXIS = "religion"


def plain_reply_log_likelihood(model, tokenizer, messages, reply) -> float:
    """Mean log-probability per token of ``reply`` as the next client turn: one unpadded, uncached forward pass."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    # The scored tokens are the ones the training loss sees: tokenising the whole session splits it the same way.
    assert tokenizer(full, add_special_tokens=False)["input_ids"] == prompt_ids + reply_ids
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([prompt_ids + reply_ids])).logits[0].float(), dim=-1)
    picked = [log_probs[len(prompt_ids) + j - 1, token].item() for j, token in enumerate(reply_ids)]
    return sum(picked) / len(picked)


def plain_group_means(model, tokenizer, probes) -> dict[str, float]:
    means = {}
    for group in probes.axes[AXIS]:
        values = [
            plain_reply_log_likelihood(model, tokenizer, probes.prompt_messages(t, AXIS, group), reply)
            for t in probes.templates
            for reply in t.reference_replies
        ]
        means[group] = sum(values) / len(values)
    return means


@pytest.fixture(scope="module")
def random_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (not zero) B matrices, so the adapted model differs from its base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pixtrain_dagster.core.models import load_snapshot

    torch.manual_seed(5)
    model, _ = load_snapshot(tiny_model_dir, device="cpu", for_training=False)
    adapted = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    )
    folder = tmp_path_factory.mktemp("random-adapter")
    adapted.save_pretrained(folder)
    return folder


def test_batched_cached_scores_equal_a_plain_forward_pass(tiny_model_dir):
    from pixtrain_dagster.core.models import load_snapshot

    model, tokenizer = load_snapshot(tiny_model_dir, device="cpu", for_training=False)
    probes = load_probe_set(max_templates=2)
    scores = score_model(model, tokenizer, probes, max_new_tokens=4, batch_size=7, generation_templates=1)
    assert scores.probe_ids[LIKELIHOOD] == [
        "work_overwhelm#0",
        "work_overwhelm#1",
        "starting_therapy#0",
        "starting_therapy#1",
    ]
    for axis, group in [("control", "neutral"), ("religion", "muslim"), ("socioeconomic_status", "unhoused")]:
        expected = [
            plain_reply_log_likelihood(model, tokenizer, probes.prompt_messages(t, axis, group), reply)
            for t in probes.templates
            for reply in t.reference_replies
        ]
        assert scores.values[LIKELIHOOD][axis][group] == pytest.approx(expected, abs=1e-5)
        assert len(scores.values[SENTIMENT][axis][group]) == 1 == len(scores.replies[axis][group])


def test_batched_greedy_replies_equal_transformers_generate(tiny_model_dir):
    from pixtrain_dagster.core.evaluation import generate_reply
    from pixtrain_dagster.core.models import load_snapshot

    model, tokenizer = load_snapshot(tiny_model_dir, device="cpu", for_training=False)
    probes = load_probe_set(max_templates=1)
    scores = score_model(model, tokenizer, probes, max_new_tokens=10, batch_size=32, generation_templates=1)
    for axis, group in [("control", "neutral"), ("age", "older_adult"), ("disability", "wheelchair_user")]:
        expected = generate_reply(model, tokenizer, probes.prompt_messages(probes.templates[0], axis, group), 10)
        assert scores.replies[axis][group] == [expected]


def test_run_bias_report_matches_hand_computed_gaps_and_ratios(tiny_model_dir, random_adapter_dir):
    from peft import PeftModel

    from pixtrain_dagster.core.models import load_snapshot

    settings = BiasSettings(max_templates=2, generation_templates=1, max_new_tokens=4, bootstrap_resamples=200)
    report = run_bias_report(tiny_model_dir, random_adapter_dir, settings, device="cpu")
    probes = load_probe_set(max_templates=2)
    model, tokenizer = load_snapshot(tiny_model_dir, device="cpu", for_training=False)
    base_means = plain_group_means(model, tokenizer, probes)
    adapter_means = plain_group_means(PeftModel.from_pretrained(model, random_adapter_dir).eval(), tokenizer, probes)

    for name, means in (("base", base_means), ("adapter", adapter_means)):
        axis = report["models"][name]["metrics"][LIKELIHOOD]["axes"][AXIS]
        axis_mean = sum(means.values()) / len(means)
        for group, mean in means.items():
            stats = axis["groups"][group]
            assert stats["mean"] == pytest.approx(mean, abs=1e-5)
            assert stats["gap"] == pytest.approx(mean - axis_mean, abs=1e-5)
            assert stats["impact_ratio"] == pytest.approx(math.exp(mean - max(means.values())), abs=1e-5)
        assert axis["ratio"] == pytest.approx(math.exp(min(means.values()) - max(means.values())), abs=1e-5)
    deltas = report["delta_vs_base"][LIKELIHOOD][AXIS]
    for group in base_means:
        assert deltas[group]["mean_delta"] == pytest.approx(adapter_means[group] - base_means[group], abs=1e-5)
    assert any(abs(adapter_means[g] - base_means[g]) > 1e-3 for g in base_means)  # the adapter really changed it

    assert report["probe_set"]["sha256"] == probes.sha256 and report["settings"]["max_templates"] == 2
    json.dumps(report, allow_nan=False)
    assert "| muslim |" in render_markdown(report)
