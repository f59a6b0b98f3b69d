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


def run_two_gloo_processes(tmp_path: Path, script: str, *args: str, timeout: int = 120) -> None:
    """``script`` as two torchrun processes on this machine (gloo on CPU), one OpenMP thread each."""
    path = tmp_path / "two_processes.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]


_DECIDE_SCRIPT = """
import json, os, sys

import torch.distributed as dist

from pixtrain_dagster.core.training import rank_zero_decides

asked = []
rank = int(os.environ["RANK"])
# Each rank's own view of the shared checkpoints differs (a stale listing on rank 1): rank 0's answer counts.
answer = rank_zero_decides(lambda: asked.append(rank) or f"checkpoints/step-00000{4 - 2 * rank}")
with open(sys.argv[1] + f".{rank}", "w") as out:
    json.dump({"answer": answer, "asked": asked, "backend": dist.get_backend()}, out)
"""


def test_every_rank_resumes_from_the_checkpoint_rank_zero_chose(tmp_path):
    """Which checkpoint to resume from is decided once, on rank 0, and sent to every rank: ranks that each listed
    a shared volume themselves could pick different steps and then wait on each other's collectives until the
    timeout. The process group it starts is the one Lightning then reuses (tests above resume two nodes)."""
    out = tmp_path / "decided"
    run_two_gloo_processes(tmp_path, _DECIDE_SCRIPT, str(out))
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert [r["answer"] for r in ranks] == ["checkpoints/step-000004"] * 2
    assert [r["asked"] for r in ranks] == [[0], []]  # only rank 0 looked
    assert ranks[0]["backend"] == "gloo"  # on CPU; nccl where CUDA is initialised, as Lightning would choose


_RNG_SCRIPT = """
import json, sys

import torch
import torch.distributed as dist

from pixtrain_dagster.core.lightning_module import restore_rng_state, rng_states_of_every_rank

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(100 + rank)  # each rank's dropout draws its own masks
torch.rand(rank + 3)
saved = {"rng_states_by_rank": rng_states_of_every_rank()}  # what every rank's checkpoint hook gathers
after_save = torch.rand(4).tolist()
torch.rand(1000)  # the crash and restart: whatever happened since
restore_rng_state(saved)
restored = torch.rand(4).tolist()
torch.manual_seed(0)
restore_rng_state({"torch_rng_state": saved["rng_states_by_rank"][0]["torch"], "cuda_rng_state": None})  # old format
old_format = torch.rand(4).tolist()
with open(sys.argv[1] + f".{rank}", "w") as out:
    json.dump({"after_save": after_save, "restored": restored, "old_format": old_format}, out)
dist.destroy_process_group()
"""


def test_every_rank_gets_its_own_random_state_back_on_resume(tmp_path):
    """Each rank draws its own dropout masks, so a checkpoint keeps every rank's generator state (gathered from all
    ranks, written by rank 0) and each rank restores its own; a run's old checkpoint (rank 0's state only) still
    loads. CUDA's generator is saved and restored the same way, for the current device only."""
    out = tmp_path / "rng"
    run_two_gloo_processes(tmp_path, _RNG_SCRIPT, str(out))
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for found in ranks:
        assert found["restored"] == found["after_save"]
    assert ranks[0]["after_save"] != ranks[1]["after_save"]  # so rank 1 taking rank 0's state would differ
    assert ranks[1]["old_format"] == ranks[0]["after_save"]  # the old format: rank 0's state on every rank


_FSDP_SCRIPT = """
import copy, json, sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from transformers import AutoTokenizer

from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.loss import summed_token_loss
from pixtrain_dagster.core.settings import LoraTrainingSettings
from pixtrain_dagster.core.sharding import clip_gradients, trainable_full_state_dict, trainable_parameter_names
from pixtrain_dagster.core.tokenization import collate, pack_rows, tokenize_conversations
from pixtrain_dagster.core.training import _decoder_layer_class, _setup_model, _strategy

tiny, sample, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
dist.init_process_group("gloo")
settings = LoraTrainingSettings(**json.loads(sys.argv[4]))


class Loss(torch.nn.Module):  # what Lightning's FSDP root wraps: a module whose forward runs the training step
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return summed_token_loss(self.model, batch)[0]


torch.manual_seed(0)
model, _ = _setup_model(tiny, settings, "cpu", settings.precision)
reference = Loss(copy.deepcopy(model))
strategy = _strategy(settings, _decoder_layer_class(model))
root = FSDP(
    Loss(model),
    auto_wrap_policy=strategy.kwargs["auto_wrap_policy"],
    use_orig_params=strategy.kwargs["use_orig_params"],
    sharding_strategy=strategy.sharding_strategy,
    mixed_precision=FSDPPrecision(settings.precision).mixed_precision_config,
    device_id=torch.device("cpu"),  # Lightning passes the GPU's index
)
units = [name for name, module in root.named_modules() if isinstance(module, FSDP)]
tokenizer = AutoTokenizer.from_pretrained(tiny)
conversations = tokenize_conversations(tokenizer, load_conversations(sample)[:6], 192).conversations
batch = collate(pack_rows(conversations, 192, pack=True), tokenizer.pad_token_id)  # the same rows on both ranks

root(batch).backward()  # FSDP averages the two ranks' (equal) gradients: the reference's gradient
reference(batch).backward()
local = [p for p in root.parameters() if p.requires_grad and p.grad is not None]
local_norm = float(torch.nn.utils.clip_grad_norm_(local, float("inf")))  # this rank's shard only
norm = float(clip_gradients(root, local, 1e9))
expected = float(torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1e9))
with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
    full = root.state_dict()
names = trainable_parameter_names(root)
trainable_only = trainable_full_state_dict(root)  # what checkpoints gather (the strategy's state dict)
if dist.get_rank() == 0:
    saved = {k: v for k, v in full.items() if k in names}
    want = {k: v for k, v in reference.state_dict().items() if k in trainable_parameter_names(reference)}
    out.write_text(json.dumps({
        "units": units,
        "saved": sorted(saved),
        "want": sorted(want),
        "equal": all(torch.equal(saved[k], want[k]) for k in want if k in saved),
        "trainable_only": sorted(trainable_only),
        "trainable_only_equal": all(torch.equal(trainable_only[k], want[k]) for k in want if k in trainable_only),
        "full_keys": len(full),
        "dtypes": sorted({str(v.dtype) for v in saved.values()}),
        "norm": norm,
        "local_norm": local_norm,
        "expected": expected,
    }))
dist.destroy_process_group()
"""


def test_fsdp_wraps_a_bf16_base_with_fp32_lora_clips_globally_and_saves_the_lora_weights(tmp_path, tiny_model_dir):
    """The GPU recipe's FSDP wrapping, run for real as two CPU processes (gloo): the strategy's own wrap policy over
    a bf16 base with fp32 LoRA weights (one dtype a unit: FSDP refuses to flatten mixed dtypes), the gradient norm
    over both ranks' shards, and the LoRA weights gathered alone under the names training saves. Lightning's
    FSDPStrategy itself refuses a CPU accelerator; the two-GPU run is in tests/test_gpu_only.py."""
    settings = replace(SETTINGS, devices=2, strategy="fsdp", precision="bf16-mixed")
    out = tmp_path / "fsdp.json"
    arguments = (str(tiny_model_dir), str(SAMPLE_DATASET), str(out), json.dumps(asdict(settings)))
    run_two_gloo_processes(tmp_path, _FSDP_SCRIPT, *arguments, timeout=300)
    found = json.loads(out.read_text())
    layers = [u for u in found["units"] if u.endswith(tuple(f"layers.{i}" for i in range(8)))]
    assert layers and any(".lora_A." in u for u in found["units"]), found["units"]
    assert found["saved"] and found["saved"] == found["want"] and found["equal"], found
    assert found["dtypes"] == ["torch.float32"]  # LoRA stays fp32 in the checkpoint and the adapter
    # Checkpoints gather only the LoRA weights, not every frozen base weight into rank 0's memory first.
    assert found["trainable_only"] == found["want"] and found["trainable_only_equal"], found
    assert found["full_keys"] > len(found["want"])
    assert found["norm"] == pytest.approx(found["expected"], rel=2e-2)
    assert found["local_norm"] < 0.9 * found["expected"]  # what a per-rank norm would have clipped by
