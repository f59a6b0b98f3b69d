"""The LoRA training recipe: snapshot + curated conversations in, PEFT adapter and checkpoints out.

Checkpoints are published to the artifact store under ``checkpoints/<fingerprint>/step-NNNNNN`` where the
fingerprint covers the base model, the dataset version and every training setting. Training again with the
same fingerprint resumes from the newest complete checkpoint, so a crashed or pre-empted step loses at most
``checkpoint_every_n_steps`` steps and a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
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
    adapter: ArtifactRef
    checkpoints: list[ArtifactRef]
    resumed_from_step: int
    resumed_from_checkpoint: ArtifactRef | None
    final_step: int
    steps_this_run: int
    final_train_loss: float
    validation_loss: float | None
    train_losses: list[float]
    tokens_per_second: float
    trained_tokens: int
    wall_seconds: float
    trainable_parameters: int
    total_parameters: int
    device: str
    precision: str
    wandb_run_id: str | None = None
    wandb_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        return asdict(self)  # nested ArtifactRefs become dicts too


def checkpoint_prefix(fingerprint: str) -> str:
    return f"checkpoints/{fingerprint}"


def latest_checkpoint(store: ArtifactStore, fingerprint: str) -> str | None:
    keys = store.list(checkpoint_prefix(fingerprint))
    return keys[-1] if keys else None  # zero-padded step numbers sort in step order


def _make_checkpoint_callback(store: ArtifactStore, fingerprint: str, every_n_steps: int,
                              published: list[ArtifactRef], on_checkpoint: CheckpointHook | None):
    import lightning as L

    class PublishCheckpoints(L.Callback):
        """Logs progress each optimizer step; every N steps saves a checkpoint and publishes it atomically."""

        def __init__(self) -> None:
            self.last_saved_step = -1
            self.last_logged_step = -1
            self.started, self.tokens_at_start = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step == self.last_logged_step:
                return  # still accumulating gradients for this step
            self.last_logged_step = step
            elapsed = time.perf_counter() - self.started
            log.info("step %d/%d  loss %.4f  %.1f tokens/s", step, trainer.max_steps, pl_module.train_losses[-1],
                     (pl_module.input_tokens - self.tokens_at_start) / max(elapsed, 1e-9))
            if step != self.last_saved_step and step % every_n_steps == 0 and step > 0:
                self.save(trainer)

        def on_train_start(self, trainer, pl_module) -> None:
            self.started, self.tokens_at_start = time.perf_counter(), pl_module.input_tokens
            self.last_logged_step = trainer.global_step

        def save(self, trainer) -> None:
            step = trainer.global_step
            with store.stage() as folder:
                trainer.save_checkpoint(folder / "checkpoint.ckpt")
                ref = store.publish(folder, f"{checkpoint_prefix(fingerprint)}/step-{step:06d}",
                                    extra={"step": step}, replace=True)
            self.last_saved_step = step
            published.append(ref)
            log.info("checkpoint at step %d published to %s", step, ref.uri)
            if on_checkpoint:
                on_checkpoint(step, ref)
            kill_after_checkpoint_if_requested(step)  # test hook, off unless its env var is set

    return PublishCheckpoints()


def _wandb_logger(runtime: RuntimeSettings, fingerprint: str, settings: LoraTrainingSettings, workdir: Path):
    if runtime.wandb_mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    save_dir = Path(runtime.wandb_dir) if runtime.wandb_dir else workdir
    save_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=runtime.wandb_project,
        name=f"lora-{fingerprint}",
        save_dir=str(save_dir),
        offline=runtime.wandb_mode == "offline",
        config=asdict(settings),
        tags=["pixtrain", "lora"],
    )


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
    import lightning as L
    import torch
    from peft import LoraConfig, get_peft_model

    from .lightning_module import LoraFineTuning
    from .models import load_snapshot, pick_device
    from .tokenization import StepIndexedBatches, fixed_batches, pack_rows, tokenize_conversation

    fingerprint = settings.fingerprint(base_model_sha256, dataset_sha256)
    checkpoint_store = checkpoint_store or store
    L.seed_everything(settings.seed, workers=True, verbose=False)
    device = pick_device(runtime.device)
    precision = "bf16-mixed" if device == "cuda" else "32-true"

    model, tokenizer = load_snapshot(base_snapshot_dir, device="cpu", for_training=True)
    train_rows = pack_rows(
        [tokenize_conversation(tokenizer, c, settings.max_seq_len) for c in train_conversations],
        settings.max_seq_len, settings.pack_sequences,
    )
    validation_rows = pack_rows(
        [tokenize_conversation(tokenizer, c, settings.max_seq_len) for c in validation_conversations],
        settings.max_seq_len, pack=False,
    )
    train_batches = StepIndexedBatches(train_rows, settings.micro_batch_size, settings.seed, tokenizer.pad_token_id)
    validation_batches = fixed_batches(validation_rows, settings.micro_batch_size, tokenizer.pad_token_id)

    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as error:
        raise ValueError(f"LoRA target modules {list(settings.lora_target_modules)} do not fit this model: {error}") from None
    if device == "cuda":
        peft_model.to(torch.bfloat16)
        # PEFT keeps adapter weights in fp32 for stable updates; only the frozen base runs in bf16.
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    module = LoraFineTuning(peft_model, settings, train_batches, validation_batches)

    resume_key = latest_valid_checkpoint(checkpoint_store, fingerprint, on_invalid_checkpoint) if resume else None
    resume_path = checkpoint_store.local_path(resume_key) / "checkpoint.ckpt" if resume_key else None
    published: list[ArtifactRef] = (
        [checkpoint_store.ref(k) for k in checkpoint_store.list(checkpoint_prefix(fingerprint))] if resume else []
    )
    checkpointing = _make_checkpoint_callback(checkpoint_store, fingerprint, settings.checkpoint_every_n_steps, published,
                                              on_checkpoint)

    with tempfile.TemporaryDirectory(prefix="pixtrain-train-") as workdir:
        logger = _wandb_logger(runtime, fingerprint, settings, Path(workdir))
        trainer = L.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            precision=precision,
            max_steps=settings.max_steps,
            accumulate_grad_batches=settings.gradient_accumulation_steps,
            gradient_clip_val=settings.gradient_clip_norm,
            # Counted in micro-batches; past the last one means "only the final validation below".
            val_check_interval=(settings.validate_every_n_steps or settings.max_steps + 1)
            * settings.gradient_accumulation_steps,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            logger=logger if logger is not None else False,
            log_every_n_steps=1,
            enable_checkpointing=False,  # our callback publishes checkpoints to the artifact store instead
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[checkpointing, *extra_callbacks],
            default_root_dir=workdir,
        )
        start_step = tokens_before = 0
        if resume_path is not None:
            resume_state = torch.load(resume_path, map_location="cpu", weights_only=False)
            start_step, tokens_before = resume_state["global_step"], resume_state["pixtrain"]["input_tokens"]
            del resume_state
            log.info("resuming %s from step %d (%s)", fingerprint, start_step, resume_key)
        started = time.perf_counter()
        trainer.fit(module, ckpt_path=str(resume_path) if resume_path else None)
        fit_seconds = time.perf_counter() - started
        if checkpointing.last_saved_step != trainer.global_step and trainer.global_step > start_step:
            checkpointing.save(trainer)  # the final step, so re-materialising with the same inputs does no work
        trainer.validate(module, verbose=False)
        wandb_run_id = wandb_dir = None
        if logger is not None:
            wandb_run_id, wandb_dir = logger.experiment.id, str(logger.experiment.dir)
            logger.experiment.finish()

    steps_this_run = trainer.global_step - start_step
    result_tokens = module.input_tokens - tokens_before
    with store.stage() as folder:
        # Name the base by its store key, not this machine's path: the same inputs then give the same adapter bytes.
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name or str(base_snapshot_dir)
        # PEFT keeps target_modules as a set, saved in hash order (varies per process): sort for stable bytes.
        peft_model.peft_config["default"].target_modules = sorted(peft_model.peft_config["default"].target_modules)
        peft_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        summary = {
            "fingerprint": fingerprint,
            "base_model_sha256": base_model_sha256,
            "dataset_sha256": dataset_sha256,
            "settings": asdict(settings),
            "final_step": trainer.global_step,
        }
        (folder / "training_summary.json").write_text(json.dumps(summary, indent=2))
        adapter = store.publish(folder, f"adapters/{fingerprint}", extra=summary, replace=True)

    published = sorted({ref.uri: ref for ref in published}.values(), key=lambda ref: ref.uri)
    return TrainingResult(
        fingerprint=fingerprint,
        adapter=adapter,
        checkpoints=published,
        resumed_from_step=start_step,
        resumed_from_checkpoint=checkpoint_store.ref(resume_key) if resume_key else None,
        final_step=trainer.global_step,
        steps_this_run=steps_this_run,
        final_train_loss=_mean_last(module.train_losses, settings.gradient_accumulation_steps),
        validation_loss=module.last_validation_loss,
        train_losses=module.train_losses,
        tokens_per_second=result_tokens / fit_seconds if steps_this_run and fit_seconds > 0 else 0.0,
        trained_tokens=module.trained_tokens,
        wall_seconds=fit_seconds,
        trainable_parameters=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in peft_model.parameters()),
        device=device,
        precision=precision,
        wandb_run_id=wandb_run_id,
        wandb_dir=wandb_dir,
    )


def _mean_last(values: Sequence[float], count: int) -> float:
    """Loss of the last optimizer step: the mean over its accumulated micro-batches."""
    tail = list(values)[-count:]
    return sum(tail) / len(tail) if tail else float("nan")
