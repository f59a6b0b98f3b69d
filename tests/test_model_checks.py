"""What the recipe assumes about a model is checked at load: output transforms, packing isolation, end-of-turn
tokens; and packing itself (first-fit-decreasing in O(n log n), the same rows as the quadratic original)."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pixtrain_dagster.core import loss as loss_module
from pixtrain_dagster.core.loss import summed_token_loss
from pixtrain_dagster.core.model_checks import UnsupportedModelError, verify_loss_path, verify_packing_isolation
from pixtrain_dagster.core.tokenization import IGNORE_INDEX, TokenizedConversation, pack_rows


def tiny_config(kind: str):
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "gemma2":  # logit soft-capping (small cap so it bites on a random model)
        return Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5, attn_implementation="eager")
    if kind == "cohere":  # logits multiplied by logit_scale
        return CohereConfig(**common, logit_scale=0.25)
    return GraniteConfig(**common, logits_scaling=4.0)  # logits divided by logits_scaling


def full_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_the_loss_applies_the_models_own_output_transform(kind, monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # logits of a trained model's size, so the transforms matter
    ids = torch.randint(3, 97, (2, 16))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16).expand(2, -1)}
    with torch.no_grad():
        ours, _ = summed_token_loss(model, batch)
        torch.testing.assert_close(ours, full_logits_loss(model, batch), rtol=1e-5, atol=1e-4)
        assert verify_loss_path(model) < 1e-4

        # Without the transform the loss path would train on different logits, and the load check refuses it.
        monkeypatch.setattr(loss_module, "output_transform", lambda config: None)
        assert not torch.allclose(summed_token_loss(model, batch)[0], full_logits_loss(model, batch), rtol=1e-3)
        with pytest.raises(
            UnsupportedModelError, match=f"model type '{model.config.model_type}' transforms its logits"
        ):
            verify_loss_path(model)


def test_packing_isolation_is_checked_and_a_leaky_attention_is_refused(tiny_model_dir):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert verify_packing_isolation(model, "sdpa") < 1e-4

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        # A kernel that ignores the block-diagonal mask: packed conversations see each other.
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("pixtrain_test_causal_only", causal_only)
    leaky = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="pixtrain_test_causal_only")
    with pytest.raises(UnsupportedModelError, match="packed conversations attend to each other.*pack_sequences: false"):
        verify_packing_isolation(leaky, "pixtrain_test_causal_only")


def test_generation_stops_at_the_chat_templates_end_of_turn_token(tiny_model_dir):
    """A model whose EOS differs from its end-of-turn token (common: <|endoftext|> vs <|im_end|>) must stop at the
    end of its turn; with EOS alone it would run to max_new_tokens."""
    from pixtrain_dagster.core.evaluation import generate_reply
    from pixtrain_dagster.core.models import end_of_turn_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.eos_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_ids(tokenizer, model) == sorted({tokenizer.eos_token_id, end_of_turn})

    # Rig the output layer so the model always says <|im_end|>; count forward passes.
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_of_turn] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.model.norm.register_forward_hook(lambda m, i, o: torch.ones_like(o))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    generate_reply(model, tokenizer, [{"role": "user", "content": "How are you?"}], max_new_tokens=20)
    assert len(calls) == 1  # the first generated token ended the turn


def test_sample_replies_are_never_compiled_even_where_the_generation_config_asks_for_a_static_cache(tiny_model_dir):
    """Gemma 2/3 ship generation configs naming a static-shaped (hybrid) cache, and on a GPU transformers then
    compiles the forward pass inside generate (Inductor and Triton: minutes, and a C compiler at run time) for
    a few short sample replies. The same criteria apply on CPU once the compile config allows every device,
    which is how this test reaches them."""
    from transformers import CompileConfig, StaticCache

    from pixtrain_dagster.core.evaluation import generate_reply

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = CompileConfig()
    model.generation_config.compile_config._compile_all_devices = True
    cache = StaticCache(config=model.config, max_cache_len=16)
    assert model._valid_auto_compile_criteria({"cache": cache}, model.generation_config), "as on a GPU"

    def compile_requested(*args, **kwargs):
        raise AssertionError("generate compiled the model")

    model.get_compiled_call = compile_requested
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "How are you?"}], max_new_tokens=4)
    assert isinstance(reply, str)


def naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    rows, used = [], []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        for row, room in enumerate(used):
            if room + lengths[index] <= capacity:
                rows[row].append(index)
                used[row] += lengths[index]
                break
        else:
            rows.append([index])
            used.append(lengths[index])
    return rows


def test_tree_packing_gives_exactly_the_rows_of_first_fit_decreasing():
    rng = random.Random(4)
    for capacity, count in ((64, 300), (512, 2000), (4096, 1000)):
        lengths = [
            rng.randint(2, capacity) if rng.random() < 0.1 else rng.randint(2, capacity // 4) for _ in range(count)
        ]
        conversations = [TokenizedConversation(list(range(n)), [IGNORE_INDEX] + [1] * (n - 1)) for n in lengths]
        index_of = {id(c): i for i, c in enumerate(conversations)}
        packed = pack_rows(conversations, capacity, pack=True)
        assert [[index_of[id(s)] for s in row.segments] for row in packed] == naive_first_fit_decreasing(
            lengths, capacity
        )
        assert all(row.length <= capacity for row in packed)


def test_prefetched_batches_keep_order_and_surface_errors():
    from pixtrain_dagster.core.lightning_module import PrefetchedBatches

    def source():
        for i in range(5):
            yield {"micro_step": i, "input_ids": torch.tensor([i])}
        raise RuntimeError("batch 5 is broken")

    prefetched = PrefetchedBatches(source(), depth=2)
    assert [next(prefetched)["micro_step"] for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="batch 5 is broken"):
        next(prefetched)
    prefetched.close()

    endless = PrefetchedBatches(iter(lambda: {"micro_step": 0}, None), depth=2)
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()  # a finished run leaves no thread behind
