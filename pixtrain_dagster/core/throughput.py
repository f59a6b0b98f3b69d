"""Model FLOPs of LoRA training, accelerator peak throughput, and model FLOPs utilisation (MFU).

Plain arithmetic on a model config: no torch import, so logs, metadata and benchmarks can all use it.

FLOPs per trained token (a multiply-add is 2 FLOPs), for a decoder with ``L`` layers:

    flops/token = 4 * N_linear                       # forward 2N + backward activation grads 2N (frozen base)
                + 2 * P_trainable                    # backward weight grads, only for the trainable (LoRA) weights
                + 6 * L * d_attn * S                 # attention scores and values: forward 2*L*d_attn*S, backward 2x
                + 4 * f_head * V * H                 # output layer: forward 2*V*H, backward activation grads 2*V*H

where
- ``N_linear`` = parameters of the matrix multiplications inside the decoder layers (q, k, v, o projections and the
  MLP), plus the trainable LoRA weights (their forward and activation-gradient products are real work too);
  embeddings and norms are excluded (a lookup and element-wise work);
- ``P_trainable`` = trainable parameters (LoRA A and B matrices);
- ``d_attn`` = ``num_attention_heads * head_dim``; ``S`` = the attention context length in tokens: a token at
  position p of a causal sequence attends over p tokens, so QK^T and AV cost ``2 * 2 * p * d_attn`` forward and the
  mean over a sequence of length ``l`` is ``2 * l * d_attn`` (causal halving). With packing, each conversation is
  its own causal block, so ``S`` is the token-weighted mean conversation length ``sum(l_i^2) / sum(l_i)``, not the
  row length; without packing it is the row length;
- ``V * H`` = the output layer (vocabulary x hidden size); ``f_head`` = the fraction of positions that go through it.
  A loss over every position has ``f_head = 1``; this project's loss projects only positions that predict a labelled
  (assistant) token, so the FLOPs it needs are ``f_head`` = labelled tokens / input tokens.

The backward pass through the frozen base computes activation gradients (2N) but no weight gradients, which is
why LoRA training needs about 4N, not the 6N of full fine-tuning. MFU = achieved model FLOP/s / device peak dense
bf16 FLOP/s: recomputation (activation checkpointing) and padding do not count as model FLOPs, so they lower MFU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets. Matched on the device name
# that torch.cuda.get_device_name() returns, most specific pattern first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM / HBM3
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("L4", 121.0),
)


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def decoder_linear_shapes(config: Any) -> list[tuple[int, int]]:
    """(in, out) features of each matrix multiplication inside one decoder layer: the q, k, v and o projections
    and the gated MLP's gate, up and down. Llama-style layout (Llama, Mistral, Qwen, Gemma, SmolLM): q and o are
    ``hidden x (heads * head_dim)``, k and v ``hidden x (kv_heads * head_dim)``. Biases are ignored."""
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads") or heads)
    head_dim = int(_get(config, "head_dim") or hidden // heads)
    intermediate = int(_get(config, "intermediate_size"))
    attention = heads * head_dim
    return [
        (hidden, attention),
        (hidden, kv_heads * head_dim),
        (hidden, kv_heads * head_dim),
        (attention, hidden),
        (hidden, intermediate),
        (hidden, intermediate),
        (intermediate, hidden),
    ]


def linear_parameters(config: Any) -> int:
    """Parameters of the matrix multiplications inside the decoder layers (attention projections and MLP)."""
    layers = int(_get(config, "num_hidden_layers"))
    return layers * sum(fan_in * fan_out for fan_in, fan_out in decoder_linear_shapes(config))


def lora_flops_per_token(config: Any, trainable_params: int, seq_len: float, head_fraction: float = 1.0) -> float:
    """Model FLOPs per trained token of LoRA training (formula in the module docstring).

    ``seq_len`` is the attention context S (see above); ``head_fraction`` the share of positions whose logits the
    loss needs. Raises ValueError on a config without the fields a decoder needs.
    """
    missing = [
        n
        for n in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size")
        if _get(config, n) is None
    ]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: cannot count FLOPs for it")
    if seq_len <= 0 or not 0 <= head_fraction <= 1 or trainable_params < 0:
        raise ValueError(
            f"need seq_len > 0, 0 <= head_fraction <= 1, trainable_params >= 0 (got {seq_len}, "
            f"{head_fraction}, {trainable_params})"
        )
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    head_dim = int(_get(config, "head_dim") or hidden // heads)
    layers = int(_get(config, "num_hidden_layers"))
    vocab = int(_get(config, "vocab_size"))
    n_linear = linear_parameters(config) + trainable_params
    attention = 6 * layers * heads * head_dim * seq_len
    head = 4 * head_fraction * vocab * hidden
    return 4 * n_linear + 2 * trainable_params + attention + head


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a device by its name, or None when it is not in the table (pass an override)."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"peak TFLOP/s must be > 0 (got {override_tflops})")
        return override_tflops * 1e12
    name = device_name.upper()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in name:
            return tflops * 1e12
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1+): achieved model FLOP/s over the device peak; None without a peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_second * flops_per_token / peak


def segment_attention_length(lengths: list[int] | tuple[int, ...]) -> float:
    """Token-weighted mean length of causal blocks: the ``S`` of the formula for packed conversations."""
    total = sum(lengths)
    if total <= 0:
        raise ValueError("no tokens")
    return sum(length * length for length in lengths) / total
