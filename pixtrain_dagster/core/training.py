"""The LoRA training recipe: snapshot + curated conversations in, PEFT adapter and checkpoints out.

Checkpoints are published to the artifact store under ``checkpoints/<fingerprint>/step-NNNNNN`` where the
fingerprint covers the base model, the dataset version and every training setting. Training again with the
same fingerprint resumes from the newest complete checkpoint, so a crashed or pre-empted step loses at most
``checkpoint_every_n_steps`` steps and a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .artifacts import ArtifactRef, ArtifactStore
from .checkpoints import kill_after_checkpoint_if_requested, latest_valid_checkpoint
from .settings import LoraTrainingSettings, RuntimeSettings

log = logging.getLogger(__name__)

CheckpointHook = Callable[[int, ArtifactRef], None]


@dataclass
class TrainingResult:
    fingerprint: str
    adapter: ArtifactRef | None  # None on every process but rank 0 of a multi-process run: only rank 0 publishes
    checkpoints: list[ArtifactRef]
    resumed_from_step: int
    resumed_from_checkpoint: ArtifactRef | None
    final_step: int
    steps_this_run: int
    final_train_loss: float
    validation_loss: float | None
    train_losses: list[float]  # one per optimizer step
    tokens_per_second: float  # non-padding input tokens per second, start-up (first step) excluded
    trained_tokens: int
    wall_seconds: float
    trainable_parameters: int
    total_parameters: int
    device: str
    precision: str
    attn_implementation: str = "sdpa"
    padding_efficiency: float = 0.0  # non-padding tokens / all positions processed
    peak_memory_bytes: int = 0  # peak GPU memory allocated (CUDA), or peak resident memory of the process (CPU)
    data_wait_seconds: float = 0.0  # time the loop waited for a batch (should be ~0: batches are prefetched)
    mfu: float | None = None  # model FLOPs utilisation, when the device's peak is known
    world_size: int = 1
    strategy: str = "single"
    conversations: dict[str, int] | None = None  # train split: total, kept, truncated, dropped_too_long
    wandb_run_id: str | None = None
    wandb_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        return asdict(self)  # nested ArtifactRefs become dicts too


def checkpoint_prefix(fingerprint: str) -> str:
    return f"checkpoints/{fingerprint}"


class _Throughput:
    """Tokens per second from the end of this run's first optimizer step (compilation, warm-up and loading
    excluded) to its last; measured where the step's values were just read from the device, so the clock agrees
    with the GPU."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def mark(self, tokens: int) -> None:
        now = (time.perf_counter(), tokens)
        if self.first is None:
            self.first = now
        self.last = now

    def tokens_per_second(self) -> float | None:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])


def _make_progress_callback(
    store: ArtifactStore,
    fingerprint: str,
    settings: LoraTrainingSettings,
    published: list[ArtifactRef],
    on_checkpoint: CheckpointHook | None,
    model_flops: Callable[[float], float | None] = lambda rate: None,
):
    """The callback that publishes a checkpoint every ``checkpoint_every_n_steps`` and logs loss, throughput, MFU."""
    import lightning as L

    class ProgressAndCheckpoints(L.Callback):
        """Every ``log_every_n_steps`` optimizer steps reads the step values from the device and logs them;
        every ``checkpoint_every_n_steps`` saves a checkpoint and publishes it atomically."""

        def __init__(self) -> None:
            self.last_saved_step = -1
            self.last_seen_step = -1
            self.throughput = _Throughput()

        def on_train_start(self, trainer, pl_module) -> None:
            self.last_seen_step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step == self.last_seen_step:
                return  # still accumulating gradients for this step
            self.last_seen_step = step
            first_of_run = self.throughput.first is None
            if first_of_run or step % settings.log_every_n_steps == 0 or step == trainer.max_steps:
                self.report(trainer, pl_module)
            if step != self.last_saved_step and step % settings.checkpoint_every_n_steps == 0:
                self.save(trainer)

        def report(self, trainer, pl_module) -> None:
            pl_module.flush_step_metrics()
            self.throughput.mark(pl_module.input_tokens)
            rate = self.throughput.tokens_per_second()
            step = trainer.global_step
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            values = {
                "train/loss": pl_module.train_losses[-1],
                "train/grad_norm": pl_module.grad_norms[-1],
                "train/lr": lr,
                "train/padding_efficiency": pl_module.padding_efficiency,
            }
            if rate is not None:
                values["train/tokens_per_second"] = rate
                pl_module.mfu = model_flops(rate)  # read by the metrics callback too
                if pl_module.mfu is not None:
                    values["train/mfu"] = pl_module.mfu
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
            log.info(
                "step %d/%d  loss %.4f  grad-norm %.3f  lr %.2e  %s",
                step,
                trainer.max_steps,
                values["train/loss"],
                values["train/grad_norm"],
                lr,
                f"{rate:.1f} tokens/s" if rate is not None else "(first step: start-up, not timed)",
            )

        def save(self, trainer) -> None:
            step = trainer.global_step
            with store.stage() as folder:
                # Every rank calls it; rank 0 writes. Full state (optimizer, scheduler, loops): resuming needs it.
                trainer.save_checkpoint(folder / "checkpoint.ckpt", weights_only=False)
                self.last_saved_step = step
                if not trainer.is_global_zero:
                    return  # only rank 0 publishes (and records) checkpoints
                ref = store.publish(
                    folder, f"{checkpoint_prefix(fingerprint)}/step-{step:06d}", extra={"step": step}, replace=True
                )
            published.append(ref)
            log.info("checkpoint at step %d published to %s", step, ref.uri)
            if on_checkpoint:
                on_checkpoint(step, ref)
            kill_after_checkpoint_if_requested(step)  # test hook, off unless its env var is set

    return ProgressAndCheckpoints()


def _wandb_logger(runtime: RuntimeSettings, fingerprint: str, settings: LoraTrainingSettings, workdir: Path):
    """W&B logger (offline unless an API key is set), or None when W&B is disabled."""
    if runtime.wandb_mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    save_dir = Path(runtime.wandb_dir) if runtime.wandb_dir else workdir
    save_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=runtime.wandb_project,
        name=f"lora-{fingerprint}",
        save_dir=str(save_dir),
        offline=runtime.wandb_mode == "offline",
        config=asdict(settings),
        tags=["pixtrain", "lora"],
    )
    # Lightning always passes wandb.init(anonymous=None), which wandb warns "has no effect"; we never use
    # anonymous mode, so leave the argument out.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


@dataclass
class _PreparedData:
    train: Any  # StepIndexedBatches
    validation: list[dict[str, Any]]
    counts: dict[str, int]
    attention_length: float  # token-weighted mean conversation length: the attention context for FLOPs
    head_fraction: float  # labelled tokens / input tokens: the share of positions the output layer sees


def _setup_data(
    tokenizer: Any,
    settings: LoraTrainingSettings,
    train_conversations: Sequence[list[dict[str, str]]],
    validation_conversations: Sequence[list[dict[str, str]]],
    rank: int = 0,
) -> _PreparedData:
    """Tokenise (too-long conversations keep their newest turns), pack, and index the batches by step."""
    from transformers.utils.generic import is_flash_attention_requested

    from .throughput import segment_attention_length
    from .tokenization import StepIndexedBatches, fixed_batches, pack_rows, tokenize_conversations

    train = tokenize_conversations(tokenizer, train_conversations, settings.max_seq_len)
    validation = tokenize_conversations(tokenizer, validation_conversations, settings.max_seq_len)
    if train.truncated or train.dropped_too_long:
        log.info(
            "max_seq_len %d: %d of %d training conversations keep only their newest turns, %d are dropped",
            settings.max_seq_len,
            train.truncated,
            train.total,
            train.dropped_too_long,
        )
    batches = StepIndexedBatches(
        pack_rows(train.conversations, settings.max_seq_len, settings.pack_sequences),
        settings.micro_batch_size,
        settings.seed,
        tokenizer.pad_token_id,
        accumulation=settings.gradient_accumulation_steps,
        # Flash kernels (flash_attention_2/3/4, hub flash kernels) take the packed micro-batch as one flat row: no
        # padding computed at all. Decided by name, as transformers does (a hub kernel registers at model load).
        flatten=settings.pack_sequences
        and is_flash_attention_requested(requested_attention_implementation=settings.attn_implementation),
        world_size=settings.world_size,
        rank=rank,
    )
    validation_rows = pack_rows(validation.conversations, settings.max_seq_len, pack=False)
    lengths = [len(c.input_ids) for c in train.conversations]
    return _PreparedData(
        batches,
        fixed_batches(validation_rows, settings.micro_batch_size, tokenizer.pad_token_id),
        train.counts(),
        segment_attention_length(lengths) if lengths else 0.0,
        sum(c.loss_tokens for c in train.conversations) / max(1, sum(lengths)),
    )


def _setup_model(
    base_snapshot_dir: Path,
    settings: LoraTrainingSettings,
    device: str,
    precision: str,
    compute_device: str | None = None,
):
    """Base weights straight in the training dtype on the device, checked, with LoRA and the chosen speed-ups.

    ``device`` is where the weights load; ``compute_device`` where they train, if elsewhere (FSDP loads on the CPU).
    """
    from peft import LoraConfig, get_peft_model

    from .model_checks import verify_loss_path, verify_packing_isolation
    from .models import load_snapshot, training_dtype

    _check_kernel_toolchain(settings, compute_device or device)
    attn_implementation = _attention_for(base_snapshot_dir, settings, compute_device or device)
    model, tokenizer = load_snapshot(
        base_snapshot_dir,
        device=device,
        for_training=True,
        dtype=training_dtype(device, precision),
        attn_implementation=attn_implementation,
    )
    verify_loss_path(model)
    if settings.pack_sequences:
        verify_packing_isolation(model, attn_implementation)
    if settings.use_liger_kernel:
        _apply_liger_kernels(model, compute_device or device)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_targets,
        task_type="CAUSAL_LM",
    )
    try:
        # PEFT keeps the adapter weights in fp32 (autocast_adapter_dtype) while the frozen base stays bf16.
        peft_model = get_peft_model(model, lora)
    except ValueError as error:
        raise ValueError(f"LoRA target modules {settings.lora_targets} do not fit this model: {error}") from None
    if settings.gradient_checkpointing:
        # Non-reentrant: works with a frozen base (no input that requires grad) and replays dropout exactly.
        peft_model.get_base_model().activation_checkpointing_enable(  # transformers 5's name for it
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    if settings.compile_model:
        # Each decoder layer compiled in place: one graph reused by every layer, and state-dict keys unchanged
        # (torch.compile of the LightningModule crashes inside self.log; a wrapper would rename the keys).
        for layer in peft_model.get_base_model().get_decoder().layers:
            layer.compile(backend=settings.compile_backend)
    return peft_model, tokenizer


def _attention_for(base_snapshot_dir: Path, settings: LoraTrainingSettings, device: str) -> str:
    """The attention implementation to load: the setting resolved for the device, and for the model's attention."""
    from .attention import SEGMENTED_SDPA, segmented_sdpa_misfit

    chosen = settings.resolved_attn_implementation(device.split(":")[0])
    if chosen != SEGMENTED_SDPA:
        return chosen
    from transformers import AutoConfig

    misfit = segmented_sdpa_misfit(AutoConfig.from_pretrained(base_snapshot_dir), settings.max_seq_len)
    if misfit is None:
        return chosen
    if settings.attn_implementation == "auto":
        log.info("attn_implementation auto: sdpa, because segmented_sdpa does not implement this model's %s", misfit)
        return "sdpa"
    raise ValueError(
        f"attn_implementation segmented_sdpa does not implement this model's {misfit}; set lora_training's "
        "attn_implementation to auto or sdpa"
    )


def _check_kernel_toolchain(settings: LoraTrainingSettings, device: str) -> None:
    """compile_model and use_liger_kernel generate kernels when training starts, and building them needs a
    compiler in the pod: Triton (GPUs) compiles a C launcher against Python.h, Inductor on CPU compiles C++. Say so
    before loading the model, not as a compiler error from deep inside the first forward pass."""
    import shutil
    import sysconfig

    on_gpu = device.split(":")[0] == "cuda"
    wanted = [name for name in ("compile_model", "use_liger_kernel") if getattr(settings, name)]
    if not on_gpu and "use_liger_kernel" in wanted:
        wanted.remove("use_liger_kernel")  # refused on CPU for another reason (_apply_liger_kernels)
    if not wanted:
        return
    variable, defaults = ("CC", ["cc", "gcc", "clang"]) if on_gpu else ("CXX", ["c++", "g++", "clang++"])
    compilers = [os.environ[variable]] if os.environ.get(variable) else defaults
    missing = []
    if not any(shutil.which(c) for c in compilers):
        missing.append(f"a {'C' if on_gpu else 'C++'} compiler ({' / '.join(compilers)} on PATH)")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if on_gpu and not headers.is_file():
        missing.append(f"the Python headers ({headers})")
    if missing:
        raise ValueError(
            f"{' and '.join(wanted)} build kernels when training starts and need {' and '.join(missing)}, which "
            "this environment lacks; turn them off, or use an image built with its Triton toolchain "
            "(docker/Dockerfile TRITON_TOOLCHAIN)"
        )


def _apply_liger_kernels(model: Any, device: str) -> None:
    """Swap RMSNorm, RoPE and SwiGLU for Liger's Triton kernels (CUDA only; liger-kernel installed)."""
    if device.split(":")[0] != "cuda":  # "cuda:0" under Lightning; FSDP loads on the CPU, trains on CUDA
        raise ValueError("use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton); turn it off on CPU")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ValueError(
            "use_liger_kernel is on but the liger-kernel package is not installed; "
            "pip install liger-kernel, or turn it off"
        ) from None
    # Our loss computes only labelled positions in chunks already; Liger's fused cross-entropy would replace it.
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def _strategy(settings: LoraTrainingSettings, model_layer_class: type | None):
    """Lightning strategy: one process; DDP (each rank a full copy of the frozen base); or FSDP (the frozen base
    sharded per decoder layer, LoRA weights trainable, full state dicts so a checkpoint resumes on any world
    size)."""
    strategy = settings.resolved_strategy
    if strategy == "single":
        return "auto"
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Every step uses every LoRA parameter; frozen ones are not in DDP's gradient buckets.
        return DDPStrategy(find_unused_parameters=False)
    from lightning.pytorch.strategies import FSDPStrategy

    from .sharding import fsdp_wrap_policy, trainable_full_state_dict

    class LoraFSDPStrategy(FSDPStrategy):
        """Checkpoints (and the published adapter) gather only the trainable weights, not the frozen base."""

        def lightning_module_state_dict(self) -> dict[str, Any]:
            if self._state_dict_type != "full":
                return super().lightning_module_state_dict()
            return trainable_full_state_dict(self.model)

    return LoraFSDPStrategy(
        auto_wrap_policy=fsdp_wrap_policy(model_layer_class),
        use_orig_params=True,  # LoRA: trainable and frozen parameters share wrapped modules
        state_dict_type="full",
        sharding_strategy="FULL_SHARD",
        limit_all_gathers=True,
    )


def _setup_trainer(
    settings: LoraTrainingSettings,
    device: str,
    precision: str,
    logger: Any,
    callbacks: list[Any],
    workdir: str,
    model_layer_class: type | None = None,
):
    """The Lightning Trainer: step-based (max_steps), our own clipping and checkpoints, the chosen strategy."""
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=_strategy(settings, model_layer_class),
        precision=precision,
        max_steps=settings.max_steps,
        accumulate_grad_batches=settings.gradient_accumulation_steps,
        gradient_clip_val=None,  # clipped in LoraFineTuning.on_before_optimizer_step (see there why)
        # Counted in micro-batches; past the last one means "only the final validation below".
        val_check_interval=(settings.validate_every_n_steps or settings.max_steps + 1)
        * settings.gradient_accumulation_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger if logger is not None else False,
        log_every_n_steps=settings.log_every_n_steps,
        enable_checkpointing=False,  # our callback publishes checkpoints to the artifact store instead
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=workdir,
    )


def process_rank(settings: LoraTrainingSettings) -> tuple[int, int]:
    """(global rank, local rank) of this process; a multi-process run must be started by torchrun (or a TrainJob,
    which runs torchrun), which sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != settings.world_size:
        raise ValueError(
            f"devices x num_nodes = {settings.world_size} but this process is one of {world} (WORLD_SIZE): start "
            "multi-process training with `torchrun ... -m pixtrain_dagster.core.distributed` (the lora_training step "
            "does this itself), or set devices and num_nodes to 1"
        )
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _decoder_layer_class(peft_model: Any) -> type | None:
    layers = getattr(peft_model.get_base_model().get_decoder(), "layers", None)
    return type(layers[0]) if layers else None


def _trainable_state(trainer: Any, peft_model: Any) -> dict[str, Any] | None:
    """The LoRA weights as a full (unsharded) state dict for saving; None where the model's own is complete."""
    if trainer.world_size == 1 or not hasattr(trainer.strategy, "lightning_module_state_dict"):
        return None
    from .sharding import trainable_parameter_names

    trainable = trainable_parameter_names(peft_model)
    full = trainer.strategy.lightning_module_state_dict()
    return {k.removeprefix("model."): v for k, v in full.items() if k.removeprefix("model.") in trainable}


def _publish_adapter(
    store: ArtifactStore,
    peft_model: Any,
    tokenizer: Any,
    summary: dict[str, Any],
    base_model_name: str,
    fingerprint: str,
    lora_state: dict[str, Any] | None = None,
) -> ArtifactRef:
    """Write the adapter (PEFT format, tokenizer, training summary) and publish it atomically with its manifest."""
    with store.stage() as folder:
        # Name the base by its store key, not this machine's path: the same inputs then give the same adapter bytes.
        config = peft_model.peft_config["default"]
        config.base_model_name_or_path = base_model_name
        if isinstance(config.target_modules, set):  # a set saves in hash order, which varies per process
            config.target_modules = sorted(config.target_modules)
        # The vocabulary is never resized, so no embedding weights to save; saying so also keeps PEFT from looking
        # up the base (named by its store key, not a hub id) on the model hub to find out.
        peft_model.save_pretrained(folder, state_dict=lora_state, save_embedding_layers=False)
        tokenizer.save_pretrained(folder)
        (folder / "training_summary.json").write_text(json.dumps(summary, indent=2))
        return store.publish(folder, f"adapters/{fingerprint}", extra=summary, replace=True)


def _device_peak_flops(device: str, local_rank: int) -> float | None:
    from .throughput import peak_flops

    if device != "cuda":
        return None  # CPUs: no dense-bf16 peak worth quoting, so no MFU
    import torch

    return peak_flops(torch.cuda.get_device_name(local_rank))


def _mfu_function(
    peft_model: Any, data: _PreparedData, peak_per_device: float | None, world_size: int
) -> Callable[[float], float | None]:
    """tokens/s (all ranks) -> model FLOPs utilisation, or None where the device's peak is unknown.
    Formula and peak table: core/throughput.py."""
    from .throughput import lora_flops_per_token, mfu

    if peak_per_device is None or not data.attention_length:
        return lambda rate: None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    flops = lora_flops_per_token(
        peft_model.get_base_model().config, trainable, data.attention_length, data.head_fraction
    )
    return lambda rate: mfu(rate, flops, peak_per_device * world_size)


def _peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def rank_zero_decides(decide: Callable[[], Any]) -> Any:
    """Run ``decide`` on global rank 0 only and return its answer on every rank (one process: just run it).

    Which checkpoint to resume from must be one answer for all ranks: each rank listing and verifying a shared
    volume on its own may see a different newest checkpoint (an I/O error skipping one, a network filesystem's
    stale directory cache), and ranks resumed at different steps wait on each other's collectives until the
    timeout. This starts the process group Lightning then uses (it reuses an initialised one), with Lightning's
    backend and timeout."""
    import atexit
    import datetime

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return decide()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30), device_id=device)
        log.info(
            "process group (%s) started: global rank %d of %d",
            dist.get_backend(),
            dist.get_rank(),
            dist.get_world_size(),
        )
        # Torn down before the interpreter exits: a process group left to die with it can abort the process
        # ("terminate called without an active exception") after its work is done.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    answer = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def _resume_point(
    checkpoint_store: ArtifactStore, fingerprint: str, resume: bool, on_invalid: Callable[[Any], None] | None = None
):
    """(checkpoint key, local path, step, input tokens so far) of the newest checkpoint whose manifest and sha256
    verify (damaged ones are skipped and reported to ``on_invalid``), or Nones and zeros."""
    from .safe_load import load_checkpoint_safely

    key = rank_zero_decides(
        lambda: latest_valid_checkpoint(checkpoint_store, fingerprint, on_invalid) if resume else None
    )
    if key is None:
        return None, None, 0, 0
    path = checkpoint_store.local_path(key) / "checkpoint.ckpt"
    # Restricted unpickler: write access to the checkpoint volume must not mean code execution in this pod.
    state = load_checkpoint_safely(path)
    return key, path, state["global_step"], state["pixtrain"]["input_tokens"]


@dataclass(frozen=True)
class _Placement:
    device: str  # cuda, mps or cpu
    precision: str
    rank: int
    local_rank: int
    load_on: str  # where the base weights are loaded: FSDP loads on the CPU and shards from there


def _setup_device(settings: LoraTrainingSettings, runtime: RuntimeSettings) -> _Placement:
    """The device, precision and ranks of this process; refuses FSDP without CUDA before any loading."""
    import torch

    from .models import pick_device

    device = pick_device(runtime.device)
    rank, local_rank = process_rank(settings)
    if settings.resolved_strategy == "fsdp" and device != "cuda":
        raise ValueError(
            "strategy fsdp needs CUDA GPUs (Lightning's FSDP refuses a CPU accelerator); use strategy "
            "ddp (or auto) on CPU"
        )
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch.cuda.reset_peak_memory_stats()
    load_on = "cpu" if settings.resolved_strategy == "fsdp" else (f"cuda:{local_rank}" if device == "cuda" else device)
    return _Placement(device, settings.resolved_precision(device), rank, local_rank, load_on)


def _fit(
    trainer, module, progress, logger, resume_path: Path | None, start_step: int
) -> tuple[float, str | None, str | None]:
    """Fit (resuming from ``resume_path``), save the final step, validate; (fit seconds, W&B run id, W&B dir)."""
    started = time.perf_counter()
    trainer.fit(module, ckpt_path=str(resume_path) if resume_path else None, weights_only=True)
    fit_seconds = time.perf_counter() - started
    module.flush_step_metrics()
    if progress.last_saved_step != trainer.global_step and trainer.global_step > start_step:
        progress.save(trainer)  # the final step, so re-materialising with the same inputs does no work
    trainer.validate(module, verbose=False)
    wandb_run_id = wandb_dir = None
    if logger is not None and trainer.is_global_zero:
        wandb_run_id, wandb_dir = logger.experiment.id, str(logger.experiment.dir)
        logger.experiment.finish()
    return fit_seconds, wandb_run_id, wandb_dir


def train_lora_adapter(
    *,
    store: ArtifactStore,
    checkpoint_store: ArtifactStore | None = None,
    base_snapshot_dir: Path,
    base_model_sha256: str,
    dataset_sha256: str,
    train_conversations: Sequence[list[dict[str, str]]],
    validation_conversations: Sequence[list[dict[str, str]]],
    settings: LoraTrainingSettings,
    runtime: RuntimeSettings,
    resume: bool = True,
    base_model_name: str | None = None,
    on_checkpoint: CheckpointHook | None = None,
    on_invalid_checkpoint: Callable[[Any], None] | None = None,
    extra_callbacks: Sequence[Any] = (),
) -> TrainingResult:
    """Train a LoRA adapter: device, model, data, resume point, trainer, fit, publish (rank 0 publishes).

    Every process runs this same function: the single-process step, each torchrun worker and each TrainJob
    pod (``distributed.py``). Re-running with the same inputs and settings resumes from the newest valid
    checkpoint of the same fingerprint; ``on_checkpoint`` is called as each checkpoint is published.
    """
    import lightning as L

    from .lightning_module import LoraFineTuning
    from .warning_filters import install_library_filters

    install_library_filters()
    fingerprint = settings.fingerprint(base_model_sha256, dataset_sha256)
    checkpoint_store = checkpoint_store or store
    L.seed_everything(settings.seed, workers=True, verbose=False)
    place = _setup_device(settings, runtime)
    device, precision, local_rank = place.device, place.precision, place.local_rank
    peft_model, tokenizer = _setup_model(base_snapshot_dir, settings, place.load_on, precision, place.device)
    data = _setup_data(tokenizer, settings, train_conversations, validation_conversations, place.rank)
    module = LoraFineTuning(peft_model, settings, data.train, data.validation, pin_memory=device == "cuda")

    resume_key, resume_path, start_step, tokens_before = _resume_point(
        checkpoint_store, fingerprint, resume, on_invalid_checkpoint
    )
    published: list[ArtifactRef] = (
        [checkpoint_store.ref(k) for k in checkpoint_store.list(checkpoint_prefix(fingerprint))] if resume else []
    )
    utilisation = _mfu_function(peft_model, data, _device_peak_flops(device, local_rank), settings.world_size)
    progress = _make_progress_callback(checkpoint_store, fingerprint, settings, published, on_checkpoint, utilisation)

    with tempfile.TemporaryDirectory(prefix="pixtrain-train-") as workdir:
        logger = _wandb_logger(runtime, fingerprint, settings, Path(workdir))
        trainer = _setup_trainer(
            settings, device, precision, logger, [progress, *extra_callbacks], workdir, _decoder_layer_class(peft_model)
        )
        if resume_key:
            log.info("resuming %s from step %d (%s)", fingerprint, start_step, resume_key)
        fit_seconds, wandb_run_id, wandb_dir = _fit(trainer, module, progress, logger, resume_path, start_step)

    steps_this_run = trainer.global_step - start_step
    summary = {
        "fingerprint": fingerprint,
        "base_model_sha256": base_model_sha256,
        "dataset_sha256": dataset_sha256,
        "settings": asdict(settings),
        "final_step": trainer.global_step,
    }
    lora_state = _trainable_state(trainer, peft_model)  # collective under FSDP: every rank takes part
    adapter = (
        _publish_adapter(
            store, peft_model, tokenizer, summary, base_model_name or str(base_snapshot_dir), fingerprint, lora_state
        )
        if trainer.is_global_zero
        else None
    )
    rate = progress.throughput.tokens_per_second()
    if rate is None and steps_this_run and fit_seconds > 0:  # a single step: nothing to exclude start-up from
        rate = (module.input_tokens - tokens_before) / fit_seconds

    published = sorted({ref.uri: ref for ref in published}.values(), key=lambda ref: ref.uri)
    return TrainingResult(
        fingerprint=fingerprint,
        adapter=adapter,
        checkpoints=published,
        resumed_from_step=start_step,
        resumed_from_checkpoint=checkpoint_store.ref(resume_key) if resume_key else None,
        final_step=trainer.global_step,
        steps_this_run=steps_this_run,
        final_train_loss=module.train_losses[-1] if module.train_losses else float("nan"),
        validation_loss=module.last_validation_loss,
        train_losses=module.train_losses,
        tokens_per_second=rate or 0.0,
        trained_tokens=module.trained_tokens,
        wall_seconds=fit_seconds,
        trainable_parameters=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in peft_model.parameters()),
        device=device,
        precision=precision,
        attn_implementation=peft_model.get_base_model().config._attn_implementation,
        padding_efficiency=module.padding_efficiency,
        peak_memory_bytes=_peak_memory_bytes(device),
        data_wait_seconds=module.prefetcher.wait_seconds if module.prefetcher else 0.0,
        mfu=utilisation(rate) if rate else None,
        conversations=data.counts,
        world_size=trainer.world_size,
        strategy=settings.resolved_strategy,
        wandb_run_id=wandb_run_id,
        wandb_dir=wandb_dir,
    )
