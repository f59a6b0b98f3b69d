"""num_nodes: 2 through Dagster, end to end: the lora_training step writes its request to the artifact volume,
creates a TrainJob and waits; a stand-in for the Trainer controller (tests/fake_kube.py's in-memory API) runs the
TrainJob's own command as two torchrun "pods" on 127.0.0.1 with the PET_* variables the torch runtime injects;
the step then publishes rank 0's adapter exactly as the single-pod path does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.trainjob import KubeApis

from fake_kube import FakeCluster

REPO = Path(__file__).parent.parent


class TrainerController:
    """Starts one process per TrainJob node from the TrainJob's command, reports Running, then Complete/Failed."""

    def __init__(self, cluster: FakeCluster):
        self.cluster, self.processes = cluster, []

    def __call__(self, cluster: FakeCluster, poll: int) -> None:
        ((namespace, name),) = cluster.trainjobs
        job = cluster.trainjobs[(namespace, name)]
        if not self.processes:
            nodes = job["spec"]["trainer"]["numNodes"]
            command = job["spec"]["trainer"]["command"]
            assert command[0] == "torchrun"
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            for rank in range(nodes):
                env = {
                    **os.environ,
                    "PET_NNODES": str(nodes),
                    "PET_NPROC_PER_NODE": "1",
                    "PET_NODE_RANK": str(rank),
                    "PET_MASTER_ADDR": "127.0.0.1",
                    "PET_MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1",
                }
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "torch.distributed.run", *command[1:]],
                        env=env,
                        cwd=REPO,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                cluster.add_pod(f"{name}-node-0-{rank}", name, rank, "Running")
            cluster.logs[f"{name}-node-0-0"] = ["2026-12-03T09:00:00Z rank 0 started"]
            return
        codes = [p.poll() for p in self.processes]
        if any(code not in (None, 0) for code in codes):
            cluster.set_condition(namespace, name, "Failed", "JobSetFailed", f"exit codes {codes}")
        elif all(code == 0 for code in codes):
            cluster.set_condition(namespace, name, "Complete")


@pytest.fixture
def cluster(monkeypatch):
    from pixtrain_dagster import trainjob_step

    fake = FakeCluster()
    fake.on_poll = TrainerController(fake)
    monkeypatch.setattr(trainjob_step, "kube_apis_in_cluster", lambda: KubeApis(fake, fake))
    defaults = dict(trainjob_step.launch_multinode_training.__kwdefaults__)
    monkeypatch.setattr(trainjob_step.launch_multinode_training, "__kwdefaults__", {**defaults, "poll_seconds": 0.5})
    monkeypatch.setenv("PIXTRAIN_IMAGE", "registry.example.com/pixtrain:test")
    yield fake
    for process in fake.on_poll.processes:
        process.kill()


def test_a_two_node_run_goes_through_a_trainjob_and_publishes_like_one_pod(pipeline_env, tiny_model_dir, cluster):
    from support import TRAINING_ASSETS, materialized_metadata, run_job, run_log_messages, tiny_run_config

    result = run_job(tiny_run_config(tiny_model_dir, num_nodes=2, max_steps=2, lora_dropout=0.0), TRAINING_ASSETS)
    assert result.success
    ((namespace, name),) = cluster.trainjobs
    assert cluster.trainjobs[(namespace, name)]["spec"]["trainer"]["numNodes"] == 2
    assert [p.returncode for p in cluster.on_poll.processes] == [0, 0]
    metadata = materialized_metadata(result, "lora_adapter")
    assert metadata["steps"] == 2
    store = ArtifactStore(pipeline_env["artifact_root"])
    assert store.exists(store.key_of(metadata["dagster/uri"]))
    assert any("rank 0 started" in m for m in run_log_messages(result))  # rank 0's log reached the run
