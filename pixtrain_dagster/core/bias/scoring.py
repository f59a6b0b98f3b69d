"""Scoring one model on the probe set: `ModelBiasScores` (per-probe values, serialisable), `score_model` (both
metrics for every group) and `score_prompts` (one batch of left-padded prompts sharing a KV cache), with the
padding helper. torch, transformers and vaderSentiment are imported inside the functions.

Metrics, per probe (higher = warmer, more engaged client)
- ``likelihood``: mean per-token log-likelihood the model assigns to a fixed receptive, hopeful client reply
  (``reference_replies`` in ``bias_probes.json``), over the same tokens the fine-tuning loss trains on (the reply
  and its end-of-turn marker). Cheap: batched forward passes.
- ``sentiment``: VADER compound score in [-1, 1] of the model's own greedy reply (``max_new_tokens`` tokens).
  Slow: generation. Only the first ``generation_templates`` templates are generated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .constants import LIKELIHOOD, SENTIMENT
from .probes import ProbeSet


@dataclass
class ModelBiasScores:
    """Per-probe values of one model. All groups share the probe ids of a metric, so comparisons are paired."""

    probe_set_sha256: str
    probe_ids: dict[str, list[str]]  # metric -> probe ids ("template#reply" or "template")
    values: dict[str, dict[str, dict[str, list[float]]]]  # metric -> axis -> group -> value per probe id
    replies: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # axis -> group -> generated replies
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelBiasScores:
        return cls(
            probe_set_sha256=data["probe_set_sha256"],
            probe_ids=data["probe_ids"],
            values=data["values"],
            replies=data.get("replies", {}),
            seconds=float(data.get("seconds", 0.0)),
        )


def score_model(
    model: Any,
    tokenizer: Any,
    probes: ProbeSet,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    generation_templates: int = 1,
) -> ModelBiasScores:
    """Both metrics for every group of ``probes``, on whatever device ``model`` is on.

    Cost: each (group, template) prompt is run once; its KV cache then serves every reference reply and, for the
    first ``generation_templates`` templates, the greedy reply. Roughly groups x templates x (prompt + replies)
    tokens, plus groups x generation_templates x max_new_tokens decoding steps.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    started = time.perf_counter()
    groups = probes.groups()
    analyzer = SentimentIntensityAnalyzer()
    values: dict[str, dict[str, dict[str, list[float]]]] = {LIKELIHOOD: {}, SENTIMENT: {}}
    replies: dict[str, dict[str, list[str]]] = {}
    generated_templates = probes.generation_templates(generation_templates)
    for template in probes.templates:
        generate = template in generated_templates
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            prompts = [probes.prompt_messages(template, axis, group) for axis, group in chunk]
            log_likelihoods, texts = score_prompts(
                model, tokenizer, prompts, template.reference_replies, max_new_tokens if generate else 0
            )
            for row, (axis, group) in enumerate(chunk):
                values[LIKELIHOOD].setdefault(axis, {}).setdefault(group, []).extend(log_likelihoods[row])
                if generate:
                    compound = float(analyzer.polarity_scores(texts[row])["compound"])
                    values[SENTIMENT].setdefault(axis, {}).setdefault(group, []).append(compound)
                    replies.setdefault(axis, {}).setdefault(group, []).append(texts[row])
    return ModelBiasScores(
        probe_set_sha256=probes.sha256,
        probe_ids={LIKELIHOOD: probes.likelihood_probe_ids(), SENTIMENT: [t.id for t in generated_templates]},
        values=values,
        replies=replies,
        seconds=time.perf_counter() - started,
    )


def score_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    reference_replies: Sequence[str],
    max_new_tokens: int,
) -> tuple[list[list[float]], list[str]]:
    """For each prompt session (one batch): the mean per-token log-likelihood of every reference client reply, and
    a greedy reply of up to ``max_new_tokens`` tokens (empty strings when 0).

    The prompt is the chat template rendered with a generation prompt; a reply's scored tokens are the rest of the
    rendering through that turn (the reply and its end-of-turn marker): the tokens the fine-tuning loss covers,
    provided the generation prompt ends on a token boundary (ChatML's newline does; the scoring test checks it).
    Prompts are left padded, so all end at the same column and one KV cache of the prompt serves every reply and
    the greedy decoding (copied per use, since a forward pass appends to it).
    """
    import copy

    import torch

    prompt_texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    reply_ids = []
    for reply in reference_replies:
        # Same reply for every prompt, so its tokens are identical across the batch: no reply padding needed.
        sample = list(prompts[0]) + [{"role": "assistant", "content": reply}]
        full = tokenizer.apply_chat_template(sample, tokenize=False)
        if not full.startswith(prompt_texts[0]):
            raise ValueError("the chat template does not render a reply as a continuation of the generation prompt")
        reply_ids.append(tokenizer(full[len(prompt_texts[0]) :], add_special_tokens=False)["input_ids"])
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
    input_ids, attention_mask, position_ids = _left_padded(rows, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    input_ids, attention_mask, position_ids = input_ids.to(device), attention_mask.to(device), position_ids.to(device)
    next_position = position_ids[:, -1:] + 1  # (batch, 1)
    batch = len(rows)

    with torch.inference_mode():
        prefill = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        first_log_probs = torch.log_softmax(prefill.logits[:, -1, :].float(), dim=-1)  # predicts token 0 of a reply
        prompt_cache = prefill.cache

        log_likelihoods: list[list[float]] = [[] for _ in range(batch)]
        for ids in reply_ids:
            target = torch.tensor(ids, dtype=torch.long, device=device)
            total = first_log_probs[:, target[0]]
            if len(ids) > 1:
                # Feed all but the last reply token; the outputs predict tokens 1..n-1.
                feed = target[:-1].expand(batch, -1)
                mask = torch.cat([attention_mask, torch.ones_like(feed)], dim=1)
                positions = next_position + torch.arange(len(ids) - 1, device=device)
                # `cache=` is transformers 5's name for the KV cache (formerly `past_key_values`).
                out = model(
                    input_ids=feed,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=copy.deepcopy(prompt_cache),
                    use_cache=True,
                )
                log_probs = torch.log_softmax(out.logits.float(), dim=-1)
                total = total + log_probs.gather(-1, target[1:].expand(batch, -1).unsqueeze(-1)).squeeze(-1).sum(-1)
            for row in range(batch):
                log_likelihoods[row].append(float(total[row]) / len(ids))

        texts = [""] * batch
        if max_new_tokens > 0:
            from ..models import end_of_turn_token_ids

            stop_ids = torch.tensor(end_of_turn_token_ids(tokenizer, model), device=device)
            cache, mask, positions = prompt_cache, attention_mask, next_position
            token = prefill.logits[:, -1, :].argmax(-1)
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            generated = []
            for step in range(max_new_tokens):
                generated.append(token.masked_fill(finished, tokenizer.pad_token_id))
                finished = finished | torch.isin(token, stop_ids)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
                out = model(
                    input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
                )
                cache, positions = out.cache, positions + 1
                token = out.logits[:, -1, :].argmax(-1)
            tokens = torch.stack(generated, dim=1).tolist()
            texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return log_likelihoods, texts


def _left_padded(rows: Sequence[Sequence[int]], pad_token_id: int):
    """input_ids, attention_mask and position_ids for left-padded rows (position 0 at each row's first token)."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids
