"""The GPU recipe, run on CPU: bf16-mixed autocast over a bf16 frozen base with fp32 LoRA weights, fused AdamW,
gradient clipping, exact resume; and the correctness pieces it relies on (loss normalisation per optimizer step,
chunked loss, padding-free batches, activation checkpointing, all-linear targets).

Branches only CUDA can take are in tests/test_gpu_only.py, each with its reason.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.checkpoints import latest_valid_checkpoint
from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings
from pixtrain_dagster.core.training import train_lora_adapter

from support import SAMPLE_DATASET, tiny_training_settings

GPU_RECIPE = tiny_training_settings(
    max_steps=4,
    seed=5,
    precision="bf16-mixed",
    gradient_clip_norm=0.05,
)
RUNTIME = RuntimeSettings(device="cpu", wandb_mode="disabled")


@pytest.fixture(scope="module")
def conversations():
    rows = load_conversations(SAMPLE_DATASET)
    return rows[:24], rows[40:44]


def train(store, tiny_model_dir, conversations, settings=GPU_RECIPE, **kwargs):
    train_rows, validation_rows = conversations
    return train_lora_adapter(
        store=store,
        base_snapshot_dir=tiny_model_dir,
        base_model_sha256="base",
        dataset_sha256="data",
        train_conversations=train_rows,
        validation_conversations=validation_rows,
        runtime=RUNTIME,
        base_model_name="models/tiny-llama",
        settings=settings,
        **kwargs,
    )


class RecipeProbe(L.Callback):
    """Records what the recipe really does: dtypes, autocast, optimizer, and gradient norms after clipping."""

    def __init__(self):
        self.seen: dict = {"clipped_norms": []}

    def on_train_start(self, trainer, pl_module):
        model = pl_module.model
        self.seen["precision"] = trainer.precision
        self.seen["frozen_dtypes"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        self.seen["trainable_dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
        self.seen["fused"] = trainer.optimizers[0].defaults.get("fused")
        layer = model.get_base_model().get_decoder().layers[0].self_attn.q_proj.base_layer

        def record(module, inputs, output):
            self.seen["autocast"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
            self.seen["matmul_dtype"] = output.dtype

        self.hook = layer.register_forward_hook(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.model.parameters() if p.requires_grad and p.grad is not None]
        if grads and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.seen["clipped_norms"].append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            )

    def on_train_end(self, trainer, pl_module):
        self.hook.remove()


class CrashAfterStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash after step {self.step}")


def test_the_gpu_recipe_trains_resumes_and_publishes_on_cpu(tmp_path, tiny_model_dir, conversations):
    probe = RecipeProbe()
    uninterrupted = train(ArtifactStore(tmp_path / "a"), tiny_model_dir, conversations, extra_callbacks=[probe])
    seen = probe.seen
    assert uninterrupted.precision == "bf16-mixed" and seen["precision"] == "bf16-mixed"
    assert seen["frozen_dtypes"] == {torch.bfloat16}  # the base was loaded in bf16, not converted from fp32
    assert seen["trainable_dtypes"] == {torch.float32}  # LoRA weights and their optimizer state stay fp32
    assert seen["fused"] is True
    assert seen["autocast"] == torch.bfloat16 and seen["matmul_dtype"] == torch.bfloat16
    # Clipping happened (this was the crash): gradients were larger than the limit, and after clipping they are not.
    assert max(uninterrupted.summary()["train_losses"]) > 0 and len(uninterrupted.train_losses) == 4
    assert len(seen["clipped_norms"]) == 4 and all(n <= 0.05 * 1.01 for n in seen["clipped_norms"])
    assert all(torch.isfinite(torch.tensor(uninterrupted.train_losses)))

    store = ArtifactStore(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash after step 3"):
        train(store, tiny_model_dir, conversations, extra_callbacks=[CrashAfterStep(3)])
    assert latest_valid_checkpoint(store, uninterrupted.fingerprint).endswith("step-000002")
    resumed = train(store, tiny_model_dir, conversations)
    assert resumed.resumed_from_step == 2 and resumed.final_step == 4
    assert resumed.train_losses == uninterrupted.train_losses  # bit-for-bit, in bf16 autocast too
    assert resumed.adapter.sha256 == uninterrupted.adapter.sha256
    weights = load_file(Path(resumed.adapter.uri) / "adapter_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_bf16_true_trains_everything_in_bf16(tmp_path, tiny_model_dir, conversations):
    probe = RecipeProbe()
    settings = LoraTrainingSettings(**{**GPU_RECIPE.__dict__, "precision": "bf16-true", "max_steps": 2})
    result = train(
        ArtifactStore(tmp_path / "s"), tiny_model_dir, conversations, settings=settings, extra_callbacks=[probe]
    )
    assert probe.seen["frozen_dtypes"] == probe.seen["trainable_dtypes"] == {torch.bfloat16}
    assert result.precision == "bf16-true" and len(result.train_losses) == 2
    assert all(torch.isfinite(torch.tensor(result.train_losses)))


def test_throughput_and_data_are_reported(tmp_path, tiny_model_dir, conversations):
    settings = LoraTrainingSettings(**{**GPU_RECIPE.__dict__, "precision": "32-true", "max_seq_len": 160})
    result = train(ArtifactStore(tmp_path / "t"), tiny_model_dir, conversations, settings=settings)
    assert result.tokens_per_second > 0 and 0 < result.padding_efficiency <= 1
    assert result.peak_memory_bytes > 10 * 2**20  # peak RSS of this process on CPU
    assert result.data_wait_seconds >= 0
    counts = result.conversations
    assert counts["conversations"] == 24 and counts["kept"] + counts["dropped_too_long"] == 24
    assert counts["truncated"] > 0 and counts["dropped_too_long"] > 0  # the tiny tokenizer makes long sequences


def test_an_optimizer_step_weighs_every_labelled_token_the_same_however_it_is_split(tiny_model_dir):
    """4 micro-batches x 1 row and 1 micro-batch x 4 rows give the same gradients, though the rows' assistant token
    counts differ several-fold (a mean of per-micro-batch means would weight the short replies' tokens up)."""
    from transformers import AutoTokenizer

    from pixtrain_dagster.core.lightning_module import LoraFineTuning
    from pixtrain_dagster.core.tokenization import StepIndexedBatches, pack_rows, tokenize_conversations
    from pixtrain_dagster.core.training import _setup_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    replies = [
        "Fine.",
        "I do not know what to say about that, it has been a long and tiring month at work and home.",
        "Maybe.",
        "It started when I moved to a new city and lost touch with almost everyone I knew before.",
    ]
    conversations = [
        [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": r}] for r in replies
    ]
    rows = pack_rows(tokenize_conversations(tokenizer, conversations, 128).conversations, 128, pack=False)
    counts = sorted(row.loss_tokens for row in rows)
    assert counts[-1] >= 4 * counts[0]

    def gradients(micro_batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        settings = LoraTrainingSettings(
            max_steps=1,
            micro_batch_size=micro_batch_size,
            gradient_accumulation_steps=accumulation,
            max_seq_len=128,
            lora_dropout=0.0,
            precision="32-true",
            seed=3,
            pack_sequences=False,
        )
        torch.manual_seed(0)
        model, _ = _setup_model(tiny_model_dir, settings, "cpu", "32-true")
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero B, so lora_A gets gradients too
                torch.nn.init.normal_(param, std=0.02)
        batches = StepIndexedBatches(
            rows, micro_batch_size, settings.seed, tokenizer.pad_token_id, accumulation=accumulation
        )
        module = LoraFineTuning(model, settings, batches, [])
        captured = {}

        class Capture(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                captured.update({n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.requires_grad})

        L.Trainer(
            accelerator="cpu",
            max_steps=1,
            accumulate_grad_batches=accumulation,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[Capture()],
        ).fit(module)
        return captured

    split, whole = gradients(1, 4), gradients(4, 1)
    assert set(split) == set(whole) and split
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-5, rtol=1e-4)


def test_chunked_loss_equals_the_whole_loss_in_value_and_gradient(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pixtrain_dagster.core.loss import summed_token_loss
    from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = pack_rows(
        tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:6], 256).conversations, 256, pack=True
    )
    batch = collate(rows, tokenizer.pad_token_id)
    results = []
    for chunk in (8, 100_000):
        model.zero_grad()
        loss, tokens = summed_token_loss(model, batch, chunk_tokens=chunk)
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone(), int(tokens)))
    assert results[0][2] == batch["label_tokens"] > 8 * 4  # several chunks
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_padding_free_flat_batches_give_the_same_loss_as_padded_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pixtrain_dagster.core.loss import summed_token_loss
    from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    rows = pack_rows(
        tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:5], 256).conversations, 256, pack=False
    )
    padded, flat = collate(rows, tokenizer.pad_token_id), collate(rows, tokenizer.pad_token_id, flatten=True)
    assert flat["input_ids"].shape == (1, padded["real_tokens"]) and padded["input_ids"].numel() > flat["real_tokens"]
    with torch.no_grad():
        padded_loss, padded_tokens = summed_token_loss(model, padded)
        flat_loss, flat_tokens = summed_token_loss(model, flat)
    assert padded_tokens == flat_tokens == padded["label_tokens"]
    torch.testing.assert_close(flat_loss, padded_loss, rtol=1e-5, atol=1e-4)


def test_activation_checkpointing_and_all_linear_targets_train_the_same_numbers(
    tmp_path, tiny_model_dir, conversations
):
    base = LoraTrainingSettings(
        **{
            **GPU_RECIPE.__dict__,
            "precision": "32-true",
            "max_steps": 2,
            "lora_target_modules": ("all-linear",),
            "lora_dropout": 0.1,
        }
    )
    plain = train(ArtifactStore(tmp_path / "p"), tiny_model_dir, conversations, settings=base)
    checkpointed = train(
        ArtifactStore(tmp_path / "c"),
        tiny_model_dir,
        conversations,
        settings=LoraTrainingSettings(**{**base.__dict__, "gradient_checkpointing": True}),
    )
    assert checkpointed.fingerprint == plain.fingerprint  # memory for compute: same run identity
    assert checkpointed.train_losses == pytest.approx(plain.train_losses, abs=1e-6)
    weights = load_file(Path(plain.adapter.uri) / "adapter_model.safetensors")
    targeted = {name.split(".")[-3] for name in weights if "lora_A" in name}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targeted
    for name, value in load_file(Path(checkpointed.adapter.uri) / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, weights[name], atol=1e-6, rtol=1e-5)


def test_compiled_decoder_layers_train(tmp_path, tiny_model_dir, conversations):
    # aot_eager runs Dynamo's tracing and AOT autograd of the PEFT layers (where compilation breaks) without
    # Inductor's C++ code generation, which takes minutes on 2 CPU cores.
    settings = LoraTrainingSettings(
        **{
            **GPU_RECIPE.__dict__,
            "precision": "32-true",
            "max_steps": 1,
            "gradient_accumulation_steps": 1,
            "compile_model": True,
            "compile_backend": "aot_eager",
        }
    )
    compiled = train(ArtifactStore(tmp_path / "x"), tiny_model_dir, conversations, settings=settings)
    eager = train(
        ArtifactStore(tmp_path / "e"),
        tiny_model_dir,
        conversations,
        settings=LoraTrainingSettings(**{**settings.__dict__, "compile_model": False}),
    )
    assert compiled.train_losses == pytest.approx(eager.train_losses, rel=1e-3)
    # In-place compilation keeps the parameter names, so the adapter is an ordinary PEFT adapter.
    assert set(load_file(Path(compiled.adapter.uri) / "adapter_model.safetensors")) == set(
        load_file(Path(eager.adapter.uri) / "adapter_model.safetensors")
    )


def test_liger_kernel_and_unknown_settings_fail_clearly_on_cpu(tmp_path, tiny_model_dir, conversations):
    settings = LoraTrainingSettings(**{**GPU_RECIPE.__dict__, "use_liger_kernel": True})
    with pytest.raises(ValueError, match="use_liger_kernel needs a CUDA GPU"):
        train(ArtifactStore(tmp_path / "l"), tiny_model_dir, conversations, settings=settings)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16-mixed, bf16-true, 32-true"):
        LoraTrainingSettings(precision="16-mixed")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        LoraTrainingSettings(attn_implementation="fast")
    with pytest.raises(ValueError, match="all-linear"):
        LoraTrainingSettings(lora_target_modules=("all-linear", "q_proj"))
    settings = LoraTrainingSettings(**{**GPU_RECIPE.__dict__, "attn_implementation": "flash_attention_2"})
    with pytest.raises(ValueError, match="attn_implementation 'flash_attention_2' is not available here"):
        train(ArtifactStore(tmp_path / "f"), tiny_model_dir, conversations, settings=settings)


def test_liger_kernels_are_applied_for_any_cuda_device_name(monkeypatch):
    """Lightning names the device cuda:0, and FSDP loads on the CPU to train on CUDA: the check is on the compute
    device's type. Past it, what is left on this machine is the missing package (Liger needs Triton and a GPU)."""
    import sys

    from pixtrain_dagster.core.training import _apply_liger_kernels

    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # not installed, whatever this venv has
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match="liger-kernel package is not installed"):
            _apply_liger_kernels(torch.nn.Linear(1, 1), device)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        _apply_liger_kernels(torch.nn.Linear(1, 1), "cpu")


def test_kernel_building_options_say_what_is_missing_before_loading_the_model(monkeypatch, tmp_path):
    """compile_model (Inductor) and use_liger_kernel (Triton) compile kernels when training starts: without a
    compiler in the pod they are refused up front, naming the setting, what is missing and the image build arg."""
    from pixtrain_dagster.core.training import _check_kernel_toolchain

    compiled = LoraTrainingSettings(compile_model=True)
    liger = LoraTrainingSettings(use_liger_kernel=True)
    _check_kernel_toolchain(compiled, "cpu")  # this machine has a C++ compiler: CI compiles on CPU
    _check_kernel_toolchain(LoraTrainingSettings(), "cuda:0")  # nothing to build
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler anywhere
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match=r"compile_model build kernels .* need a C\+\+ compiler \(c\+\+ / g\+\+"):
        _check_kernel_toolchain(compiled, "cpu")
    with pytest.raises(ValueError, match=r"use_liger_kernel build kernels .* need a C compiler .*TRITON_TOOLCHAIN"):
        _check_kernel_toolchain(liger, "cuda:0")
    _check_kernel_toolchain(liger, "cpu")  # refused on CPU for its own reason (test above)


def test_a_pod_given_a_gpu_refuses_to_fall_back_to_the_cpu(monkeypatch):
    """GPU step and TrainJob pods set PIXTRAIN_REQUIRE_GPU=1 (tests/k8s): there, device auto without usable CUDA (no
    nvidia runtime, a driver fault) stops with the reason instead of training in fp32 on the pod's CPUs for hours
    and publishing figures no GPU run can be compared with. An explicit cpu still runs on the CPU."""
    from pixtrain_dagster.core.models import pick_device
    from pixtrain_dagster.core.settings import REQUIRE_GPU_ENV

    assert not torch.cuda.is_available()
    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
    assert pick_device("auto") == "cpu"
    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    with pytest.raises(
        RuntimeError, match=r"given a GPU \(PIXTRAIN_REQUIRE_GPU=1\) but CUDA is not usable here: torch"
    ):
        pick_device("auto")
    assert pick_device("cpu") == "cpu"


@pytest.mark.parametrize(
    ("attn_implementation", "flat"),
    [("flash_attention_2", True), ("kernels-community/flash-attn", True), ("sdpa", False), ("segmented_sdpa", False)],
)
def test_flash_kernels_hub_ones_included_train_on_one_flat_row(
    tiny_model_dir, conversations, attn_implementation, flat
):
    """A flash kernel given several rows and no cu_seqlens runs one causal kernel across the conversations of a packed
    row (transformers finds packing from position ids only in a batch of one row): every flash kernel, a hub one
    too, gets the packed micro-batch as one flat row, and the batch's cu_seqlens (tests/test_host_sync.py)."""
    from transformers import AutoTokenizer

    from pixtrain_dagster.core.training import _setup_data

    settings = LoraTrainingSettings(
        **{**GPU_RECIPE.__dict__, "attn_implementation": attn_implementation, "micro_batch_size": 4}
    )
    data = _setup_data(AutoTokenizer.from_pretrained(tiny_model_dir), settings, *conversations)
    rows, width = data.train.batch(0)["input_ids"].shape
    assert (rows, width == data.train.batch(0)["real_tokens"]) == ((1, True) if flat else (4, False))


def test_the_gpu_recipe_through_dagster(pipeline_env, tiny_model_dir):
    """The lora_training step as Dagster runs it, with the GPU recipe's settings, on CPU; then resumes through
    Dagster with nothing left to train."""
    from support import TRAINING_ASSETS, materialized_metadata, run_job, tiny_run_config

    config = tiny_run_config(tiny_model_dir, precision="bf16-mixed", gradient_clip_norm=0.05, max_steps=2)
    results = [run_job(config, TRAINING_ASSETS) for _ in range(2)]
    assert all(result.success for result in results)
    metadata = [materialized_metadata(result, "lora_adapter") for result in results]
    first, again = metadata
    assert first["precision"] == "bf16-mixed" and first["steps_this_run"] == 2 and first["tokens_per_second"] > 0
    assert 0 < first["padding_efficiency"] <= 1 and first["peak_memory_gib"] > 0
    assert first["conversations"]["kept"] > 0
    assert again["resumed_from_step"] == 2 and again["steps_this_run"] == 0 and again["sha256"] == first["sha256"]


def test_mfu_follows_the_lora_flops_formula_for_the_trained_data(tiny_model_dir):
    """MFU is reported only where a device peak is known (GPUs); its arithmetic is checked here with a given peak."""
    from pixtrain_dagster.core.throughput import lora_flops_per_token, segment_attention_length
    from pixtrain_dagster.core.training import _mfu_function, _setup_data, _setup_model

    settings = LoraTrainingSettings(max_seq_len=256, precision="32-true")
    model, tokenizer = _setup_model(tiny_model_dir, settings, "cpu", "32-true")
    rows = load_conversations(SAMPLE_DATASET)
    data = _setup_data(tokenizer, settings, rows[:20], rows[40:42])
    assert _mfu_function(model, data, None, 1)(1000.0) is None  # CPU: no peak, no MFU
    kept = [c for c in data.train.rows for c in c.segments]
    lengths = [len(c.input_ids) for c in kept]
    assert data.attention_length == pytest.approx(segment_attention_length(lengths))
    assert data.head_fraction == pytest.approx(sum(c.loss_tokens for c in kept) / sum(lengths))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = lora_flops_per_token(model.get_base_model().config, trainable, data.attention_length, data.head_fraction)
    assert _mfu_function(model, data, 989e12, 2)(5000.0) == pytest.approx(5000.0 * flops / (2 * 989e12))
