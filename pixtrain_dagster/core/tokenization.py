"""Chat-template tokenisation with loss on assistant tokens only, and sequence packing.

Assistant spans are found in the rendered text: the template rendered up to the generation prompt before an
assistant turn, and rendered through that turn, are both prefixes of the full rendering, so the characters
between them are that turn (its content and end-of-turn token). Tokens whose characters start inside a span
carry labels; all other tokens get -100.

Packing concatenates conversations into rows of at most ``max_seq_len`` tokens with position ids restarting
at 0 for each conversation. With no attention mask and no KV cache, transformers turns position-id restarts
into a block-diagonal causal mask, so packed conversations never attend to each other.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans of every assistant turn in it."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) < len(through)):
            raise ChatTemplateError(
                "the tokenizer's chat template does not render conversations prefix-stably, so assistant turns "
                "cannot be located; use a template where rendering a conversation prefix is a prefix of the whole"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int) -> TokenizedConversation:
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = []
    span_index = 0
    for token_id, (start, _end) in zip(input_ids, encoding["offset_mapping"], strict=True):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
        labels.append(token_id if inside else IGNORE_INDEX)
    truncated = len(input_ids) > max_seq_len
    return TokenizedConversation(input_ids[:max_seq_len], labels[:max_seq_len], truncated)


@dataclass(frozen=True)
class Row:
    """One training row: one or more whole conversations, each with its own position ids."""

    segments: tuple[TokenizedConversation, ...]

    @property
    def length(self) -> int:
        return sum(len(s.input_ids) for s in self.segments)


def pack_rows(conversations: Sequence[TokenizedConversation], max_seq_len: int, pack: bool) -> list[Row]:
    """First-fit-decreasing packing into rows of at most ``max_seq_len`` tokens (or one conversation a row)."""
    usable = [c for c in conversations if c.trained_tokens > 0]
    if not pack:
        return [Row((c,)) for c in usable]
    rows: list[list[TokenizedConversation]] = []
    lengths: list[int] = []
    for conversation in sorted(usable, key=lambda c: len(c.input_ids), reverse=True):
        size = len(conversation.input_ids)
        for index, used in enumerate(lengths):
            if used + size <= max_seq_len:
                rows[index].append(conversation)
                lengths[index] += size
                break
        else:
            rows.append([conversation])
            lengths.append(size)
    return [Row(tuple(r)) for r in rows]


def collate(rows: Sequence[Row], pad_token_id: int) -> dict[str, Any]:
    """Tensors for a batch: input_ids, labels, position_ids (restarting per conversation), right padding.

    Padding is its own segment (positions from 0, labels -100), so it forms a separate block in the mask.
    The first token of each conversation never carries a label, so no loss crosses a conversation boundary.
    """
    import torch

    width = max(row.length for row in rows)
    input_ids, labels, position_ids = [], [], []
    for row in rows:
        ids: list[int] = []
        labs: list[int] = []
        pos: list[int] = []
        for segment in row.segments:
            ids += segment.input_ids
            labs += [IGNORE_INDEX] + segment.labels[1:]
            pos += list(range(len(segment.input_ids)))
        pad = width - len(ids)
        input_ids.append(ids + [pad_token_id] * pad)
        labels.append(labs + [IGNORE_INDEX] * pad)
        position_ids.append(pos + list(range(pad)))
    return {
        "real_tokens": sum(row.length for row in rows),
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
    }


class StepIndexedBatches:
    """Micro-batch number ``m`` is a pure function of (rows, batch size, seed, m).

    This makes resuming exact: a resumed run asks for the batches from the next untrained micro-step and gets
    the same ones an uninterrupted run would have seen. Each pass over the data uses a fresh seeded shuffle.
    """

    def __init__(self, rows: Sequence[Row], micro_batch_size: int, seed: int, pad_token_id: int):
        if not rows:
            raise ValueError("no training rows: every assistant turn was cut off by max_seq_len; raise "
                             "lora_training's max_seq_len")
        self.rows = list(rows)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.batches_per_pass = -(-len(self.rows) // micro_batch_size)

    def batch(self, micro_step: int) -> dict[str, Any]:
        data_pass, index = divmod(micro_step, self.batches_per_pass)
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + data_pass).shuffle(order)
        chosen = order[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]
        batch = collate([self.rows[i] for i in chosen], self.pad_token_id)
        batch["micro_step"] = micro_step
        return batch

    def iterate_from(self, micro_step: int) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch(micro_step)
            micro_step += 1


def fixed_batches(rows: Sequence[Row], batch_size: int, pad_token_id: int) -> list[dict[str, Any]]:
    """Evaluation batches in a fixed order."""
    return [collate(rows[i : i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]


def summed_token_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(sum of per-token losses, number of labelled tokens) for one batch; no cache, so packing masks apply.

    Only positions that predict a labelled token go through the output layer: with a 49k-token vocabulary
    that projection dominates the cost, and most positions (system, therapist turns, padding) carry no loss.
    """
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask]).float()
    return F.cross_entropy(logits, targets[mask], reduction="sum"), mask.sum()
