"""Library warnings and tips that say nothing a user of this pipeline can act on, silenced one by one.

``install_library_filters()`` runs at the start of every entry point that trains or evaluates (training,
evaluation, bias report, the torchrun worker) and, through ``pixtrain_dagster.warning_filters``, whenever the code
location is loaded, so it applies in every process that does the work. It imports nothing heavy: filters match by
message, category and emitting module, not by importing a library's warning classes.

Each filter names one message from one module. Anything else (a NaN loss, an out-of-memory hint, a misconfigured
device, a new deprecation) still reaches the user. What was ours to change is fixed where it happens instead:
``Trainer.save_checkpoint(weights_only=False)``, ``save_pretrained(save_embedding_layers=False)`` (no hub lookup for
a local snapshot), ``self.log(..., sync_dist=True)``, no ``anonymous`` for wandb, ``OMP_NUM_THREADS`` for torchrun.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, message regex, emitting module regex): warnings raised inside libraries by other libraries.
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # PEFT's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers 5 renamed; PEFT's
    # concern, and it changes nothing for us (gradient checkpointing is set explicitly in core/training.py).
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils$"),
    # Lightning's own pytree helper uses torch's deprecated LeafSpec check; Lightning's concern, harmless.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree$"),
)

# Lightning's rank-zero INFO lines that are advertising or repeat what the step records itself (device and
# precision are in the training summary). Lightning's *warnings*, e.g. "GPU available but not used", stay.
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"
LIGHTNING_NOISE = re.compile(
    r"💡 Tip: |GPU available: \w+( \(\w+\))?, used: \w+$|TPU available: \w+, using: \d+ TPU cores$"
)


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_NOISE.match(record.getMessage())


_LIGHTNING_FILTER = _DropLightningNoise()


def install_library_filters() -> None:
    """Silence exactly the library warnings above; idempotent (repeated calls add nothing)."""
    for category, message, module in LIBRARY_WARNINGS:
        # filterwarnings drops an identical existing entry before inserting, so calling this again is harmless.
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logging.getLogger(LIGHTNING_INFO_LOGGER).addFilter(_LIGHTNING_FILTER)  # a no-op when already added
