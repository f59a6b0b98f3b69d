"""LoRA training on the tiny model: the saved adapter reloads exactly, and a crashed run resumes exactly."""

from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.checkpoints import latest_valid_checkpoint
from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings
from pixtrain_dagster.core.training import train_lora_adapter

from support import SAMPLE_DATASET, tiny_training_settings

SETTINGS = tiny_training_settings(seed=11)
RUNTIME = RuntimeSettings(device="cpu", wandb_mode="disabled")


class CrashAfterStep(L.Callback):
    """Simulates a pod killed mid-run: raises once the trainer has finished ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash after step {self.step}")


@pytest.fixture(scope="module")
def conversations():
    rows = load_conversations(SAMPLE_DATASET)
    return rows[:40], rows[40:46]


def train(store, tiny_model_dir, conversations, **kwargs):
    train_rows, validation_rows = conversations
    return train_lora_adapter(
        store=store,
        base_snapshot_dir=tiny_model_dir,
        base_model_sha256="base",
        dataset_sha256="data",
        train_conversations=train_rows,
        validation_conversations=validation_rows,
        runtime=RUNTIME,
        base_model_name="models/tiny-llama",
        **{"settings": SETTINGS, **kwargs},
    )


def adapter_weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.adapter.uri) / "adapter_model.safetensors")


def test_saved_adapter_reloads_with_peft_and_gives_the_same_logits(tmp_path, tiny_model_dir, conversations):
    store = ArtifactStore(tmp_path / "artifacts")
    result = train(store, tiny_model_dir, conversations)
    assert result.final_step == 6 and result.steps_this_run == 6 and result.resumed_from_step == 0
    assert result.trainable_parameters > 0 and result.tokens_per_second > 0
    assert [Path(c.uri).name for c in result.checkpoints] == ["step-000002", "step-000004", "step-000006"]
    adapter_dir = Path(result.adapter.uri)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter_dir.iterdir()
    }

    # Rebuild the trained model independently: base weights + the newest checkpoint's LoRA weights.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    checkpoint = torch.load(Path(result.checkpoints[-1].uri) / "checkpoint.ckpt", weights_only=False)
    trained_lora = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    reloaded_lora = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert set(reloaded_lora) == set(trained_lora)
    for name, value in trained_lora.items():
        torch.testing.assert_close(reloaded_lora[name], value)
    assert any(v.abs().sum() > 0 for k, v in trained_lora.items() if "lora_B" in k)  # training changed the adapter

    ids = torch.tensor([[1, 5, 9, 20, 33, 2]])
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        adapted_logits = reloaded(input_ids=ids).logits
        base_logits = fresh_base(input_ids=ids).logits
        merged = reloaded.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
    torch.testing.assert_close(adapted_logits, merged, atol=1e-5, rtol=1e-5)


def test_crashed_run_resumes_from_its_last_checkpoint_and_ends_like_an_uninterrupted_run(
    tmp_path, tiny_model_dir, conversations
):
    uninterrupted = train(ArtifactStore(tmp_path / "a"), tiny_model_dir, conversations)

    store = ArtifactStore(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash after step 3"):
        train(store, tiny_model_dir, conversations, extra_callbacks=[CrashAfterStep(3)])
    assert latest_valid_checkpoint(store, uninterrupted.fingerprint).endswith("step-000002")
    assert not store.exists(f"adapters/{uninterrupted.fingerprint}")  # no adapter from a crashed run

    resumed = train(store, tiny_model_dir, conversations)
    assert resumed.resumed_from_step == 2 and resumed.steps_this_run == 4 and resumed.final_step == 6
    assert resumed.train_losses == pytest.approx(uninterrupted.train_losses, abs=1e-6)
    expected, actual = adapter_weights(uninterrupted), adapter_weights(resumed)
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-6)

    # Same inputs, same adapter bytes, wherever the stores live.
    assert resumed.adapter.sha256 == uninterrupted.adapter.sha256

    # Materialising again with the same inputs finds the final checkpoint and trains nothing.
    again = train(store, tiny_model_dir, conversations)
    assert again.resumed_from_step == 6 and again.steps_this_run == 0
    assert again.adapter.sha256 == resumed.adapter.sha256


def test_changing_a_setting_starts_a_new_run(tmp_path, tiny_model_dir, conversations):
    store = ArtifactStore(tmp_path / "c")
    first = train(store, tiny_model_dir, conversations, settings=SETTINGS)
    other = train(
        store, tiny_model_dir, conversations, settings=LoraTrainingSettings(**{**SETTINGS.__dict__, "lora_r": 4})
    )
    assert other.fingerprint != first.fingerprint and other.resumed_from_step == 0


def test_invalid_settings_name_the_field():
    with pytest.raises(ValueError, match=r"max_steps must be >= 1.*lora_dropout must be in \[0, 1\)"):
        LoraTrainingSettings(max_steps=0, lora_dropout=1.5)
