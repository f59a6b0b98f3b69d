"""Shared fixtures: a tiny real Llama + locally trained tokenizer, and isolated Dagster/artifact folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test modules import `support` and `tiny_model` from here

from support import SAMPLE_DATASET  # noqa: E402

# Tests never talk to W&B servers or a model hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
