"""Shared fixtures: a tiny real Llama + locally trained tokenizer, and isolated Dagster/artifact folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
SAMPLE_DATASET = REPO_ROOT / "pixtrain_dagster" / "sample_data" / "conversations.jsonl"
sys.path.insert(0, str(TESTS_DIR))

# Tests never talk to W&B servers and never write into the checkout or HOME caches.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast training settings for the tiny model, as Dagster run config.
TINY_TRAINING_CONFIG = {"max_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                        "max_seq_len": 192, "checkpoint_every_n_steps": 2, "learning_rate": 5e-3,
                        "warmup_steps": 1}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_model, training_corpus

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), training_corpus([SAMPLE_DATASET]))


@pytest.fixture
def pipeline_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """Isolated DAGSTER_HOME, artifact root (landing seeded with the sample data) and W&B dir."""
    paths = {
        "dagster_home": tmp_path / "dagster_home",
        "artifact_root": tmp_path / "artifacts",
        "wandb_dir": tmp_path / "wandb",
    }
    for path in paths.values():
        path.mkdir()
    (paths["dagster_home"] / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    landing = paths["artifact_root"] / "landing"
    landing.mkdir()
    (landing / SAMPLE_DATASET.name).write_bytes(SAMPLE_DATASET.read_bytes())
    paths["landing"] = landing
    monkeypatch.setenv("DAGSTER_HOME", str(paths["dagster_home"]))
    monkeypatch.setenv("PIXTRAIN_ARTIFACT_ROOT", str(paths["artifact_root"]))
    monkeypatch.setenv("WANDB_DIR", str(paths["wandb_dir"]))
    for name in ("PIXTRAIN_CHECKPOINT_DIR", "PIXTRAIN_TRAINING_DATA_DIR", "PIXTRAIN_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    return paths


def tiny_run_config(tiny_model_dir: Path, **training_overrides) -> dict:
    """Run config that points base_model at the tiny model and keeps training to a few steps."""
    return {"ops": {
        "base_model": {"config": {"model_ref": str(tiny_model_dir)}},
        "lora_training": {"config": {**TINY_TRAINING_CONFIG, **training_overrides}},
        "adapter_evaluation": {"config": {"sample_replies": 1, "max_new_tokens": 8}},
    }}
