"""FLOPs, peak and MFU arithmetic (pixtrain_dagster/core/throughput.py) against values computed by hand."""

from __future__ import annotations

import pytest

from pixtrain_dagster.core.throughput import (
    linear_parameters,
    lora_flops_per_token,
    mfu,
    peak_flops,
    segment_attention_length,
)

# tests/tiny_model.py's shape
TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 512,
}
# SmolLM2-135M
SMOLLM2 = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
}


def test_linear_parameters_by_hand():
    # per layer: q,o 64x64 each; k,v 64x32 each; MLP 3 x 64x128
    assert linear_parameters(TINY) == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) == 73_728
    # SmolLM2: 30 x (2*576*576 + 2*576*192 + 3*576*1536); + 49152*576 tied embeddings = the 134.5M it reports
    assert linear_parameters(SMOLLM2) == 106_168_320
    assert linear_parameters(SMOLLM2) + 49152 * 576 == 134_479_872


def test_linear_parameters_match_a_real_llama():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    counted = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert linear_parameters(model.config) == counted


def test_lora_flops_per_token_by_hand():
    trainable = 2 * ((64 * 8 + 8 * 64) * 2 + (64 * 8 + 8 * 32) * 2)  # r=8 on q, k, v, o of 2 layers
    assert trainable == 7_168
    # 4 * (73728 + 7168) + 2 * 7168 + 6 * 2 layers * 64 * S=100 + 4 * 512 * 64
    assert lora_flops_per_token(TINY, trainable, seq_len=100) == 323_584 + 14_336 + 76_800 + 131_072 == 545_792
    # only a quarter of the positions through the output layer
    assert lora_flops_per_token(TINY, trainable, seq_len=100, head_fraction=0.25) == 545_792 - 131_072 + 32_768


def test_lora_needs_about_two_thirds_of_full_fine_tuning():
    # With few trainable parameters and short sequences LoRA is ~4N per token, against 6N for full fine-tuning.
    n = linear_parameters(SMOLLM2)
    per_token = lora_flops_per_token(SMOLLM2, trainable_params=0, seq_len=1, head_fraction=0)
    assert per_token == 4 * n + 6 * 30 * 576 * 1  # 4N, plus one token of attention context
    assert per_token / (6 * n) == pytest.approx(2 / 3, rel=1e-3)


def test_flops_refuse_incomplete_configs_and_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        lora_flops_per_token({k: v for k, v in TINY.items() if k != "vocab_size"}, 0, 10)
    with pytest.raises(ValueError):
        lora_flops_per_token(TINY, 0, seq_len=0)
    with pytest.raises(ValueError):
        lora_flops_per_token(TINY, 0, seq_len=10, head_fraction=1.5)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12  # not the L4's figure
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA A10G") == 125e12
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=2.5) == 2.5e12
    with pytest.raises(ValueError):
        peak_flops("NVIDIA H200", override_tflops=0)


def test_mfu():
    # 10k tokens/s x 4e10 FLOPs/token = 4e14 FLOP/s on a 989 TFLOP/s device
    assert mfu(10_000, 4e10, 989e12) == pytest.approx(0.40445, rel=1e-4)
    assert mfu(10_000, 4e10, None) is None


def test_packed_attention_length_is_the_token_weighted_block_length():
    assert segment_attention_length([100]) == 100
    assert segment_attention_length([100, 300]) == (100 * 100 + 300 * 300) / 400 == 250
    with pytest.raises(ValueError):
        segment_attention_length([])
