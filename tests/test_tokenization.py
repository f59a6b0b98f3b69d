"""Chat tokenisation: loss only on assistant tokens; packing changes nothing about each token's loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pixtrain_dagster.core.tokenization import (
    IGNORE_INDEX,
    ChatTemplateError,
    Row,
    StepIndexedBatches,
    collate,
    pack_rows,
    tokenize_conversation,
    tokenize_conversations,
)


def token_losses(logits, labels):
    """Reference: per-token next-token loss from the full logits, written independently of the core."""
    import torch.nn.functional as F

    shifted_logits, shifted_labels = logits[:, :-1, :].float(), labels[:, 1:]
    losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    return losses, shifted_labels != IGNORE_INDEX


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are Dana, a client."},
        {"role": "user", "content": "How was your week?"},
        {"role": "assistant", "content": "Honestly, pretty rough at work."},
        {"role": "user", "content": "What made it rough?"},
        {"role": "assistant", "content": "Deadlines, and my manager keeps adding more."},
    ],
    [
        {"role": "user", "content": "What brings you in today?"},
        {"role": "assistant", "content": "I can't sleep and I worry all the time."},
    ],
    [
        {"role": "system", "content": "You are Sam."},
        {"role": "user", "content": "Tell me about your family."},
        {"role": "assistant", "content": "We argue a lot since my dad got sick."},
    ],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.eval(), tokenizer


def test_only_assistant_tokens_carry_labels(tiny):
    _, tokenizer = tiny
    conversation = CONVERSATIONS[0]
    tokenized = tokenize_conversation(tokenizer, conversation, max_seq_len=512)
    labelled = [t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != IGNORE_INDEX]
    # Exactly the assistant contents, each followed by its end-of-turn marker, in order.
    expected = "".join(m["content"] + "<|im_end|>\n" for m in conversation if m["role"] == "assistant")
    assert tokenizer.decode(labelled) == expected
    for message in conversation:
        if message["role"] != "assistant":
            assert message["content"] not in tokenizer.decode(labelled)


def test_truncation_keeps_the_system_prompt_and_the_newest_whole_turns(tiny):
    _, tokenizer = tiny
    conversation = CONVERSATIONS[0]
    full = tokenize_conversation(tokenizer, conversation, max_seq_len=512)
    newest = [conversation[0], *conversation[3:]]  # system + the last exchange
    expected = tokenize_conversation(tokenizer, newest, max_seq_len=512)
    assert len(expected.input_ids) < len(full.input_ids)
    cut = tokenize_conversation(tokenizer, conversation, max_seq_len=len(full.input_ids) - 1)
    assert cut.truncated and cut.dropped_turns == 2 and not full.truncated
    assert cut.input_ids == expected.input_ids and cut.labels == expected.labels
    # The last client reply is what we train: it is still labelled.
    pairs = zip(cut.input_ids, cut.labels, strict=True)
    labelled = tokenizer.decode([t for t, label in pairs if label != IGNORE_INDEX])
    assert labelled == conversation[-1]["content"] + "<|im_end|>\n"
    # Too long even as system prompt + last exchange: dropped, and counted.
    assert tokenize_conversation(tokenizer, conversation, max_seq_len=len(expected.input_ids) - 1) is None
    counted = tokenize_conversations(tokenizer, CONVERSATIONS, max_seq_len=len(full.input_ids) - 1)
    assert counted.counts() == {"conversations": 3, "kept": 3, "truncated": 1, "dropped_too_long": 0}
    counted = tokenize_conversations(tokenizer, CONVERSATIONS, max_seq_len=len(expected.input_ids) - 1)
    assert counted.dropped_too_long >= 1 and counted.truncated == 0


def test_packing_respects_row_length_and_restarts_positions(tiny):
    _, tokenizer = tiny
    tokenized = [tokenize_conversation(tokenizer, c, 512) for c in CONVERSATIONS]
    longest = max(len(t.input_ids) for t in tokenized)
    rows = pack_rows(tokenized, max_seq_len=longest * 2, pack=True)
    assert len(rows) < len(tokenized) and all(r.length <= longest * 2 for r in rows)
    assert sorted(id(s) for r in rows for s in r.segments) == sorted(id(t) for t in tokenized)
    batch = collate(rows, tokenizer.pad_token_id)
    row = rows[0]
    starts = [0]
    for segment in row.segments[:-1]:
        starts.append(starts[-1] + len(segment.input_ids))
    for start in starts:
        assert batch["position_ids"][0, start] == 0
        assert batch["labels"][0, start] == IGNORE_INDEX  # nothing predicts across a boundary


def test_packed_and_unpacked_batches_give_the_same_per_token_loss(tiny):
    model, tokenizer = tiny
    tokenized = [tokenize_conversation(tokenizer, c, 512) for c in CONVERSATIONS]
    packed = collate([Row(tuple(tokenized))], tokenizer.pad_token_id)
    separate = collate([Row((t,)) for t in tokenized], tokenizer.pad_token_id)
    with torch.no_grad():
        packed_losses, packed_mask = token_losses(
            model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits, packed["labels"]
        )
        separate_losses, separate_mask = token_losses(
            model(input_ids=separate["input_ids"], position_ids=separate["position_ids"]).logits, separate["labels"]
        )
    packed_values = packed_losses[packed_mask]
    separate_values = torch.cat([separate_losses[i][separate_mask[i]] for i in range(len(tokenized))])
    assert packed_values.numel() == separate_values.numel() > 0
    torch.testing.assert_close(packed_values, separate_values, atol=1e-5, rtol=1e-5)

    # The check has teeth: with a KV cache the packed rows would attend across conversations.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits
    leaky_losses, _ = token_losses(leaky, packed["labels"])
    assert not torch.allclose(leaky_losses[packed_mask], separate_values, atol=1e-3)


def test_step_indexed_batches_are_a_pure_function_of_the_step(tiny):
    _, tokenizer = tiny
    rows = pack_rows([tokenize_conversation(tokenizer, c, 512) for c in CONVERSATIONS], 512, pack=False)
    batches = StepIndexedBatches(rows, micro_batch_size=2, seed=7, pad_token_id=tokenizer.pad_token_id)
    first = [b["input_ids"] for _, b in zip(range(6), batches.iterate_from(0), strict=False)]
    resumed = [b["input_ids"] for _, b in zip(range(3), batches.iterate_from(3), strict=False)]
    for a, b in zip(first[3:], resumed, strict=True):
        assert torch.equal(a, b)
    # A pass is whole micro-batches of distinct rows; the one left over goes into the next pass's shuffle.
    assert len(rows) == 3 and batches.batches_per_pass == 1
    first_pass = [id(r) for m in range(batches.batches_per_pass) for r in batches.rows_of(m)]
    assert len(first_pass) == len(set(first_pass)) == 2
    assert {id(r) for m in range(6) for r in batches.rows_of(m)} == {id(r) for r in rows}


def test_template_that_is_not_prefix_stable_is_rejected(tiny):
    _, tokenizer = tiny
    broken = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    broken.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}{{ messages|length }}"
    )
    with pytest.raises(ChatTemplateError, match="prefix"):
        tokenize_conversation(broken, CONVERSATIONS[1], 512)


def test_summed_loss_on_labelled_positions_equals_the_full_logits_loss(tiny):
    from peft import LoraConfig, get_peft_model

    from pixtrain_dagster.core.loss import summed_token_loss

    model, tokenizer = tiny
    rows = pack_rows([tokenize_conversation(tokenizer, c, 512) for c in CONVERSATIONS], 512, pack=True)
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        full_losses, full_mask = token_losses(
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits, batch["labels"]
        )
        loss_sum, tokens = summed_token_loss(model, batch)
        assert tokens == full_mask.sum()
        torch.testing.assert_close(loss_sum, (full_losses * full_mask).sum(), atol=1e-4, rtol=1e-5)
        # Also through a PEFT wrapper, as in training.
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        peft_sum, _ = summed_token_loss(peft_model, batch)
        peft_logits = peft_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        peft_losses, _ = token_losses(peft_logits, batch["labels"])
        torch.testing.assert_close(peft_sum, (peft_losses * full_mask).sum(), atol=1e-4, rtol=1e-5)
        peft_model.unload()
