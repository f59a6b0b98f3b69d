"""Checkpoints load without arbitrary unpickling: a malicious pickle is refused, a real one loads."""

import os
import pickle

import pytest
import torch

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.safe_load import UnsafeCheckpointError, load_checkpoint_safely
from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings

from support import SAMPLE_DATASET


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused to load checkpoint .*Nothing in it was executed"):
        load_checkpoint_safely(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the unsafe load really would have run it: the test can fail
    assert marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "old-style.ckpt"
    path.write_bytes(pickle.dumps({"x": _Exploit(tmp_path / "pwned")}))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_safely(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_real_lightning_checkpoint_from_tiny_training_loads(tmp_path, tiny_model_dir):
    from pixtrain_dagster.core.training import train_lora_adapter

    rows = load_conversations(SAMPLE_DATASET)
    store = ArtifactStore(tmp_path / "store")
    settings = LoraTrainingSettings(
        max_steps=2,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        max_seq_len=256,
        learning_rate=5e-3,
        warmup_steps=1,
        checkpoint_every_n_steps=2,
        seed=11,
    )
    train_lora_adapter(
        store=store,
        base_snapshot_dir=tiny_model_dir,
        base_model_sha256="b",
        dataset_sha256="d",
        train_conversations=rows[:10],
        validation_conversations=rows[10:12],
        runtime=RuntimeSettings(device="cpu", wandb_mode="disabled"),
        settings=settings,
        base_model_name="models/tiny-llama",
    )
    [checkpoint] = list((tmp_path / "store").rglob("checkpoint.ckpt"))
    state = load_checkpoint_safely(checkpoint)
    assert state["global_step"] == 2 and state["pixtrain"]["input_tokens"] > 0
    assert state["state_dict"] and all(isinstance(v, torch.Tensor) for v in state["state_dict"].values())
    assert state["optimizer_states"] and state["lr_schedulers"]
