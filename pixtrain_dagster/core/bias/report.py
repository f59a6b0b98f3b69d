"""End to end: `BiasSettings` (what is scored and how) and `run_bias_report`, which loads the base snapshot, scores
it, applies the LoRA adapter, scores again and builds the report. peft and the model loader are imported inside
the function.

Cost (measured, SmolLM2-135M, 2 CPU cores, defaults: 2 templates, 1 generated): ~22 s per model, ~50 s for
`run_bias_report` including loading. On CUDA, `load_snapshot` gives bf16 weights, which adds rounding noise to the
log-likelihoods (not measured: this was built without a GPU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .probes import load_probe_set
from .scoring import score_model
from .statistics import build_report
from .verdict import BiasThresholds


@dataclass(frozen=True)
class BiasSettings:
    """What `run_bias_report` scores and how. Defaults fit the CPU demo (SmolLM2-135M, 2 cores)."""

    max_templates: int | None = 2  # templates scored (each with all its reference replies); None = all 8
    generation_templates: int = 1  # of those, templates whose replies are generated per group (the slow part)
    max_new_tokens: int = 24
    batch_size: int = 32  # prompts per forward pass; 32 covers the 31 groups of a template in one pass
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    thresholds: BiasThresholds = field(default_factory=BiasThresholds)


def run_bias_report(
    base_snapshot_dir: Path,
    adapter_dir: Path,
    settings: BiasSettings | None = None,
    device: str = "cpu",
    previous_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the base snapshot, score it, apply the LoRA adapter, score again, and build the report."""
    from peft import PeftModel

    from ..models import load_snapshot
    from ..warning_filters import install_library_filters

    install_library_filters()
    settings = settings or BiasSettings()
    started = time.perf_counter()
    probes = load_probe_set(settings.max_templates)
    model, tokenizer = load_snapshot(Path(base_snapshot_dir), device=device, for_training=False)
    model.eval()
    scoring = {
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "generation_templates": settings.generation_templates,
    }
    base_scores = score_model(model, tokenizer, probes, **scoring)
    adapted = PeftModel.from_pretrained(model, Path(adapter_dir))
    adapted.eval()
    adapter_scores = score_model(adapted, tokenizer, probes, **scoring)
    report = build_report(
        base_scores,
        adapter_scores,
        previous=previous_report,
        thresholds=settings.thresholds,
        seed=settings.seed,
        resamples=settings.bootstrap_resamples,
        confidence=settings.confidence,
        probe_set=probes,
    )
    report["settings"] = {**asdict(settings), "thresholds": settings.thresholds.to_dict(), "device": device}
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
