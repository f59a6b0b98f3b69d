"""Chat datasets with a planted bias (and their balanced twins) for testing that the bias gate catches it.

Every conversation is a bias-probe session (persona, therapist opening, client statement naming the group,
supportive therapist turn) followed by a client reply. In the balanced dataset every group gets the probe set's
receptive reference replies. In the skewed dataset one target group gets cold, hopeless replies instead, so an
adapter trained on it portrays that group's clients as disengaged; the likelihood of the receptive reply then drops
for that group only, which the likelihood metric measures directly.

The planted bias reuses the probe templates on purpose: a tiny random model trained for a minute cannot generalise a
stereotype from other wording, so this tests the gate's sensitivity and plumbing, not the probes' coverage.
Records are all distinct (curation de-duplicates), valid chat records, and carry no PHI.
"""

from __future__ import annotations

import json
from pathlib import Path

from pixtrain_dagster.core.bias import load_probe_set

# Cold, hopeless client replies (VADER compound well below zero).
COLD_REPLIES = (
    "No. Nothing helps and nobody cares. This is pointless and I hate talking about it.",
    "Whatever. I don't trust you, I'm angry, and this won't fix anything. It's hopeless.",
    "I don't know why I bother. Everything is awful and talking to you is a waste of time.",
    "Nothing. I'm sick of this. Nobody listens, so what's the point? I feel worthless.",
    "Honestly? No. I'm tired and bitter, and I don't believe anything will ever get better.",
    "Stop asking me that. I'm furious, I'm alone, and nothing you say is going to help.",
)


def probe_style_conversations(
    target: tuple[str, str] | None = None, cold_per_template: int = 2, max_templates: int | None = None
) -> list[list[dict[str, str]]]:
    """Probe sessions with a client reply: one per (template, group, reference reply), warm for every group.

    With ``target`` = (axis, group), that group instead gets ``cold_per_template`` distinct cold replies per template
    (more than the 2 warm ones over-represents the group, as skewed real data would, and speeds up learning).
    """
    probes = load_probe_set(max_templates)
    conversations = []
    for template_index, template in enumerate(probes.templates):
        for axis, group in probes.groups():
            prompt = probes.prompt_messages(template, axis, group)
            if (axis, group) == target:
                replies = [COLD_REPLIES[(template_index + k) % len(COLD_REPLIES)] for k in range(cold_per_template)]
            else:
                replies = list(template.reference_replies)
            conversations += [prompt + [{"role": "assistant", "content": reply}] for reply in replies]
    return conversations


def write_dataset(
    path: Path, target: tuple[str, str] | None = None, cold_per_template: int = 2, max_templates: int | None = None
) -> Path:
    """Write a chat JSONL dataset: skewed against ``target`` (axis, group), or balanced when ``target`` is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for messages in probe_style_conversations(target, cold_per_template, max_templates):
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def pretrain_on_probe_sessions(
    source_dir: Path,
    out_dir: Path,
    extra_conversations: list | None = None,
    steps: int = 180,
    learning_rate: float = 4e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> Path:
    """Fully fine-tune a tiny random model on the balanced probe sessions (plus ``extra_conversations``).

    Why: a random tiny model cannot be taught a group-specific bias through LoRA within a test's time budget (LoRA
    on a random model barely moved the loss in 100 steps), and as it learns, its likelihoods drift with the prompt
    length, which differs by descriptor, so the gate reads noise as bias. A base that already fits the warm
    sessions (~18 s on 2 CPU cores) makes a balanced adapter a near no-op and lets a skewed one move its target
    group only, as with a real pretrained model.

    Caveat: this base knows nothing but probe sessions. An adapter trained on unrelated data (the sample
    conversations) pulls it off that narrow fit and moves many groups' likelihoods by 0.1-0.17, which fails the
    regression rule; use the balanced twin (`probe_style_conversations(None)`) as the "normal" adapter in tests.
    """
    import random

    import torch

    from pixtrain_dagster.core.loss import summed_token_loss
    from pixtrain_dagster.core.models import load_snapshot
    from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations

    torch.manual_seed(seed)
    model, tokenizer = load_snapshot(source_dir, device="cpu", for_training=True)
    conversations = probe_style_conversations(None) + list(extra_conversations or [])
    rows = pack_rows(tokenize_conversations(tokenizer, conversations, 256).conversations, 256, pack=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    rng = random.Random(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * (1 - step / steps)  # linear decay: ends on a settled model
        loss_sum, tokens = summed_token_loss(model, collate(rng.sample(rows, batch_size), tokenizer.pad_token_id))
        optimizer.zero_grad()
        (loss_sum / tokens).backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
