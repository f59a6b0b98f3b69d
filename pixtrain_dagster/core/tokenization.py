"""Chat-template tokenisation with loss on assistant tokens only, and sequence packing.

Assistant spans are found in the rendered text: the template rendered up to the generation prompt before an
assistant turn, and rendered through that turn, are both prefixes of the full rendering, so the characters
between them are that turn (its content and end-of-turn token). Tokens whose characters start inside a span
carry labels; all other tokens get -100.

A conversation longer than ``max_seq_len`` keeps its system prompt and its newest whole turns: the last client
reply is what we train, so the oldest exchanges go first. One that does not fit even then is dropped and counted.

Packing concatenates conversations into rows of at most ``max_seq_len`` tokens with position ids restarting
at 0 for each conversation. With no attention mask and no KV cache, transformers turns position-id restarts
into a block-diagonal causal mask (SDPA/eager), or varlen flash attention reads them directly, so packed
conversations never attend to each other. `model_checks.verify_packing_isolation` proves that per model at load.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    dropped_turns: int = 0  # oldest user/assistant messages left out to fit max_seq_len

    @property
    def truncated(self) -> bool:
        return self.dropped_turns > 0

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def loss_tokens(self) -> int:
        """Labelled tokens that carry loss in a batch: the first token of a segment predicts nothing."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass(frozen=True)
class TokenizedSet:
    conversations: list[TokenizedConversation]
    total: int
    truncated: int  # kept, with their oldest turns left out
    dropped_too_long: int  # even the system prompt plus the last exchange exceeds max_seq_len

    def counts(self) -> dict[str, int]:
        return {
            "conversations": self.total,
            "kept": len(self.conversations),
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
        }


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


def _tokenize_whole(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
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
    return input_ids, labels


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int
) -> TokenizedConversation | None:
    """Tokens and labels of a conversation that fits ``max_seq_len``, or None when it cannot be made to fit.

    Too long: keep the system prompt and the newest whole turns, each kept part starting at a user message;
    the number of dropped messages is the smallest that fits (binary search: fewer kept turns are never longer).
    """
    input_ids, labels = _tokenize_whole(tokenizer, messages)
    if len(input_ids) <= max_seq_len:
        return TokenizedConversation(input_ids, labels)
    head = messages[:1] if messages[0]["role"] == "system" else []
    turn_starts = [i for i in range(len(head), len(messages)) if messages[i]["role"] == "user"]

    def fit(start: int) -> TokenizedConversation | None:
        ids, labs = _tokenize_whole(tokenizer, head + messages[start:])
        return TokenizedConversation(ids, labs, start - len(head)) if len(ids) <= max_seq_len else None

    low, high, best = 1, len(turn_starts) - 1, None  # index into turn_starts; 0 is the whole conversation
    while low <= high:
        middle = (low + high) // 2
        candidate = fit(turn_starts[middle])
        if candidate is None:
            low = middle + 1
        else:
            best, high = candidate, middle - 1
    return best


def tokenize_conversations(
    tokenizer: Any, conversations: Sequence[list[dict[str, str]]], max_seq_len: int
) -> TokenizedSet:
    kept, truncated, dropped = [], 0, 0
    for messages in conversations:
        tokenized = tokenize_conversation(tokenizer, messages, max_seq_len)
        if tokenized is None:
            dropped += 1
            continue
        truncated += tokenized.truncated
        kept.append(tokenized)
    return TokenizedSet(kept, len(conversations), truncated, dropped)


@dataclass(frozen=True)
class Row:
    """One training row: one or more whole conversations, each with its own position ids."""

    segments: tuple[TokenizedConversation, ...]

    @cached_property
    def length(self) -> int:
        return sum(len(s.input_ids) for s in self.segments)

    @cached_property
    def loss_tokens(self) -> int:
        return sum(s.loss_tokens for s in self.segments)


class _FirstFitTree:
    """Max-segment tree over row capacities: finds the first row with room for ``size`` in O(log rows)."""

    def __init__(self, max_rows: int, capacity: int):
        self.leaves = 1 << max(0, (max_rows - 1).bit_length())
        self.room = [0] * (2 * self.leaves)
        self.capacity = capacity

    def first_fit(self, size: int) -> int | None:
        if self.room[1] < size:
            return None
        node = 1
        while node < self.leaves:
            node = 2 * node if self.room[2 * node] >= size else 2 * node + 1
        return node - self.leaves

    def set_room(self, index: int, room: int) -> None:
        node = index + self.leaves
        self.room[node] = room
        while node > 1:
            node //= 2
            self.room[node] = max(self.room[2 * node], self.room[2 * node + 1])


def pack_rows(conversations: Sequence[TokenizedConversation], max_seq_len: int, pack: bool) -> list[Row]:
    """First-fit-decreasing packing into rows of at most ``max_seq_len`` tokens (or one conversation a row).

    O(n log n): a sort, then one segment-tree descent per conversation (a linear scan of open rows is O(n^2)).
    """
    usable = [c for c in conversations if c.trained_tokens > 0]
    if not pack:
        return [Row((c,)) for c in usable]
    rows: list[list[TokenizedConversation]] = []
    tree = _FirstFitTree(len(usable), max_seq_len)
    used: list[int] = []
    for conversation in sorted(usable, key=lambda c: len(c.input_ids), reverse=True):
        size = len(conversation.input_ids)
        index = tree.first_fit(size)
        if index is None:
            index = len(rows)
            rows.append([])
            used.append(0)
        rows[index].append(conversation)
        used[index] += size
        tree.set_room(index, max_seq_len - used[index])
    return [Row(tuple(r)) for r in rows]


def collate(rows: Sequence[Row], pad_token_id: int, flatten: bool = False) -> dict[str, Any]:
    """Tensors for a batch: input_ids, labels, position_ids (restarting per conversation), right padding.

    Padding is its own segment (positions from 0, labels -100), so it forms a separate block in the mask.
    The first token of each conversation never carries a label, so no loss crosses a conversation boundary.
    ``flatten`` puts every row of the batch into one row with no padding at all: the padding-free layout for
    varlen attention kernels, which find the conversations from the position-id restarts.
    """
    import torch

    if flatten:
        rows = [Row(tuple(segment for row in rows for segment in row.segments))]
    width = max(row.length for row in rows)
    input_ids, labels, position_ids, segment_lengths = [], [], [], []
    for row in rows:
        ids: list[int] = []
        labs: list[int] = []
        pos: list[int] = []
        for segment in row.segments:
            ids += segment.input_ids
            labs += [IGNORE_INDEX] + segment.labels[1:]
            pos += list(range(len(segment.input_ids)))
        pad = width - len(ids)
        segment_lengths += [len(segment.input_ids) for segment in row.segments] + ([pad] if pad else [])
        input_ids.append(ids + [pad_token_id] * pad)
        labels.append(labs + [IGNORE_INDEX] * pad)
        position_ids.append(pos + list(range(pad)))
    label_tensor = torch.tensor(labels, dtype=torch.long)
    # Where the loss is taken, found here on the host: selecting those positions on the device with a boolean
    # mask would make the host wait for the device to count them, in every forward and again in backward.
    predicted = label_tensor[:, 1:]  # position t - 1 predicts token t
    row_index, column = (predicted != IGNORE_INDEX).nonzero(as_tuple=True)
    return {
        "real_tokens": sum(row.length for row in rows),
        "label_tokens": sum(row.loss_tokens for row in rows),
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": label_tensor,
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        # Runs of restarting position ids over the rows laid end to end, known here on the host, so that
        # segmented_sdpa does not read them back from the device in every layer.
        "segment_lengths": segment_lengths,
        # The same runs as cumulative offsets (flash-attn's cu_seqlens): a tensor, so it is pinned and copied to the
        # device with the batch, once, instead of built in every layer of every forward.
        "segment_bounds": torch.tensor(list(itertools.accumulate(segment_lengths, initial=0)), dtype=torch.int32),
        # Flat indices into the (rows x width) positions, and the tokens they predict (core/loss.py).
        "labelled_positions": row_index * width + column,
        "labelled_targets": predicted[row_index, column],
    }


@dataclass
class StepIndexedBatches:
    """Micro-batch number ``m`` is a pure function of (rows, batch size, seed, m).

    This makes resuming exact: a resumed run asks for the batches from the next untrained micro-step and gets
    the same ones an uninterrupted run would have seen. Each pass over the data uses a fresh seeded shuffle,
    computed once per pass, so picking a batch costs O(batch). Every batch also carries the labelled-token
    count of its whole optimizer step (``accumulation`` micro-batches): the loss is normalised by that, so a
    step's gradient does not depend on how its rows are split into micro-batches.

    With several processes, ``micro_batch_size`` rows make the GLOBAL micro-batch and process ``rank`` takes its
    contiguous share: the rows of a step do not depend on the world size. Token counts in a batch (``*_tokens``)
    are global, known to every rank without communication, so every rank's counters agree.
    """

    rows: Sequence[Row]
    micro_batch_size: int
    seed: int
    pad_token_id: int
    accumulation: int = 1
    flatten: bool = False
    world_size: int = 1
    rank: int = 0
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError(
                "no training rows: every conversation was longer than max_seq_len even with only "
                "its system prompt and last exchange; raise lora_training's max_seq_len"
            )
        if self.micro_batch_size % self.world_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} is not a multiple of the world size {self.world_size}"
            )
        self.rows = list(self.rows)
        if len(self.rows) < self.world_size:
            raise ValueError(
                f"{len(self.rows)} training rows cannot feed {self.world_size} processes; use fewer "
                "devices or more data"
            )
        # Whole micro-batches only (the rows left over are in the next pass's shuffle): every micro-batch has
        # micro_batch_size rows, so each rank's share is the same size whatever the world size.
        self.batches_per_pass = max(1, len(self.rows) // self.micro_batch_size)

    def _order(self, data_pass: int) -> list[int]:
        if data_pass not in self._orders:
            order = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + data_pass).shuffle(order)
            # Two passes cached: the current one and the next (an optimizer step may span both).
            self._orders = {p: o for p, o in self._orders.items() if p >= data_pass - 1}
            self._orders[data_pass] = order
        return self._orders[data_pass]

    def rows_of(self, micro_step: int) -> list[Row]:
        """The global micro-batch: every rank's rows."""
        data_pass, index = divmod(micro_step, self.batches_per_pass)
        chosen = self._order(data_pass)[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]
        return [self.rows[i] for i in chosen]

    def _shards(self, rows: list[Row]) -> list[list[Row]]:
        size = -(-len(rows) // self.world_size)
        return [rows[r * size : (r + 1) * size] for r in range(self.world_size)]

    def step_label_tokens(self, optimizer_step: int) -> int:
        first = optimizer_step * self.accumulation
        return sum(
            row.loss_tokens
            for m in range(first, first + self.accumulation)
            for shard in self._shards(self.rows_of(m))
            for row in shard
        )

    def batch(self, micro_step: int) -> dict[str, Any]:
        shards = self._shards(self.rows_of(micro_step))
        batch = collate(shards[self.rank], self.pad_token_id, flatten=self.flatten)
        batch["micro_step"] = micro_step
        batch["step_label_tokens"] = self.step_label_tokens(micro_step // self.accumulation)
        if self.world_size > 1:
            batch["real_tokens"] = sum(row.length for shard in shards for row in shard)
            batch["label_tokens"] = sum(row.loss_tokens for shard in shards for row in shard)
            batch["positions"] = sum(_positions(shard, self.flatten) for shard in shards)
        else:
            batch["positions"] = int(batch["input_ids"].numel())
        return batch

    def iterate_from(self, micro_step: int) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch(micro_step)
            micro_step += 1


def _positions(rows: Sequence[Row], flatten: bool) -> int:
    """Positions a collated batch of ``rows`` computes, padding included."""
    lengths = [row.length for row in rows]
    return sum(lengths) if flatten else max(lengths) * len(lengths)


def fixed_batches(rows: Sequence[Row], batch_size: int, pad_token_id: int) -> list[dict[str, Any]]:
    """Evaluation batches in a fixed order."""
    return [collate(rows[i : i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]
