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


def test_collate_bounds_are_the_cu_seqlens_transformers_derives(tiny_model_dir, batches):
    """flash-attn's cu_seqlens and longest segment, which transformers otherwise derives from the position ids on
    the device in every layer, are the batch's own ``segment_bounds`` and ``max(segment_lengths)``."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:8], 256).conversations
    flat = collate(pack_rows(conversations, 256, pack=True), tokenizer.pad_token_id, flatten=True)
    for batch in (*batches.values(), flat):
        (cu_q, cu_k), (longest, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
        assert batch["segment_bounds"].dtype == cu_q.dtype == torch.int32
        assert torch.equal(batch["segment_bounds"], cu_q) and torch.equal(cu_q, cu_k)
        assert max(batch["segment_lengths"]) == int(longest)


def _flash_attn_stand_in(batch, calls):
    """flash-attn's functions as transformers imports them, on CPU: its varlen kernel computes causal attention per
    segment of the flat (tokens, heads, dim) layout. The real kernel reads cu_seqlens on the device; the stand-in
    takes the host's lengths when given the batch's own bounds, and reads other bounds back (as nothing in the
    real kernel would)."""
    import torch.nn.functional as F
    from transformers.modeling_flash_attention_utils import _lazy_define_process_function

    def attend(q, k, v, scale):  # (length, heads, dim) each
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
    ):
        assert causal and dropout_p == 0.0 and cu_seqlens_q is cu_seqlens_k
        calls.append((cu_seqlens_q is batch["segment_bounds"], type(max_seqlen_q)))
        own = cu_seqlens_q is batch["segment_bounds"]
        lengths = batch["segment_lengths"] if own else cu_seqlens_q.diff().tolist()
        pieces = zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
        return torch.cat([attend(*piece, softmax_scale) for piece in pieces])

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(("no varlen", None))
        return torch.stack([attend(*row, softmax_scale) for row in zip(q, k, v, strict=True)])

    def lazy_import_flash_attention(implementation, *args, **kwargs):
        assert implementation == "flash_attention_2"
        functions = (flash_attn_func, flash_attn_varlen_func, None, None, None)
        return functions, (_lazy_define_process_function(flash_attn_varlen_func), dict)

    return lazy_import_flash_attention


def test_flash_attention_gets_the_batch_cu_seqlens_and_reads_back_only_in_mask_preparation(
    tiny_model_dir, batches, monkeypatch
):
    """flash-attn needs CUDA, so only its kernels are stood in for on CPU; transformers' flash-attention path, the
    model, the PEFT wrapper and the loss are the real ones. Given the batch's cu_seqlens, every layer takes
    transformers' varlen branch with them (across rows and their padding), the loss and gradients equal sdpa's
    with the block-diagonal mask, and the only read-back left is transformers' packing check in its mask
    preparation, once a forward; without them transformers derives cu_seqlens from the position ids in every layer.
    """
    import transformers.modeling_flash_attention_utils as fa_utils
    from peft import LoraConfig, get_peft_model

    batch = batches["packed"]
    calls = []
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", _flash_attn_stand_in(batch, calls))

    def model_as(name):
        model = _model(tiny_model_dir, "sdpa")
        model.config._attn_implementation = name  # transformers refuses to load flash_attention_2 without CUDA
        return model

    results = {}
    for name in ("sdpa", "flash_attention_2"):
        model = model_as(name)
        loss, _ = summed_token_loss(model, batch)
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    layers = model.config.num_hidden_layers
    assert calls == [(True, int)] * layers * 1  # the forward (no recomputation: the loss is one chunk)
    torch.testing.assert_close(results["flash_attention_2"][0], results["sdpa"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flash_attention_2"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    model = get_peft_model(model_as("flash_attention_2"), LoraConfig(r=4, target_modules=["q_proj"]))
    assert _read_backs(model, batch, monkeypatch) == ["aten._local_scalar_dense"]
    # The padding-free layout training uses with flash-attn (one flat row), without the batch's facts.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:8], 256).conversations
    flat = collate(pack_rows(conversations, 256, pack=True), tokenizer.pad_token_id, flatten=True)
    calls.clear()
    seen = _read_backs(model, {k: v for k, v in flat.items() if k not in (*HOST_KEYS, "segment_bounds")}, monkeypatch)
    assert calls and all(not own for own, _ in calls)
    assert seen.count("aten.nonzero") >= layers, seen


def test_flash_kernels_get_cu_seqlens_others_their_own_inputs(batches, monkeypatch):
    """By the mask function transformers registers: flash attention's (flash_attention_2/3/4, and a hub flash kernel
    once loaded, which registers under its own name) means no mask and cu_seqlens from the batch."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask, sdpa_mask

    from pixtrain_dagster.core.loss import takes_cu_seqlens

    monkeypatch.setitem(
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "kernels-community/flash-attn", flash_attention_mask
    )
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "kernels-community/msa", sdpa_mask)
    config = MistralConfig()
    for name, takes in [
        ("flash_attention_2", True),
        ("flash_attention_3", True),
        ("kernels-community/flash-attn", True),
        ("kernels-community/msa", False),  # a hub kernel wrapped with sdpa's mask
        ("sdpa", False),
        (SEGMENTED_SDPA, False),
        ("eager", False),
        (None, False),
    ]:
        assert takes_cu_seqlens(name) is takes, name
        config._attn_implementation = name
        assert ("cu_seq_lens_q" in decoder_inputs(config, batches["packed"])) is takes, name
