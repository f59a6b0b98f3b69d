"""Two-process DDP on CPU (gloo), launched the way a Kubeflow TrainJob launches it: one `torchrun` per "node" on
127.0.0.1, configured only through the PET_* variables the TrainJob's torch runtime injects.

Tolerance: the two-process run sums each rank's gradient in a different order than one process summing the whole
batch, so values agree to float32 rounding (1e-5 here), not bit for bit. Dropout is off: each rank draws dropout
masks for its own rows, so with dropout the runs agree in distribution only.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.checkpoints import KILL_AFTER_CHECKPOINT_ENV
from pixtrain_dagster.core.distributed import TrainingRequest, result_path, run
from pixtrain_dagster.core.settings import LoraTrainingSettings
from pixtrain_dagster.core.training import checkpoint_prefix

from support import SAMPLE_DATASET, tiny_training_settings

SETTINGS = tiny_training_settings(
    seed=9,
    lora_dropout=0.0,
    precision="32-true",
)
TWO_NODES = replace(SETTINGS, num_nodes=2, devices=1)


def seeded_store(root: Path, tiny_model_dir: Path) -> ArtifactStore:
    store = ArtifactStore(root)
    with store.stage() as folder:
        shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
        store.publish(folder, "models/tiny")
    lines = SAMPLE_DATASET.read_text().splitlines()
    with store.stage() as folder:
        (folder / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
        (folder / "validation.jsonl").write_text("\n".join(lines[40:44]) + "\n")
        store.publish(folder, "datasets/sample")
    return store


def request_for(store: ArtifactStore, settings: LoraTrainingSettings, folder: Path) -> Path:
    request = TrainingRequest(
        artifact_root=str(store.root),
        checkpoint_root=str(store.root),
        base_snapshot_key="models/tiny",
        base_model_sha256="base",
        dataset_key="datasets/sample",
        dataset_sha256="data",
        settings=asdict(settings),
        runtime={"device": "cpu", "wandb_mode": "disabled"},
    )
    path = folder / "request.json"
    path.write_text(request.to_json())
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_nodes(request: Path, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents, node ranks 0 and 1, as two TrainJob pods would run them."""
    port = free_port()
    processes = []
    for node_rank in (0, 1):
        env = {
            **os.environ,
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(node_rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "-m",
                    "pixtrain_dagster.core.distributed",
                    "--request",
                    str(request),
                ],
                env=env,
                cwd=Path(__file__).parent.parent,
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float = 600) -> None:
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The same training in one process with the same global batch."""
    folder = tmp_path_factory.mktemp("single")
    store = seeded_store(folder / "artifacts", tiny_model_dir)
    return run(request_for(store, SETTINGS, folder))


def adapter_weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(summary["adapter"]["uri"]) / "adapter_model.safetensors")


def assert_same_training(summary: dict, reference: dict) -> None:
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert summary["final_step"] == reference["final_step"] == 6
    assert summary["trained_tokens"] == reference["trained_tokens"]  # the same rows, split across ranks
    assert summary["train_losses"] == pytest.approx(reference["train_losses"], abs=1e-5)
    expected, actual = adapter_weights(reference), adapter_weights(summary)
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4)


def test_two_node_ddp_equals_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, reference):
    store = seeded_store(tmp_path / "artifacts", tiny_model_dir)
    request = request_for(store, TWO_NODES, tmp_path)
    wait_all(launch_two_nodes(request))
    summary = json.loads(result_path(request).read_text())
    assert summary["fingerprint"] == reference["fingerprint"]  # world size is not part of a run's identity
    assert_same_training(summary, reference)
    # Only rank 0 published: one adapter, one set of checkpoints.
    assert store.list(checkpoint_prefix(summary["fingerprint"]))[-1].endswith("step-000006")


def test_a_killed_two_node_run_resumes_to_the_same_result(tmp_path, tiny_model_dir, reference):
    store = seeded_store(tmp_path / "artifacts", tiny_model_dir)
    request = request_for(store, TWO_NODES, tmp_path)
    # Rank 0 SIGKILLs itself right after publishing checkpoint 2 (the hook, as an OOM kill would); rank 1 then
    # waits in the next collective, so no later checkpoint can appear. Polling for the checkpoint and killing
    # from here instead raced the tiny model's fast steps (under load it sometimes finished first).
    processes = launch_two_nodes(request, {KILL_AFTER_CHECKPOINT_ENV: "2"})
    deadline = time.monotonic() + 600
    prefix = checkpoint_prefix(reference["fingerprint"])
    while not store.list(prefix) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in processes:  # the torchrun agents and their workers: the rest of both "pods"
        try:
            tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
        except psutil.NoSuchProcess:  # node 0's agent may already have exited after its worker died
            tree = []
        for member in tree:
            try:
                member.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        process.communicate()
    assert [key.rsplit("-", 1)[1] for key in store.list(prefix)] == ["000002"]
    assert not result_path(request).exists()
    killed_at = 2

    wait_all(launch_two_nodes(request))
    summary = json.loads(result_path(request).read_text())
    assert summary["resumed_from_step"] == killed_at
    assert_same_training(summary, reference)


def test_impossible_scale_out_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="micro_batch_size \\(3\\) counts rows across all 2 devices"):
        LoraTrainingSettings(micro_batch_size=3, devices=2)
    with pytest.raises(ValueError, match="strategy fsdp shards over several devices"):
        LoraTrainingSettings(strategy="fsdp")
    with pytest.raises(ValueError, match="strategy must be one of auto, ddp, fsdp"):
        LoraTrainingSettings(strategy="deepspeed")
    from pixtrain_dagster.core.training import process_rank

    with pytest.raises(ValueError, match="start multi-process training with `torchrun"):
        process_rank(LoraTrainingSettings(devices=2))


def test_the_training_step_runs_several_processes_inside_its_pod(pipeline_env, tiny_model_dir, monkeypatch):
    """devices: 2 through Dagster: the step runs torchrun --standalone with two processes (gloo on CPU), publishes
    rank 0's adapter, and records its checkpoints. The step's CPU budget (OMP_NUM_THREADS, in a pod its CPU limit)
    is split between the processes."""
    from support import TRAINING_ASSETS, materialized_metadata, run_job, run_log_messages, tiny_run_config

    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    result = run_job(tiny_run_config(tiny_model_dir, devices=2, max_steps=2, lora_dropout=0.0), TRAINING_ASSETS)
    assert result.success
    metadata = materialized_metadata(result, "lora_adapter")
    assert metadata["steps"] == 2 and metadata["tokens_per_second"] > 0
    logs = run_log_messages(result)
    assert any("launching 2 training processes" in m for m in logs)
    assert any("[rank 1]" in m for m in logs)  # the second process's output reached the run's log
    threads = sorted(m.split("] ", 1)[0] + "]: " + m.rsplit(": ", 1)[1] for m in logs if "CPU threads" in m)
    assert threads == ["[rank 0]: 2 CPU threads", "[rank 1]: 2 CPU threads"], threads
    store = ArtifactStore(pipeline_env["artifact_root"])
    assert store.exists(store.key_of(metadata["dagster/uri"]))


@pytest.mark.parametrize(
    ("budget", "processes", "expected"),
    [("16", 2, 8), ("16", 3, 5), ("2", 8, 1), (None, 1, "all"), ("", 2, "half"), ("four", 2, "half"), ("0", 1, "all")],
)
def test_each_worker_in_a_pod_gets_its_share_of_the_cpu_budget(budget, processes, expected):
    from pixtrain_dagster.launch import omp_threads_per_worker, usable_cpus

    environ = {} if budget is None else {"OMP_NUM_THREADS": budget}
    usable = usable_cpus()  # no valid budget: the CPUs this process may use
    want = {"all": usable, "half": max(1, usable // 2)}.get(expected, expected)
    assert omp_threads_per_worker(processes, environ) == want


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("max 100000", None), (None, None)],
)
def test_usable_cpus_follow_a_container_cpu_quota(tmp_path, cpu_max, cap):
    """docker --cpus 2 on a 64-core host: the affinity says 64, the cgroup quota 2."""
    from pixtrain_dagster.launch import usable_cpus

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (affinity if cap is None else min(affinity, cap))


def test_fsdp_is_configured_to_shard_decoder_layers_and_save_full_state(tiny_model_dir):
    """The FSDP run itself needs GPUs (tests/test_gpu_only.py); its configuration is checked here."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from pixtrain_dagster.core.training import _strategy

    strategy = _strategy(replace(SETTINGS, devices=2, strategy="fsdp"), LlamaDecoderLayer)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen base and LoRA weights share wrapped modules
    assert strategy._state_dict_type == "full"  # resumable on another world size
    assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes
