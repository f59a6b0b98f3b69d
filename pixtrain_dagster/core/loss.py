"""The token loss: cross-entropy on labelled positions only, with the model's own output transforms, in chunks.

Only positions that predict a labelled token go through the output layer: with a 49k-token vocabulary that
projection dominates the cost, and most positions (system, therapist turns, padding) carry no loss. The labelled
positions go through it ``chunk_tokens`` at a time, each chunk recomputed in the backward pass, so at most one
chunk's fp32 logits (chunk x vocabulary) are alive at once instead of all of them.

Some architectures transform the logits after the output layer (Gemma 2/3 soft-capping, Cohere's and Granite's
scaling). Calling the decoder and the head ourselves skips the model's forward, so those transforms are applied
here; `model_checks.verify_loss_path` compares against the model's own logits at load and refuses a model whose
transform we do not know.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .attention import SEGMENTED_SDPA, full_attention_within, packed_causal_mask
from .tokenization import IGNORE_INDEX

# model_type -> (config attribute, operation). Soft-capping is read from any config that has it.
_LOGIT_SCALES: dict[str, tuple[str, str]] = {
    "cohere": ("logit_scale", "multiply"),
    "cohere2": ("logit_scale", "multiply"),
    "granite": ("logits_scaling", "divide"),
    "granitemoe": ("logits_scaling", "divide"),
    "granitemoeshared": ("logits_scaling", "divide"),
    "hyperclovax": ("logits_scaling", "multiply"),
}


def output_transform(config: Any) -> Callable[[Any], Any] | None:
    """The model's logit transform after its output layer, or None when it has none that we know of."""
    import torch

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    steps: list[Callable[[Any], Any]] = []
    scale = _LOGIT_SCALES.get(text_config.model_type)
    if scale is not None and getattr(text_config, scale[0], None) not in (None, 1, 1.0):
        value = float(getattr(text_config, scale[0]))
        steps.append((lambda x: x * value) if scale[1] == "multiply" else (lambda x: x / value))
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def transform(logits):
        for step in steps:
            logits = step(logits)
        return logits

    return transform


def decoder_and_head(model: Any) -> tuple[Any, Any, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), base.config


def labelled_logits(head: Any, hidden: Any, transform: Callable[[Any], Any] | None) -> Any:
    logits = head(hidden).float()
    return transform(logits) if transform is not None else logits


def _chunk_loss(hidden: Any, targets: Any, head: Any, transform: Callable[[Any], Any] | None) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(labelled_logits(head, hidden, transform), targets, reduction="sum")


def takes_cu_seqlens(implementation: str | None) -> bool:
    """Whether transformers runs this attention implementation as flash-attn does: no mask of its own, packed rows
    found only from cu_seqlens or, in a batch of one row, from the position ids. flash_attention_2/3/4 and hub
    flash kernels (kernels-community/flash-attn...) register flash attention's mask function; so does any other
    kernel transformers wraps that way. Given several rows and no cu_seqlens, these run one causal kernel across
    the conversations of a packed row."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    return implementation is not None and ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is flash_attention_mask


def decoder_inputs(config: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Position ids and attention inputs for the decoder, chosen so that the forward reads nothing back from the
    device when the batch says enough on the host (collate's ``segment_lengths``).

    Left alone, transformers finds packed rows by reading the position ids back (a host synchronisation in every
    forward). segmented_sdpa gets the host's segment lengths, flash-attn the batch's cu_seqlens. sdpa on packed or
    padded rows gets the block-diagonal causal mask transformers would build, built on the device without the
    read-back. Rows that are each one whole conversation keep transformers' path: its read-back finds no packing
    and lets SDPA use its causal kernel (flash on GPUs), worth more than the synchronisation. Models with
    sliding-window or chunked attention build their own per-layer masks: they keep transformers' path too.
    """
    implementation = getattr(config, "_attn_implementation", None)
    position_ids = batch["position_ids"]
    lengths = batch.get("segment_lengths")
    if lengths is None:
        return {"position_ids": position_ids}
    bounds = batch.get("segment_bounds")
    if implementation == SEGMENTED_SDPA:
        return {"position_ids": position_ids, "segment_lengths": lengths, "segment_bounds": bounds}
    if bounds is not None and takes_cu_seqlens(implementation):
        # flash-attn's varlen call with the batch's own cu_seqlens: without them transformers derives them from the
        # position ids again in every layer, reading them back each time. Its mask preparation still reads the position
        # ids back once a forward to look for packing; that one is kept (docs/training.md).
        longest = max(lengths)
        return {
            "position_ids": position_ids,
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    rows, width = position_ids.shape
    packed_or_padded = len(lengths) > rows
    if implementation == "sdpa" and packed_or_padded and full_attention_within(config, width):
        return {"position_ids": position_ids, "attention_mask": packed_causal_mask(position_ids)}
    return {"position_ids": position_ids}


def summed_token_loss(model: Any, batch: dict[str, Any], chunk_tokens: int = 2048) -> tuple[Any, Any]:
    """(sum of per-token losses, number of labelled tokens) for one batch; no cache, so packing masks apply.

    Batches from ``collate`` name their labelled positions, so nothing here waits on the device; other batches
    (hand-built in tests) are selected with a boolean mask, which does."""
    import torch
    from torch.utils.checkpoint import checkpoint

    decoder, head, config = decoder_and_head(model)
    transform = output_transform(config)
    hidden = decoder(input_ids=batch["input_ids"], use_cache=False, **decoder_inputs(config, batch)).last_hidden_state
    if "labelled_positions" in batch:
        positions = batch["labelled_positions"]
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        wanted, count = batch["labelled_targets"], int(positions.shape[0])
    else:
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        selected, wanted, count = hidden[:, :-1][mask], targets[mask], mask.sum()
    if selected.size(0) <= chunk_tokens:
        return _chunk_loss(selected, wanted, head, transform), count
    total = selected.new_zeros((), dtype=torch.float32)
    for hidden_chunk, target_chunk in zip(selected.split(chunk_tokens), wanted.split(chunk_tokens), strict=True):
        if torch.is_grad_enabled():
            # Recomputed in backward: only this chunk's hidden states stay alive, not its fp32 logits.
            total = total + checkpoint(_chunk_loss, hidden_chunk, target_chunk, head, transform, use_reentrant=False)
        else:
            total = total + _chunk_loss(hidden_chunk, target_chunk, head, transform)
    return total, count
