"""The branches of the training recipe that only a CUDA GPU can take, each with the reason it cannot run on CPU.

Everything else of the GPU recipe (bf16-mixed autocast, bf16 base, fp32 LoRA, fused AdamW, clipping, exact resume,
compiled layers, chunked loss, padding-free batches) runs on CPU in tests/test_gpu_recipe.py. These tests run where
a GPU is visible (the device check in bench/gpu_check.sh) and are skipped, with the reason, everywhere else.
"""

import importlib.util

import pytest
import torch

from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible")


@needs_cuda
@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None,
    reason="flash-attn is a CUDA extension: it does not build or import without the CUDA toolkit",
)
def test_varlen_flash_attention_packs_without_padding_and_isolates_conversations(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from pixtrain_dagster.core.model_checks import verify_packing_isolation

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation="flash_attention_2", device_map="cuda"
    )
    assert verify_packing_isolation(model, "flash_attention_2") >= 0


@needs_cuda
@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None,
    reason="Liger's kernels are Triton kernels: Triton compiles for CUDA/ROCm devices only",
)
def test_liger_kernels_train(tmp_path, tiny_model_dir):
    from pixtrain_dagster.core.artifacts import ArtifactStore
    from pixtrain_dagster.core.conversations import load_conversations
    from pixtrain_dagster.core.training import train_lora_adapter

    from support import SAMPLE_DATASET

    rows = load_conversations(SAMPLE_DATASET)
    result = train_lora_adapter(
        store=ArtifactStore(tmp_path),
        base_snapshot_dir=tiny_model_dir,
        base_model_sha256="b",
        dataset_sha256="d",
        train_conversations=rows[:16],
        validation_conversations=rows[40:42],
        settings=LoraTrainingSettings(max_steps=2, max_seq_len=256, use_liger_kernel=True),
        runtime=RuntimeSettings(device="cuda", wandb_mode="disabled"),
    )
    assert result.precision == "bf16-mixed" and len(result.train_losses) == 2


@needs_cuda
def test_cuda_specific_bookkeeping(tmp_path, tiny_model_dir):
    """Pinned-memory prefetch with async copies, the CUDA RNG state in checkpoints, peak memory from the CUDA
    allocator and MFU from the device's peak: none of these exist on a CPU."""
    from pixtrain_dagster.core.artifacts import ArtifactStore
    from pixtrain_dagster.core.checkpoints import latest_valid_checkpoint
    from pixtrain_dagster.core.conversations import load_conversations
    from pixtrain_dagster.core.training import train_lora_adapter

    from support import SAMPLE_DATASET

    rows = load_conversations(SAMPLE_DATASET)
    store = ArtifactStore(tmp_path)
    result = train_lora_adapter(
        store=store,
        base_snapshot_dir=tiny_model_dir,
        base_model_sha256="b",
        dataset_sha256="d",
        train_conversations=rows[:16],
        validation_conversations=rows[40:42],
        settings=LoraTrainingSettings(max_steps=2, max_seq_len=256, checkpoint_every_n_steps=1),
        runtime=RuntimeSettings(device="cuda", wandb_mode="disabled"),
    )
    assert result.device == "cuda" and result.precision == "bf16-mixed"
    assert 0 < result.peak_memory_bytes < torch.cuda.get_device_properties(0).total_memory
    state = torch.load(
        store.local_path(latest_valid_checkpoint(store, result.fingerprint)) / "checkpoint.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    assert state["pixtrain"]["rng_states_by_rank"][0]["cuda"] is not None


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="FSDP: Lightning's FSDPStrategy refuses a CPU accelerator, and sharding needs 2+ GPUs",
)
def test_fsdp_two_gpus_trains_and_resumes_on_one(tmp_path, tiny_model_dir):
    """FSDP over two GPUs (torchrun in this process's node), then the same run resumed from its full checkpoint
    with DDP on one process: checkpoints are full state dicts, so the world size may change."""
    import json
    import subprocess
    import sys
    from dataclasses import asdict, replace

    from test_distributed import SETTINGS, seeded_store

    from pixtrain_dagster.core.distributed import TrainingRequest, result_path, run

    store = seeded_store(tmp_path / "artifacts", tiny_model_dir)
    settings = replace(SETTINGS, devices=2, strategy="fsdp", precision="bf16-mixed", max_steps=4)
    request = TrainingRequest(
        str(store.root),
        str(store.root),
        "models/tiny",
        "base",
        "datasets/sample",
        "data",
        asdict(settings),
        {"device": "cuda", "wandb_mode": "disabled"},
    )
    path = tmp_path / "request.json"
    path.write_text(request.to_json())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "pixtrain_dagster.core.distributed",
            "--request",
            str(path),
        ],
        check=True,
    )
    first = json.loads(result_path(path).read_text())
    assert first["strategy"] == "fsdp" and first["world_size"] == 2
    longer = replace(settings, devices=1, strategy="auto", max_steps=4)
    path.write_text(TrainingRequest(**{**asdict(request), "settings": asdict(longer)}).to_json())
    again = run(path)
    assert again["resumed_from_step"] == 4 and again["steps_this_run"] == 0


@needs_cuda
def test_segmented_sdpa_uses_the_varlen_flash_kernel_and_equals_sdpa_with_the_mask(tiny_model_dir, monkeypatch):
    """PyTorch's varlen flash kernel (torch.nn.attention.varlen) is CUDA-only: `aten::_flash_attention_forward` has no
    CPU implementation, so on CPU segmented_sdpa takes its per-conversation SDPA loop (tests/test_attention.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pixtrain_dagster.core import attention
    from pixtrain_dagster.core.conversations import load_conversations
    from pixtrain_dagster.core.loss import summed_token_loss
    from pixtrain_dagster.core.model_checks import verify_packing_isolation
    from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations

    from support import SAMPLE_DATASET

    attention.register_segmented_sdpa()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenized = tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:12], 512)
    rows = pack_rows(tokenized.conversations, 512, pack=True)
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in collate(rows, tokenizer.pad_token_id or 0).items()}
    varlen_calls = []
    original = attention._varlen_attention
    monkeypatch.setattr(attention, "_varlen_attention", lambda *a, **k: varlen_calls.append(1) or original(*a, **k))
    results = {}
    for name in ("sdpa", attention.SEGMENTED_SDPA):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.bfloat16, attn_implementation=name, device_map="cuda"
        )
        model.config.use_cache = False
        loss, _ = summed_token_loss(model.train(), batch)
        loss.backward()
        results[name] = (loss.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float())
        if name == attention.SEGMENTED_SDPA:
            assert varlen_calls, "the varlen kernel was not used"
            assert verify_packing_isolation(model, name) >= 0
    torch.testing.assert_close(results[attention.SEGMENTED_SDPA][0], results["sdpa"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[attention.SEGMENTED_SDPA][1], results["sdpa"][1], rtol=5e-2, atol=5e-2)


@needs_cuda
@pytest.mark.parametrize("attn_implementation", ["sdpa", "segmented_sdpa"])
def test_the_training_loss_never_makes_the_host_wait_for_the_gpu(tiny_model_dir, attn_implementation):
    """`torch.cuda.set_sync_debug_mode("error")` raises on every synchronising CUDA call; it exists only on CUDA. On
    CPU, tests/test_host_sync.py records the ops that would synchronise instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pixtrain_dagster.core.attention import register_segmented_sdpa
    from pixtrain_dagster.core.conversations import load_conversations
    from pixtrain_dagster.core.loss import summed_token_loss
    from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations

    from support import SAMPLE_DATASET

    register_segmented_sdpa()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pack_rows(
        tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:12], 512).conversations, 512, pack=True
    )
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in collate(rows, tokenizer.pad_token_id or 0).items()}
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation=attn_implementation, device_map="cuda"
    )
    model.config.use_cache = False
    model.train()
    summed_token_loss(model, batch)[0].backward()  # warm-up: allocator and kernel choices may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = summed_token_loss(model, batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss.detach()).item()


@needs_cuda
@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None,
    reason="flash-attn is a CUDA extension: it does not build or import without the CUDA toolkit",
)
def test_flash_attention_with_the_batch_cu_seqlens_synchronises_at_most_once(tiny_model_dir):
    """With the batch's cu_seqlens (core/loss.py decoder_inputs), the one synchronising call left is transformers'
    packing check in its mask preparation; without them it also derives cu_seqlens in every layer. On CPU,
    tests/test_host_sync.py checks the same with flash-attn's kernels stood in for."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pixtrain_dagster.core.conversations import load_conversations
    from pixtrain_dagster.core.loss import summed_token_loss
    from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations

    from support import SAMPLE_DATASET

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pack_rows(
        tokenize_conversations(tokenizer, load_conversations(SAMPLE_DATASET)[:12], 512).conversations, 512, pack=True
    )
    flat = collate(rows, tokenizer.pad_token_id or 0, flatten=True)
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in flat.items()}
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation="flash_attention_2", device_map="cuda"
    )
    model.config.use_cache = False
    model.train()

    def synchronising_calls(inputs):
        summed_token_loss(model, inputs)[0].backward()  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                summed_token_loss(model, inputs)[0].backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    with_bounds = synchronising_calls(batch)
    without = synchronising_calls({k: v for k, v in batch.items() if k != "segment_bounds"})
    assert with_bounds <= 1 < without, (with_bounds, without)
