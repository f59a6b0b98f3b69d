"""The Lightning module that trains a PEFT LoRA model on packed chat batches.

Loss: each micro-batch's summed token loss is divided by the labelled-token count of its whole optimizer step
(known ahead: batches are a pure function of the step), so every labelled token weighs the same however the
rows fall into micro-batches. Lightning divides a returned loss by ``accumulate_grad_batches``; the module
multiplies that back.

Hot loop: nothing reads a device value per micro-batch. Losses and gradient norms stay on the device and are
read to the host every ``log_every_n_steps`` optimizer steps and before a checkpoint; token counts are host
integers computed when the batch is built.

Gradient clipping is done here in ``on_before_optimizer_step`` rather than by ``Trainer(gradient_clip_val)``:
Lightning's mixed-precision plugin refuses clipping with a fused optimizer even for bf16, which has no loss
scaler to undo (lightning/pytorch/plugins/precision/amp.py), so the GPU recipe stopped at its first step.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

from .loss import summed_token_loss
from .settings import LoraTrainingSettings
from .sharding import clip_gradients, trainable_parameter_names
from .tokenization import StepIndexedBatches


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to zero at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class PrefetchedBatches:
    """Builds the next ``depth`` batches on a background thread (pinned for an async copy to the GPU).

    Batches are a pure function of the micro-step, so building them ahead changes nothing that is trained.
    """

    def __init__(self, source: Iterator[dict[str, Any]], depth: int = 4, pin_memory: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source, self._pin = source, pin_memory
        self.wait_seconds = 0.0  # time the training loop spent waiting for a batch (the data-wait time)
        self._thread = threading.Thread(target=self._fill, name="pixtrain-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            for batch in self._source:
                if self._pin:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # surfaced in the training loop, not lost in the thread
            self._queue.put(error)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class LoraFineTuning(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        settings: LoraTrainingSettings,
        train_batches: StepIndexedBatches,
        validation_batches: list[dict[str, Any]],
        pin_memory: bool = False,
    ):
        super().__init__()
        self.model = model
        self.settings = settings
        self.train_batches = train_batches
        self.validation_batches = validation_batches
        self.pin_memory = pin_memory
        # Checkpoints hold only the LoRA weights; the frozen base comes from the snapshot on load.
        self.strict_loading = False
        self.next_micro_step = 0
        self.trained_tokens = 0  # tokens that carried loss (assistant tokens)
        self.input_tokens = 0  # every non-padding token processed
        self.padded_tokens = 0  # every position processed, padding included
        self._rng_state_to_restore: dict[str, Any] | None = None
        self._val_loss_sum: torch.Tensor | float = 0.0
        self._val_token_count = 0
        self.last_validation_loss: float | None = None
        self.train_losses: list[float] = []  # one per optimizer step, read from the device at log intervals
        self.grad_norms: list[float] = []  # pre-clipping gradient norm, one per optimizer step
        self._step_loss: torch.Tensor | None = None
        self._unread_losses: list[torch.Tensor] = []
        self._unread_grad_norms: list[torch.Tensor] = []
        self._trainable: list[torch.nn.Parameter] = []
        self.prefetcher: PrefetchedBatches | None = None
        self.mfu: float | None = None  # set at log intervals on GPUs with a known peak (core/throughput.py)

    @property
    def padding_efficiency(self) -> float:
        return self.input_tokens / self.padded_tokens if self.padded_tokens else 0.0

    # ---- data ---------------------------------------------------------------------------------------
    def train_dataloader(self):
        # Lightning calls this after restoring a checkpoint, so a resumed run starts at the next untrained batch.
        self._close_prefetcher()
        self.prefetcher = PrefetchedBatches(
            self.train_batches.iterate_from(self.next_micro_step), pin_memory=self.pin_memory
        )
        return self.prefetcher

    def val_dataloader(self):
        return _BatchSequence(self.validation_batches)

    def _close_prefetcher(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def on_train_end(self) -> None:
        self.flush_step_metrics()
        self._close_prefetcher()

    def on_exception(self, exception: BaseException) -> None:
        self._close_prefetcher()

    # ---- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss_sum, _ = summed_token_loss(self.model, batch, self.settings.loss_chunk_tokens)
        step_loss = loss_sum / max(batch["step_label_tokens"], 1)
        micro_step = int(batch["micro_step"])
        accumulation = self.settings.gradient_accumulation_steps
        first_of_step = micro_step % accumulation == 0
        self._step_loss = step_loss.detach() if first_of_step else self._step_loss + step_loss.detach()
        if micro_step % accumulation == accumulation - 1:
            self._unread_losses.append(self._step_loss)
        self.next_micro_step = micro_step + 1
        # Global counts (every rank's rows; see StepIndexedBatches), so every rank's counters and checkpoints agree.
        self.trained_tokens += batch["label_tokens"]
        self.input_tokens += batch["real_tokens"]
        self.padded_tokens += batch["positions"]
        # Lightning divides by the accumulation, and DDP/FSDP average gradients over ranks: undo both, so the
        # step's gradient is the sum over every labelled token of the global batch / that token count.
        return step_loss * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._trainable:
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        norm = clip_gradients(self.trainer.strategy.model, self._trainable, self.settings.gradient_clip_norm)
        self._unread_grad_norms.append(norm.detach())

    def flush_step_metrics(self) -> None:
        """Read the optimizer steps' losses and gradient norms from the device: one synchronisation."""
        if self._unread_losses:
            # Each rank holds its rows' share of every step loss: the sum over ranks is the step loss.
            losses = self.trainer.strategy.reduce(torch.stack(self._unread_losses).float(), reduce_op="sum")
            self.train_losses += losses.cpu().tolist()
            self._unread_losses = []
        if self._unread_grad_norms:
            self.grad_norms += torch.stack(self._unread_grad_norms).float().cpu().tolist()
            self._unread_grad_norms = []

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum, self._val_token_count = 0.0, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, _ = summed_token_loss(self.model, batch, self.settings.loss_chunk_tokens)
        self._val_loss_sum = self._val_loss_sum + loss_sum.detach()
        self._val_token_count += batch["label_tokens"]

    def on_validation_epoch_end(self) -> None:
        if self._val_token_count:
            self.last_validation_loss = float(self._val_loss_sum) / self._val_token_count
            # Every rank validates the whole set, so the mean over ranks is this same value (no-op on one process).
            self.log("val/loss", self.last_validation_loss, sync_dist=True)

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
        self.flush_step_metrics()
        trainable = trainable_parameter_names(self)  # FSDP's wrappers show in named_parameters, not in state dicts
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["pixtrain"] = {
            "next_micro_step": self.next_micro_step,
            "trained_tokens": self.trained_tokens,
            "input_tokens": self.input_tokens,
            "padded_tokens": self.padded_tokens,
            "train_losses": self.train_losses,
            "grad_norms": self.grad_norms,
            # Dropout draws from these generators: restoring them makes a resumed run bit-for-bit the same.
            "rng_states_by_rank": rng_states_of_every_rank(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["pixtrain"]
        self.next_micro_step = state["next_micro_step"]
        self.trained_tokens = state["trained_tokens"]
        self.input_tokens = state["input_tokens"]
        self.padded_tokens = state["padded_tokens"]
        self.train_losses = list(state["train_losses"])
        self.grad_norms = list(state["grad_norms"])
        self._rng_state_to_restore = state

    def on_train_start(self) -> None:
        if self._rng_state_to_restore is not None:
            restore_rng_state(self._rng_state_to_restore)
            self._rng_state_to_restore = None


def _own_rng_state() -> dict[str, Any]:
    """This process's generators: the CPU one and its current GPU's (the one its dropout draws from)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def rng_states_of_every_rank() -> list[dict[str, Any]]:
    """Every rank's generators, by global rank (a collective: every rank calls it, as every rank saves a
    checkpoint; rank 0 writes it). Each rank draws its own dropout masks, so each needs its own state back."""
    import torch.distributed as dist

    own = _own_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


def restore_rng_state(saved: dict[str, Any]) -> None:
    """Put this rank's generators back as the checkpoint recorded them. A run resumed on another world size takes
    the state of the rank with its number modulo the old world size (bit-for-bit resumes need the same world
    size anyway: the rows each rank trains change). Checkpoints from before per-rank states hold rank 0's CPU
    state and every GPU's state as rank 0 saw them."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if "rng_states_by_rank" in saved:
        states = saved["rng_states_by_rank"]
        mine = states[rank % len(states)]
    else:
        per_device = saved.get("cuda_rng_state")
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = per_device[device] if per_device and device < len(per_device) else None
        mine = {"torch": saved["torch_rng_state"], "cuda": cuda}
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])  # the current device's: set_rng_state_all fails on fewer GPUs


class _BatchSequence:
    """Pre-collated batches as one loader: Lightning would read a bare list as several dataloaders."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
