"""Packed-row attention without a mask: PyTorch SDPA's causal kernel run once per conversation.

With plain ``sdpa``, transformers turns restarting position ids into a 4-D block-diagonal mask, so every packed
row pays for row_length^2 scores (the masked ones included), the mask itself is built and read in every layer, and
SDPA cannot take its causal fast path. ``segmented_sdpa`` cuts each row at its position-id restarts and runs
``scaled_dot_product_attention(is_causal=True)`` on each conversation, so attention costs sum(length^2) / 2 and no
mask exists. Conversations (and the padding after them) are separate segments, so they cannot see each other by
construction; ``model_checks.verify_packing_isolation`` still checks it at load like any other kernel.

On CUDA in bf16/fp16 the segments go through PyTorch's built-in varlen flash kernel (``torch.nn.attention.varlen``)
in one call per layer; elsewhere (CPU, fp32, attention dropout) through one SDPA call per conversation.
It is for training on packed rows: no KV cache and no padding mask. Generation uses plain ``sdpa``.
Segment boundaries come from the batch's host-side ``segment_lengths`` when the caller passes them, else from the
position ids (read back from the device in every layer). ``segmented_sdpa_misfit`` says, from the config, when a
model needs more (sliding windows, soft-capping): training then refuses it, or ``auto`` falls back to sdpa.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

SEGMENTED_SDPA = "segmented_sdpa"


def _segment_lengths(position_ids: Any, rows: int, row_length: int) -> list[int]:
    """Lengths of the runs of positions 0, 1, 2, ... over the flattened rows (each row also starts a segment)."""
    import torch

    flat = position_ids.expand(rows, row_length).reshape(-1)
    bounds = torch.nonzero(flat == 0).flatten().tolist() + [rows * row_length]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def _check_rows(lengths: list[int], rows: int, row_length: int) -> None:
    """Every row starts a segment, so no segment crosses from one row into the next."""
    ends, total = set(), 0
    for n in lengths:
        total += n
        ends.add(total)
    if total != rows * row_length or any(r * row_length not in ends for r in range(1, rows)) or 0 in lengths:
        raise ValueError(
            f"segmented_sdpa: segments {lengths[:8]}{'...' if len(lengths) > 8 else ''} do not tile {rows} rows of "
            f"{row_length} positions with every row starting at position 0 (packed training rows restart their "
            "position ids per conversation)"
        )


def segmented_sdpa_misfit(config: Any, max_seq_len: int) -> str | None:
    """What in this model's attention segmented_sdpa does not implement, or None when it fits."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if not full_attention_within(config, max_seq_len):
        window = getattr(config, "sliding_window", None)
        what = f"sliding-window attention over {window} tokens" if window else "chunked attention"
        return f"{what} (max_seq_len {max_seq_len})"
    return None


def packed_causal_mask(position_ids: Any) -> Any:
    """(rows, length) position ids -> (rows, 1, length, length) bool mask, True where a position may attend: causal
    within each run of restarting positions (a conversation, or the padding after them), nothing across runs. The
    mask transformers builds for sdpa from packed position ids, built without reading anything back from the
    device."""
    import torch

    restarts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    conversation = restarts.cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((conversation[:, :, None] == conversation[:, None, :]) & causal)[:, None]


def full_attention_within(config: Any, row_length: int) -> bool:
    """Whether every layer attends over the whole causal context of a row of ``row_length`` (no sliding window
    shorter than the row, no chunked attention): then one causal mask serves every layer.

    A window in the config counts even where ``layer_types`` names no sliding layer: Mistral, Mixtral, Phi-3 and
    Starcoder2 apply ``sliding_window`` without reading ``layer_types``, and other models name windowed layers
    differently."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "attention_chunk_size", None):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or window >= row_length


def segmented_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention-interface function: (batch, heads, length, dim) in, (batch, length, heads, dim) out."""
    import torch
    import torch.nn.functional as F

    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"attn_implementation segmented_sdpa does not support this model's attention ({unsupported}); "
                "set lora_training's attn_implementation to eager or sdpa"
            )
    if attention_mask is not None:
        raise ValueError(
            "segmented_sdpa takes packed rows with position ids, not an attention mask (nor a KV cache: it is for "
            "training); load the model with sdpa for padded batches or to generate"
        )
    rows, heads, length, dim = query.shape
    if key.shape[2] != length:
        raise ValueError(
            "segmented_sdpa is for training on packed rows (no KV cache); load the model with sdpa to generate"
        )
    lengths = kwargs.get("segment_lengths")
    if lengths is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            lengths = [length] * rows
        else:
            lengths = _segment_lengths(position_ids, rows, length)
    _check_rows(lengths, rows, length)
    window = kwargs.get("sliding_window")
    if window is not None and max(lengths) > window:
        raise ValueError(
            f"attn_implementation segmented_sdpa has no sliding window, and this model's layers attend over only "
            f"{window} tokens while a conversation here has {max(lengths)}; set lora_training's attn_implementation "
            "to sdpa or flash_attention_2"
        )
    dropout_p = dropout if module.training else 0.0
    if _varlen_kernel_applies(query, key, value, dropout_p):
        return _varlen_attention(query, key, value, lengths, scaling, kwargs.get("segment_bounds")), None
    kv_heads, value_dim = key.shape[1], value.shape[-1]
    # (rows, heads, length, dim) -> (heads, rows * length, dim): segments are contiguous slices of one flat axis.
    flat_q = query.transpose(0, 1).reshape(heads, rows * length, dim)
    flat_k = key.transpose(0, 1).reshape(kv_heads, rows * length, key.shape[-1])
    flat_v = value.transpose(0, 1).reshape(kv_heads, rows * length, value_dim)
    outputs = []
    for q, k, v in zip(
        flat_q.split(lengths, dim=1), flat_k.split(lengths, dim=1), flat_v.split(lengths, dim=1), strict=True
    ):
        # A leading batch dim of 1: with 3-D inputs and GQA, SDPA falls back to its math kernel on CPU.
        outputs.append(
            F.scaled_dot_product_attention(
                q[None],
                k[None],
                v[None],
                dropout_p=dropout_p,
                is_causal=True,
                scale=scaling,
                enable_gqa=kv_heads != heads,
            )[0]
        )
    out = torch.cat(outputs, dim=1)  # (heads, rows * length, dim)
    return out.reshape(heads, rows, length, value_dim).permute(1, 2, 0, 3).contiguous(), None


def _varlen_kernel_applies(query: Any, key: Any, value: Any, dropout_p: float) -> bool:
    """On CUDA in bf16/fp16, PyTorch's own varlen flash kernel takes every segment in one call (no kernel launch per
    conversation and layer, no flash-attn package). It has no dropout, needs equal query and value head sizes and
    an Ampere or newer GPU (flash attention's kernels are built for sm80+), and the torch installed must take a
    causal window (and grouped KV heads where the model has them): older builds fall back to the loop."""
    import torch

    return (
        query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and dropout_p == 0.0
        and query.shape[-1] == value.shape[-1] <= 256
        and _flash_capable(query.device.index or 0)
        and varlen_attn_takes(needs_gqa=key.shape[1] != query.shape[1])
    )


@functools.cache  # asked in every layer of every forward: the answer never changes in a process
def _flash_capable(device_index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def varlen_attn_takes(needs_gqa: bool, varlen_attn: Any = None) -> bool:
    """Whether ``torch.nn.attention.varlen.varlen_attn`` (or the function given) takes what ``_varlen_attention``
    passes: ``window_size`` and, for grouped KV heads, ``enable_gqa`` (both added to torch in 2026)."""
    parameters = _installed_varlen_parameters() if varlen_attn is None else _parameters(varlen_attn)
    return "window_size" in parameters and (not needs_gqa or "enable_gqa" in parameters)


def _parameters(function: Any) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(function).parameters)


@functools.cache  # asked in every layer of every forward
def _installed_varlen_parameters() -> frozenset[str]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return _parameters(varlen_attn)


def _varlen_attention(
    query: Any, key: Any, value: Any, lengths: list[int], scaling: float | None, bounds: Any = None
) -> Any:
    """(rows, heads, length, dim) in, (rows, length, heads, dim) out, through ``torch.nn.attention.varlen``.

    ``bounds`` are the cumulative segment offsets already on the device (collate's ``segment_bounds``, copied with
    the batch); without them they are built from ``lengths`` here, in every layer."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, length, dim = query.shape

    def flat(t: Any) -> Any:  # (rows, h, length, d) -> (rows * length, h, d): the segments end to end
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], t.shape[-1])

    if bounds is not None and bounds.device == query.device:
        cumulative = bounds
    else:
        # Built from host integers: copied to the device, never read back from it.
        offsets = list(itertools.accumulate(lengths, initial=0))
        cumulative = torch.tensor(offsets, dtype=torch.int32).to(query.device, non_blocking=True)
    longest = max(lengths)
    out = varlen_attn(
        flat(query),
        flat(key),
        flat(value),
        cumulative,
        cumulative,
        longest,
        longest,
        scale=scaling,
        window_size=(-1, 0),  # causal
        enable_gqa=key.shape[1] != heads,
    )
    return out.reshape(rows, length, heads, dim)


def register_segmented_sdpa() -> None:
    """Make ``attn_implementation="segmented_sdpa"`` loadable by transformers (idempotent).

    No mask function is registered for it, on purpose: for such an implementation transformers builds no mask
    and skips reading the position ids back from the device to look for packed rows (a host synchronisation in
    every forward). It also drops a caller's 2-D padding mask without a word, so models loaded for segmented_sdpa
    get :func:`refuse_padding_masks` (core/models.py load_snapshot does it)."""
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa_attention)


def refuse_padding_masks(model: Any) -> None:
    """Refuse an attention mask at the decoder's door while it runs segmented_sdpa, which cannot honour one (a
    left-padded batch would attend to its padding). Checks only whether a mask was passed: no device read-back.
    A model switched to segmented_sdpa after loading (``set_attn_implementation``) needs this call too."""

    def check(module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and getattr(module.config, "_attn_implementation", None) == SEGMENTED_SDPA:
            raise ValueError(
                "segmented_sdpa takes packed rows with position ids, not a padding attention mask (nor a KV cache: "
                "it is for training); load the model with sdpa for padded batches or to generate"
            )

    model.get_decoder().register_forward_pre_hook(check, with_kwargs=True)
