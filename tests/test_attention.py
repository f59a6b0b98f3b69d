"""segmented_sdpa (core/attention.py): the numbers of SDPA with the block-diagonal mask, without the mask."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pixtrain_dagster.core.attention import SEGMENTED_SDPA, _segment_lengths, register_segmented_sdpa
from pixtrain_dagster.core.loss import summed_token_loss
from pixtrain_dagster.core.model_checks import verify_packing_isolation
from pixtrain_dagster.core.settings import LoraTrainingSettings
from pixtrain_dagster.core.tokenization import collate as collate_rows
from pixtrain_dagster.core.tokenization import pack_rows, tokenize_conversations


def _conversation(i: int) -> list[dict[str, str]]:
    # Different lengths, so rows hold several conversations of different sizes and some padding.
    return [
        {"role": "system", "content": "You are a client in a practice session."},
        {"role": "user", "content": "How have you been this week? " * (1 + i % 3)},
        {"role": "assistant", "content": "Honestly, not great. Work has been a lot. " * (1 + i % 4)},
    ]


@pytest.fixture(scope="module")
def packed_batch(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenized = tokenize_conversations(tokenizer, [_conversation(i) for i in range(9)], 160)
    rows = pack_rows(tokenized.conversations, 160, pack=True)
    batch = collate_rows(rows, tokenizer.pad_token_id or 0)
    assert len(rows) >= 2 and any(len(r.segments) >= 2 for r in rows), "the test needs packed rows"
    assert batch["input_ids"].numel() > batch["real_tokens"], "the test needs padding too"
    return batch


def _model(tiny_model_dir, attn_implementation: str):
    register_segmented_sdpa()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model.train()


def _loss_and_grads(model, batch):
    loss, count = summed_token_loss(model, batch)
    loss.backward()
    return loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_equal_sdpa_with_the_block_diagonal_mask(tiny_model_dir, packed_batch):
    reference = _loss_and_grads(_model(tiny_model_dir, "sdpa"), packed_batch)
    segmented = _loss_and_grads(_model(tiny_model_dir, SEGMENTED_SDPA), packed_batch)
    assert int(segmented[1]) == int(reference[1])
    torch.testing.assert_close(segmented[0], reference[0], rtol=1e-5, atol=1e-5)
    assert segmented[2].keys() == reference[2].keys() and len(reference[2]) > 10
    for name, grad in reference[2].items():
        torch.testing.assert_close(segmented[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_host_segment_lengths_match_the_position_id_restarts(tiny_model_dir, packed_batch):
    rows, width = packed_batch["position_ids"].shape
    assert packed_batch["segment_lengths"] == _segment_lengths(packed_batch["position_ids"], rows, width)
    assert sum(packed_batch["segment_lengths"]) == rows * width
    model = _model(tiny_model_dir, SEGMENTED_SDPA).eval()
    without_host_lengths = {k: v for k, v in packed_batch.items() if k != "segment_lengths"}
    with torch.no_grad():
        torch.testing.assert_close(
            summed_token_loss(model, packed_batch)[0], summed_token_loss(model, without_host_lengths)[0]
        )
    # Host lengths of one segment a row (plain causal rows, conversations seeing their neighbours) change the
    # loss: the host lengths are the ones in use.
    with torch.no_grad():
        assert not torch.allclose(
            summed_token_loss(model, packed_batch)[0],
            summed_token_loss(model, {**packed_batch, "segment_lengths": [width] * rows})[0],
        )


def test_packing_isolation_holds_and_is_verified_at_load(tiny_model_dir):
    model = _model(tiny_model_dir, SEGMENTED_SDPA)
    assert verify_packing_isolation(model, SEGMENTED_SDPA) < 1e-4


def test_what_it_cannot_do_is_refused_with_the_setting_to_change(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from pixtrain_dagster.core.models import load_snapshot

    # As training loads it: transformers itself drops a padding mask for an implementation without a mask function.
    model, _ = load_snapshot(tiny_model_dir, "cpu", for_training=False, attn_implementation=SEGMENTED_SDPA)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="not a padding attention mask.*load the model with sdpa for padded"):
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="not a padding attention mask.*load the model with sdpa for padded"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))(ids, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache.*load the model with sdpa .*to generate"):
        model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=True)
    model.set_attn_implementation("sdpa")  # switched (or loaded) with sdpa, masks are welcome
    model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))

    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    config._attn_implementation = SEGMENTED_SDPA
    windowed = AutoModelForCausalLM.from_config(config)
    windowed.config.use_cache = False
    with pytest.raises(ValueError, match="attend over only 4 tokens while a conversation here has 6.*sdpa"):
        windowed(input_ids=torch.arange(6)[None] + 3, position_ids=torch.arange(6)[None])
    windowed(input_ids=torch.arange(8)[None] + 3, position_ids=torch.arange(4).repeat(2)[None])  # 2 x 4: fits


def test_auto_is_segmented_sdpa_on_cpu_only_and_keeps_the_sdpa_fingerprint():
    assert LoraTrainingSettings().resolved_attn_implementation("cpu") == SEGMENTED_SDPA
    assert LoraTrainingSettings().resolved_attn_implementation("cuda") == "sdpa"  # not yet measured on a GPU
    assert LoraTrainingSettings(compile_model=True).resolved_attn_implementation("cpu") == "sdpa"
    assert LoraTrainingSettings(attn_implementation="sdpa").resolved_attn_implementation("cpu") == "sdpa"
    with pytest.raises(ValueError, match="compile_model with attn_implementation segmented_sdpa recompiles"):
        LoraTrainingSettings(compile_model=True, attn_implementation=SEGMENTED_SDPA)
    # Same SDPA maths: runs started before segmented_sdpa existed (default "sdpa") still resume.
    fingerprints = {
        LoraTrainingSettings(attn_implementation=a).fingerprint("data") for a in ("auto", "sdpa", SEGMENTED_SDPA)
    }
    assert len(fingerprints) == 1
    assert LoraTrainingSettings(attn_implementation="eager").fingerprint("data") not in fingerprints


def test_models_it_does_not_implement_fall_back_to_sdpa_under_auto_and_are_refused_when_asked_for(tmp_path):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from pixtrain_dagster.core.attention import segmented_sdpa_misfit
    from pixtrain_dagster.core.training import _attention_for

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert segmented_sdpa_misfit(LlamaConfig(**small), 256) is None
    assert segmented_sdpa_misfit(Qwen2Config(**small, use_sliding_window=False, sliding_window=16), 256) is None
    assert segmented_sdpa_misfit(MistralConfig(**small, sliding_window=4096), 256) is None  # window > any row
    assert "sliding-window attention over 16 tokens" in segmented_sdpa_misfit(
        MistralConfig(**small, sliding_window=16), 256
    )
    # Mistral applies its window whatever layer_types says: the window counts (one rule: full_attention_within).
    full_types = ["full_attention"] * small["num_hidden_layers"]
    assert "sliding-window" in segmented_sdpa_misfit(
        MistralConfig(**small, sliding_window=16, layer_types=full_types), 256
    )
    assert "soft-capping" in segmented_sdpa_misfit(Gemma2Config(**small, head_dim=8), 256)

    MistralConfig(**small, sliding_window=16).save_pretrained(tmp_path)
    assert _attention_for(tmp_path, LoraTrainingSettings(max_seq_len=256), "cpu") == "sdpa"
    with pytest.raises(ValueError, match="does not implement this model's sliding-window.*auto or sdpa"):
        _attention_for(tmp_path, LoraTrainingSettings(max_seq_len=256, attn_implementation=SEGMENTED_SDPA), "cpu")
    LlamaConfig(**small).save_pretrained(tmp_path)
    assert _attention_for(tmp_path, LoraTrainingSettings(), "cpu") == SEGMENTED_SDPA


def test_the_kernel_alone_equals_per_conversation_sdpa_and_refuses_what_would_leak():
    import torch.nn.functional as F

    from pixtrain_dagster.core.attention import segmented_sdpa_attention

    class Module(torch.nn.Module):
        pass

    module = Module().eval()
    torch.manual_seed(0)
    # 2 rows of 6: [3, 3] and [4, 2]; 4 query heads over 2 KV heads; values wider than queries (as in MLA models).
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 16)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])
    out, _ = segmented_sdpa_attention(module, query, key, value, None, position_ids=positions)
    assert out.shape == (2, 6, 4, 16)
    for row, cuts in ((0, [(0, 3), (3, 6)]), (1, [(0, 4), (4, 6)])):
        for a, b in cuts:
            expected = F.scaled_dot_product_attention(
                query[row : row + 1, :, a:b],
                key[row : row + 1, :, a:b].repeat_interleave(2, dim=1),
                value[row : row + 1, :, a:b].repeat_interleave(2, dim=1),
                is_causal=True,
            )
            torch.testing.assert_close(out[row, a:b], expected[0].transpose(0, 1))

    with pytest.raises(ValueError, match="not an attention mask"):
        segmented_sdpa_attention(module, query, key, value, torch.zeros(2, 1, 6, 6), position_ids=positions)
    # Positions that run on from one row into the next would let row 2 see row 1.
    with pytest.raises(ValueError, match="do not tile 2 rows of 6 positions with every row starting at position 0"):
        segmented_sdpa_attention(module, query, key, value, None, position_ids=torch.arange(12).view(2, 6))
    with pytest.raises(ValueError, match="do not tile"):
        segmented_sdpa_attention(module, query, key, value, None, segment_lengths=[4, 4, 4])


def test_the_cuda_varlen_branch_lays_out_segments_as_the_kernel_expects(monkeypatch):
    """The varlen kernel itself is CUDA-only (tests/test_gpu_only.py); here a reference with its documented contract
    ((total, heads, dim) tensors, cumulative int32 offsets, window (-1, 0) = causal) stands in for it on CPU, so the
    flattening, offsets and reshaping around it are checked against the per-conversation loop."""
    import torch.nn.attention.varlen as varlen
    import torch.nn.functional as F

    from pixtrain_dagster.core import attention

    seen = {}

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False, **_):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        seen.update(window=window_size, gqa=enable_gqa, offsets=cu_q.tolist(), longest=max_q, bounds=cu_q)
        outs = []
        for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:], strict=False):
            outs.append(
                F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1)[None],
                    k[a:b].transpose(0, 1)[None],
                    v[a:b].transpose(0, 1)[None],
                    is_causal=window_size == (-1, 0),
                    scale=scale,
                    enable_gqa=enable_gqa,
                )[0].transpose(0, 1)
            )
        return torch.cat(outs)

    monkeypatch.setattr(varlen, "varlen_attn", reference)
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])
    module = torch.nn.Module().eval()
    looped, _ = attention.segmented_sdpa_attention(module, query, key, value, None, position_ids=positions, scaling=0.3)
    monkeypatch.setattr(attention, "_varlen_kernel_applies", lambda *args: True)
    flat, _ = attention.segmented_sdpa_attention(module, query, key, value, None, position_ids=positions, scaling=0.3)
    assert {k: v for k, v in seen.items() if k != "bounds"} == {
        "window": (-1, 0),
        "gqa": True,
        "offsets": [0, 3, 6, 10, 12],
        "longest": 4,
    }
    torch.testing.assert_close(flat, looped)
    # With the batch's offsets already on the device (collate's segment_bounds), the kernel gets that very tensor.
    bounds = torch.tensor([0, 3, 6, 10, 12], dtype=torch.int32)
    again, _ = attention.segmented_sdpa_attention(
        module, query, key, value, None, segment_lengths=[3, 3, 4, 2], segment_bounds=bounds, scaling=0.3
    )
    assert seen["bounds"] is bounds
    torch.testing.assert_close(again, looped)


def test_the_varlen_branch_needs_a_torch_whose_kernel_takes_a_window_and_grouped_heads():
    """Older torch builds have torch.nn.attention.varlen without window_size (so no causal mask) or enable_gqa:
    segmented_sdpa then takes its per-conversation loop instead of failing with a TypeError mid-training."""
    from pixtrain_dagster.core.attention import varlen_attn_takes

    def before_windows(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None): ...

    def before_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)): ...

    assert not varlen_attn_takes(needs_gqa=False, varlen_attn=before_windows)
    assert varlen_attn_takes(needs_gqa=False, varlen_attn=before_gqa)
    assert not varlen_attn_takes(needs_gqa=True, varlen_attn=before_gqa)
    assert varlen_attn_takes(needs_gqa=True)  # the torch pinned here (2.13)


def test_auto_follows_the_device_that_trains_not_the_one_that_loads(tiny_model_dir):
    """FSDP loads the base on the CPU and trains on GPUs: auto must choose for the GPU."""
    from pixtrain_dagster.core.training import _setup_model

    settings = LoraTrainingSettings(max_seq_len=64)
    on_cpu, _ = _setup_model(tiny_model_dir, settings, "cpu", "32-true")
    for_gpu, _ = _setup_model(tiny_model_dir, settings, "cpu", "32-true", compute_device="cuda")
    assert on_cpu.get_base_model().config._attn_implementation == SEGMENTED_SDPA
    assert for_gpu.get_base_model().config._attn_implementation == "sdpa"
