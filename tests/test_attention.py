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
    model = _model(tiny_model_dir, SEGMENTED_SDPA).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="padding attention mask; load the model with sdpa"):
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="no KV cache.*load the model with sdpa to generate"):
        model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=True)

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


def test_settings_pick_segmented_sdpa_unless_compiling():
    assert LoraTrainingSettings().resolved_attn_implementation == SEGMENTED_SDPA
    assert LoraTrainingSettings(compile_model=True).resolved_attn_implementation == "sdpa"
    assert LoraTrainingSettings(attn_implementation="sdpa").resolved_attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="compile_model with attn_implementation segmented_sdpa recompiles"):
        LoraTrainingSettings(compile_model=True, attn_implementation=SEGMENTED_SDPA)
