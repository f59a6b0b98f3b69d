"""The Lightning module that trains a PEFT LoRA model on packed chat batches."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from .settings import LoraTrainingSettings
from .tokenization import StepIndexedBatches, summed_token_loss


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to zero at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LoraFineTuning(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        settings: LoraTrainingSettings,
        train_batches: StepIndexedBatches,
        validation_batches: list[dict[str, Any]],
    ):
        super().__init__()
        self.model = model
        self.settings = settings
        self.train_batches = train_batches
        self.validation_batches = validation_batches
        # Checkpoints hold only the LoRA weights; the frozen base comes from the snapshot on load.
        self.strict_loading = False
        self.next_micro_step = 0
        self.trained_tokens = 0  # tokens that carried loss (assistant tokens)
        self.input_tokens = 0  # every non-padding token processed
        self._rng_state_to_restore: dict[str, Any] | None = None
        self._val_loss_sum = 0.0
        self._val_token_count = 0
        self.last_validation_loss: float | None = None
        self.train_losses: list[float] = []

    # ---- data ---------------------------------------------------------------------------------------
    def train_dataloader(self):
        # Lightning calls this after restoring a checkpoint, so a resumed run starts at the next untrained batch.
        return self.train_batches.iterate_from(self.next_micro_step)

    def val_dataloader(self):
        return _BatchSequence(self.validation_batches)

    # ---- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss_sum, tokens = summed_token_loss(self.model, batch)
        loss = loss_sum / tokens.clamp(min=1)
        self.next_micro_step = int(batch["micro_step"]) + 1
        self.trained_tokens += int(tokens)
        self.input_tokens += int(batch["real_tokens"])
        self.train_losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].size(0))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum, self._val_token_count = 0.0, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, tokens = summed_token_loss(self.model, batch)
        self._val_loss_sum += float(loss_sum)
        self._val_token_count += int(tokens)

    def on_validation_epoch_end(self) -> None:
        if self._val_token_count:
            self.last_validation_loss = self._val_loss_sum / self._val_token_count
            self.log("val/loss", self.last_validation_loss)

    # ---- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay, fused=True
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.settings.warmup_steps, self.settings.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checkpoint contents ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["pixtrain"] = {
            "next_micro_step": self.next_micro_step,
            "trained_tokens": self.trained_tokens,
            "input_tokens": self.input_tokens,
            "train_losses": self.train_losses,
            # Dropout draws from these generators: restoring them makes a resumed run bit-for-bit the same.
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["pixtrain"]
        self.next_micro_step = state["next_micro_step"]
        self.trained_tokens = state["trained_tokens"]
        self.input_tokens = state["input_tokens"]
        self.train_losses = list(state["train_losses"])
        self._rng_state_to_restore = state

    def on_train_start(self) -> None:
        if self._rng_state_to_restore is not None:
            torch.set_rng_state(self._rng_state_to_restore["torch_rng_state"])
            if self._rng_state_to_restore["cuda_rng_state"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_state_to_restore["cuda_rng_state"])
            self._rng_state_to_restore = None


class _BatchSequence:
    """Pre-collated batches as one loader: Lightning would read a bare list as several dataloaders."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
