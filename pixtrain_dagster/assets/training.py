"""LoRA training: one step that produces the adapter and its checkpoints."""

from dataclasses import asdict, fields
from typing import Literal

from dagster import AssetExecutionContext, AssetOut, Config, DataVersion, MetadataValue, Output, multi_asset
from pydantic import Field

from ..catalog import PHI_DERIVED, governance_tags, owners, uri_metadata
from ..core.settings import LoraTrainingSettings
from ..execution import METADATA_DB_PASSWORD_ENV, WANDB_API_KEY_ENV, step_pod_tags
from ..provenance import code_version, git_commit
from ..recovery import GPU_POOL, gpu_step_retry_policy, no_retry_for_permanent_errors
from ..resources import ArtifactStoreResource, TrainingMetadataResource, TrainingRuntimeResource
from ..resources.metadata import step_identity

_DEFAULTS = LoraTrainingSettings()


class LoraTrainingConfig(Config):
    """Hyperparameters; every field is part of the run's fingerprint, so changing one starts a new run."""

    max_steps: int = Field(default=_DEFAULTS.max_steps, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(default=_DEFAULTS.micro_batch_size, ge=1, description="Rows per forward pass.")
    gradient_accumulation_steps: int = Field(
        default=_DEFAULTS.gradient_accumulation_steps, ge=1, description="Micro-batches per optimizer step."
    )
    max_seq_len: int = Field(default=_DEFAULTS.max_seq_len, ge=16, description="Tokens per packed row.")
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=_DEFAULTS.weight_decay, ge=0, description="AdamW weight decay (LoRA weights).")
    warmup_steps: int = Field(
        default=_DEFAULTS.warmup_steps, ge=0, description="Linear warm-up steps before the cosine decay."
    )
    gradient_clip_norm: float = Field(
        default=_DEFAULTS.gradient_clip_norm, gt=0, description="Global gradient-norm clipping limit."
    )
    lora_r: int = Field(default=_DEFAULTS.lora_r, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=_DEFAULTS.lora_alpha, ge=1, description="LoRA scaling numerator (scale alpha/r).")
    lora_dropout: float = Field(default=_DEFAULTS.lora_dropout, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default=list(_DEFAULTS.lora_target_modules), min_length=1, description="Module names to adapt, or [all-linear]."
    )
    pack_sequences: bool = Field(
        default=_DEFAULTS.pack_sequences,
        description="Pack several conversations per row (no cross-attention between them).",
    )
    checkpoint_every_n_steps: int = Field(
        default=_DEFAULTS.checkpoint_every_n_steps,
        ge=1,
        description="Optimizer steps between checkpoints (resume points).",
    )
    validate_every_n_steps: int = Field(
        default=_DEFAULTS.validate_every_n_steps,
        ge=0,
        description="Validation loss every N optimizer steps; 0 = only once, after training.",
    )
    seed: int = Field(default=_DEFAULTS.seed, description="Seed of initialisation, shuffling and dropout.")
    precision: Literal["auto", "bf16-mixed", "bf16-true", "32-true"] = Field(
        default=_DEFAULTS.precision, description="auto: bf16-mixed on a GPU (bf16 base, fp32 LoRA), 32-true on CPU."
    )
    attn_implementation: str = Field(
        default=_DEFAULTS.attn_implementation,
        description=(
            "auto (CPU: segmented_sdpa, SDPA's causal kernel per packed conversation with no mask; GPU or "
            "compile_model: sdpa), segmented_sdpa, sdpa, eager, flash_attention_2 (padding-free packed batches on "
            "GPU), or a hub kernel name."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=_DEFAULTS.gradient_checkpointing,
        description="Recompute activations in backward: less memory, ~30% slower.",
    )
    compile_model: bool = Field(default=_DEFAULTS.compile_model, description="torch.compile each decoder layer.")
    compile_backend: str = Field(default=_DEFAULTS.compile_backend, description="torch.compile backend.")
    use_liger_kernel: bool = Field(
        default=_DEFAULTS.use_liger_kernel,
        description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU); CUDA + liger-kernel.",
    )
    loss_chunk_tokens: int = Field(
        default=_DEFAULTS.loss_chunk_tokens,
        ge=1,
        description="Labelled positions per output-layer chunk (bounds fp32 logits).",
    )
    log_every_n_steps: int = Field(
        default=_DEFAULTS.log_every_n_steps,
        ge=1,
        description="Read losses from the device and log every N optimizer steps.",
    )
    devices: int = Field(
        default=_DEFAULTS.devices,
        ge=1,
        description="Training processes (GPUs) per node; > 1 runs torchrun inside the step pod.",
    )
    num_nodes: int = Field(
        default=_DEFAULTS.num_nodes, ge=1, description="Nodes; > 1 runs a Kubeflow TrainJob (docs/scale-out.md)."
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default=_DEFAULTS.strategy, description="auto: DDP with several processes; fsdp shards the frozen base."
    )
    resume: bool = Field(default=True, description="Continue from the newest checkpoint of the same fingerprint.")

    def to_settings(self) -> LoraTrainingSettings:
        values = {f.name: getattr(self, f.name) for f in fields(LoraTrainingSettings)}
        values["lora_target_modules"] = tuple(values["lora_target_modules"])
        return LoraTrainingSettings(**values)


@multi_asset(
    outs={
        "lora_adapter": AssetOut(
            group_name="training",
            description="The trained LoRA adapter in PEFT format, with the tokenizer.",
            kinds={"pytorch", "pytorchlightning", "wandb"},
            owners=owners(),
            tags=governance_tags(PHI_DERIVED, "gpu"),
        ),
        "training_checkpoints": AssetOut(
            group_name="training",
            description="Checkpoints of the run; re-materialising resumes from the newest.",
            kinds={"pytorch", "pytorchlightning"},
            owners=owners(),
            tags=governance_tags(PHI_DERIVED, "gpu"),
        ),
    },
    name="lora_training",
    op_tags=step_pod_tags("gpu", secrets=(WANDB_API_KEY_ENV, METADATA_DB_PASSWORD_ENV)),
    pool=GPU_POOL,
    retry_policy=gpu_step_retry_policy(),
)
def lora_training(
    context: AssetExecutionContext,
    config: LoraTrainingConfig,
    base_model: dict,
    training_dataset: dict,
    artifact_store: ArtifactStoreResource,
    training_runtime: TrainingRuntimeResource,
    training_metadata: TrainingMetadataResource,
):
    from ..core.conversations import load_conversations
    from ..core.telemetry import StepTelemetry, serve_step_metrics, training_metrics_callback
    from ..core.training import train_lora_adapter

    store = artifact_store.store()
    dataset_dir = store.local_path(training_dataset["key"])
    with no_retry_for_permanent_errors("invalid training config"):
        settings = config.to_settings()

    records = training_metadata.get_store()
    who = step_identity(context)
    records.start_training_run(
        who.run_id,
        who.step_key,
        dataset_hash=training_dataset["sha256"],
        base_model_ref=base_model["info"]["source_reference"],
        base_model_sha256=base_model["sha256"],
        code_version=code_version(),
        git_commit=git_commit(),
        hyperparameters=asdict(settings),
        attempt=who.attempt,
        actor=who.actor,
    )

    def on_checkpoint(step: int, ref) -> None:
        context.log.info(f"checkpoint step {step}: {ref.uri} sha256={ref.sha256[:12]}")
        records.record_checkpoint(
            who.run_id, who.step_key, global_step=step, uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size_bytes
        )

    def on_invalid_checkpoint(invalid) -> None:
        context.log.warning(f"skipping damaged checkpoint {invalid.uri}: {invalid.reason}")
        records.append_audit_event(
            "checkpoint_skipped_damaged",
            actor=who.actor,
            artifact_uri=invalid.uri,
            run_id=who.run_id,
            step_key=who.step_key,
            details={"reason": invalid.reason[:500], "attempt": who.attempt},
            idempotency_key=f"checkpoint_skipped_damaged:{who.run_id}:{who.step_key}:{who.attempt}:{invalid.key}",
        )

    # /metrics + /healthz while the step runs (pod port "metrics"; docs/monitoring.md).
    telemetry = StepTelemetry("lora_training", base_model["info"]["source_reference"])
    metrics_server = serve_step_metrics(telemetry, training=True)
    metrics_callback = training_metrics_callback(
        telemetry, settings.fingerprint(base_model["sha256"], training_dataset["sha256"])
    )
    try:
        with no_retry_for_permanent_errors("training cannot start with this config or data"):
            conversations = (
                load_conversations(dataset_dir / "train.jsonl"),
                load_conversations(dataset_dir / "validation.jsonl"),
            )
        if settings.world_size > 1:
            result = _train_in_several_processes(
                context, config, settings, artifact_store, base_model, training_dataset, training_runtime
            )
            for ref in result.checkpoints:  # rank 0 published them; recorded here, once (upserts)
                on_checkpoint(int(ref.uri.rstrip("/").rsplit("-", 1)[1]), ref)
        else:
            with no_retry_for_permanent_errors("training cannot run with this config"):
                result = train_lora_adapter(
                    store=store,
                    checkpoint_store=artifact_store.checkpoint_store(),
                    base_snapshot_dir=store.local_path(base_model["key"]),
                    base_model_name=base_model["key"],
                    base_model_sha256=base_model["sha256"],
                    dataset_sha256=training_dataset["sha256"],
                    train_conversations=conversations[0],
                    validation_conversations=conversations[1],
                    settings=settings,
                    runtime=training_runtime.settings(),
                    resume=config.resume,
                    on_checkpoint=on_checkpoint,
                    on_invalid_checkpoint=on_invalid_checkpoint,
                    extra_callbacks=[metrics_callback],
                )
        if result.resumed_from_checkpoint is not None:
            # Links this run to the checkpoint (and so the earlier run) it continued from; lineage lists this event.
            source = result.resumed_from_checkpoint
            records.append_audit_event(
                "training_resumed",
                actor=who.actor,
                artifact_uri=source.uri,
                artifact_sha256=source.sha256,
                run_id=who.run_id,
                step_key=who.step_key,
                details={"from_step": result.resumed_from_step, "fingerprint": result.fingerprint},
                idempotency_key=f"training_resumed:{who.run_id}:{who.step_key}:{who.attempt}",
            )
        records.finish_training_run(
            who.run_id,
            who.step_key,
            status="succeeded",
            adapter_uri=result.adapter.uri,
            adapter_sha256=result.adapter.sha256,
            attempt=who.attempt,
            actor=who.actor,
            metrics={
                "final_train_loss": result.final_train_loss,
                "validation_loss": result.validation_loss,
                "tokens_per_second": result.tokens_per_second,
                "final_step": result.final_step,
                "resumed_from_step": result.resumed_from_step,
                "precision": result.precision,
                "padding_efficiency": result.padding_efficiency,
                "mfu": result.mfu,
                "peak_memory_bytes": result.peak_memory_bytes,
                "conversations": result.conversations,
            },
        )
    except BaseException:
        # KeyboardInterrupt/SIGTERM too: a pre-empted pod's run is recorded as failed, not left "running".
        records.finish_training_run(who.run_id, who.step_key, status="failed", attempt=who.attempt, actor=who.actor)
        raise
    finally:
        metrics_server.__exit__(None, None, None)
    summary = result.summary()
    adapter = {
        "key": store.key_of(result.adapter.uri),
        **result.adapter.to_dict(),
        "fingerprint": result.fingerprint,
        "base_model_key": base_model["key"],
        "base_model_sha256": base_model["sha256"],
        "dataset_key": training_dataset["key"],
        "dataset_sha256": training_dataset["sha256"],
        "training": {
            k: v
            for k, v in summary.items()
            if k not in ("adapter", "checkpoints", "train_losses", "resumed_from_checkpoint")
        },
        "train_losses": result.train_losses,
    }
    common = {
        "fingerprint": result.fingerprint,
        "steps": MetadataValue.int(result.final_step),
        "resumed_from_step": MetadataValue.int(result.resumed_from_step),
        "steps_this_run": MetadataValue.int(result.steps_this_run),
    }
    yield Output(
        adapter,
        output_name="lora_adapter",
        data_version=DataVersion(result.adapter.sha256),
        metadata={
            **common,
            "train_loss": MetadataValue.float(result.final_train_loss),
            "validation_loss": MetadataValue.float(
                result.validation_loss if result.validation_loss is not None else float("nan")
            ),
            "tokens_per_second": MetadataValue.float(round(result.tokens_per_second, 2)),
            "wall_seconds": MetadataValue.float(round(result.wall_seconds, 2)),
            "trainable_parameters": MetadataValue.int(result.trainable_parameters),
            "total_parameters": MetadataValue.int(result.total_parameters),
            "device": result.device,
            "precision": result.precision,
            "attn_implementation": result.attn_implementation,
            "padding_efficiency": MetadataValue.float(round(result.padding_efficiency, 4)),
            "peak_memory_gib": MetadataValue.float(round(result.peak_memory_bytes / 2**30, 3)),
            "data_wait_seconds": MetadataValue.float(round(result.data_wait_seconds, 3)),
            "mfu": MetadataValue.float(round(result.mfu, 4)) if result.mfu is not None else "unknown peak",
            "conversations": MetadataValue.json(result.conversations or {}),
            **uri_metadata(result.adapter.uri),
            "sha256": result.adapter.sha256,
            "wandb_run_id": result.wandb_run_id or "disabled",
            "wandb_dir": result.wandb_dir or "disabled",
        },
    )
    checkpoints = [c.to_dict() for c in result.checkpoints]
    yield Output(
        {"fingerprint": result.fingerprint, "checkpoints": checkpoints},
        output_name="training_checkpoints",
        data_version=DataVersion(checkpoints[-1]["sha256"] if checkpoints else "none"),
        metadata={
            **common,
            "count": MetadataValue.int(len(checkpoints)),
            **(uri_metadata(checkpoints[-1]["uri"]) if checkpoints else {}),  # the newest checkpoint
            "checkpoints": MetadataValue.json(checkpoints),
        },
    )


def _train_in_several_processes(
    context, config, settings, artifact_store, base_model, training_dataset, training_runtime
):
    """devices x num_nodes > 1: every process runs the same core entry point; rank 0 publishes and reports."""
    from ..launch import run_torchrun_in_pod, training_request

    request = training_request(
        artifact_root=artifact_store.store().root,
        checkpoint_root=artifact_store.checkpoint_store().root,
        base_model=base_model,
        training_dataset=training_dataset,
        settings=settings,
        runtime=training_runtime.settings(),
        resume=config.resume,
    )
    if settings.num_nodes > 1:
        from ..launch import run_trainjob_for_step

        return run_trainjob_for_step(context, request, settings)
    return run_torchrun_in_pod(request, settings.devices, context.log.info)
