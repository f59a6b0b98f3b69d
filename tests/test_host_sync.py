"""The training loss reads nothing back from the device (docs/training.md: the loop's only host synchronisation is
reading losses at logging intervals). On a GPU every read-back stalls the host until the device catches up, so the
host cannot queue the next kernels ahead. A read-back has the same cause on CPU: an op that needs a device value on
the host (``.item()``, ``bool(tensor)``, boolean indexing, ``nonzero``). Recording those ops while the loss runs
forward and backward on CPU shows what would synchronise on CUDA."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

from pixtrain_dagster.core.attention import SEGMENTED_SDPA, register_segmented_sdpa
from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.loss import decoder_inputs, summed_token_loss
from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations

from support import SAMPLE_DATASET

# Ops whose output size or value the host needs from the device (CUDA synchronises for each).
READ_BACKS = {
    "aten._local_scalar_dense",  # .item(), bool(tensor), int(tensor)
    "aten.nonzero",
    "aten.masked_select",
    "aten.equal",
    "aten.allclose",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.bincount",
    "aten.histc",
}
# Tensor methods that copy to the host: no op on a CPU tensor, so they are watched directly.
HOST_COPIES = ("tolist", "cpu", "numpy", "item")
HOST_KEYS = ("segment_lengths", "labelled_positions", "labelled_targets")


class ReadBacks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        indices = [a for arg in args if isinstance(arg, (list, tuple)) for a in arg if isinstance(a, torch.Tensor)]
        if (
            name in READ_BACKS
            or (name.startswith("aten.index") and any(i.dtype in (torch.bool, torch.uint8) for i in indices))
            or (name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None)
        ):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _read_backs(model, batch, monkeypatch, chunk_tokens=2048) -> list[str]:
    recorder = ReadBacks()
    with monkeypatch.context() as patch:
        for method in HOST_COPIES:
            original = getattr(torch.Tensor, method)

            def watched(self, *args, _name=method, _original=original, **kwargs):
                recorder.seen.append(f"Tensor.{_name}")
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, method, watched)
        model.zero_grad()
        with recorder:
            loss, _ = summed_token_loss(model, batch, chunk_tokens)
            loss.backward()
    return recorder.seen


def _model(tiny_model_dir, attn_implementation):
    register_segmented_sdpa()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model.train()


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:8], 256).conversations
    packed = collate(pack_rows(conversations, 256, pack=True), tokenizer.pad_token_id)
    one_each = collate(pack_rows(conversations[:1], 256, pack=False), tokenizer.pad_token_id)
    assert len(packed["segment_lengths"]) > packed["input_ids"].shape[0], "packed rows with padding"
    assert len(one_each["segment_lengths"]) == one_each["input_ids"].shape[0], "one whole conversation a row"
    return {"packed": packed, "one conversation a row": one_each}


@pytest.mark.parametrize(
    ("attn_implementation", "layout", "expected"),
    [
        ("sdpa", "packed", []),
        (SEGMENTED_SDPA, "packed", []),
        (SEGMENTED_SDPA, "one conversation a row", []),
        # transformers reads the position ids back once, finds no packing, and SDPA gets its causal (flash) kernel:
        # kept on purpose (core/loss.py decoder_inputs).
        ("sdpa", "one conversation a row", ["aten._local_scalar_dense"]),
    ],
)
def test_the_training_loss_reads_nothing_back_from_the_device(
    tiny_model_dir, batches, attn_implementation, layout, expected, monkeypatch
):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tiny_model_dir, attn_implementation), LoraConfig(r=4, target_modules=["q_proj"]))
    assert _read_backs(model, batches[layout], monkeypatch) == expected
    # the chunked loss, recomputed in backward, too
    assert _read_backs(model, batches[layout], monkeypatch, chunk_tokens=16) == expected


def test_the_recorder_sees_what_used_to_synchronise(tiny_model_dir, batches, monkeypatch):
    """The same loss without the host's facts: transformers reads the position ids back to find packed rows, and
    a boolean mask selects the labelled positions (forward and backward); segmented_sdpa without the host's
    lengths reads the position ids back in every layer."""
    bare = {k: v for k, v in batches["packed"].items() if k not in HOST_KEYS}
    seen = _read_backs(_model(tiny_model_dir, "sdpa"), bare, monkeypatch)
    assert "aten._local_scalar_dense" in seen and seen.count("aten.index") >= 2 and "aten.index_put" in seen
    seen = _read_backs(_model(tiny_model_dir, SEGMENTED_SDPA), bare, monkeypatch)
    assert "aten.nonzero" in seen and "Tensor.tolist" in seen


@pytest.mark.parametrize("layout", ["packed", "one conversation a row"])
def test_sdpa_with_the_host_facts_trains_the_same_numbers_as_transformers_own_masks(tiny_model_dir, batches, layout):
    batch = batches[layout]
    bare = {k: v for k, v in batch.items() if k not in HOST_KEYS}
    results = []
    for inputs in (batch, bare):
        model = _model(tiny_model_dir, "sdpa")
        loss, count = summed_token_loss(model, inputs)
        loss.backward()
        results.append((loss.detach(), int(count), {n: p.grad for n, p in model.named_parameters()}))
    (loss, count, grads), (reference_loss, reference_count, reference_grads) = results
    assert count == reference_count == batch["label_tokens"]
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_with_a_shorter_sliding_window_keep_transformers_masks(batches):
    """One causal mask cannot serve a sliding-window layer narrower than the row: such models build their own."""
    packed = batches["packed"]
    width = packed["input_ids"].shape[1]
    config = MistralConfig(sliding_window=width // 2)
    config._attn_implementation = "sdpa"
    assert set(decoder_inputs(config, packed)) == {"position_ids"}
    # Mistral applies its window whatever layer_types says (it never reads them).
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    assert set(decoder_inputs(config, packed)) == {"position_ids"}
    config.sliding_window = width
    assert set(decoder_inputs(config, packed)) == {"position_ids", "attention_mask"}


def test_the_device_built_mask_is_the_one_transformers_builds(tiny_model_dir, batches):
    from transformers.masking_utils import create_causal_mask

    from pixtrain_dagster.core.attention import packed_causal_mask

    config = _model(tiny_model_dir, "sdpa").config
    position_ids = batches["packed"]["position_ids"]
    embeds = torch.zeros(*position_ids.shape, config.hidden_size)
    theirs = create_causal_mask(config, embeds, None, None, position_ids=position_ids)
    assert theirs.dtype == torch.bool and torch.equal(packed_causal_mask(position_ids), theirs)
