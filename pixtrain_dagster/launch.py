"""How the lora_training step runs a multi-process training: torchrun inside its own pod (one node, several GPUs),
or a Kubeflow TrainJob (several nodes). Either way every process runs ``pixtrain_dagster.core.distributed`` with
the same request, and the step reads rank 0's result and publishes the asset outputs exactly as for one process.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

from .core.distributed import TrainingRequest, result_from_summary, result_path
from .core.settings import LoraTrainingSettings, RuntimeSettings


def training_request(
    *,
    artifact_root: str,
    checkpoint_root: str,
    base_model: dict,
    training_dataset: dict,
    settings: LoraTrainingSettings,
    runtime: RuntimeSettings,
    resume: bool,
) -> TrainingRequest:
    return TrainingRequest(
        artifact_root=artifact_root,
        checkpoint_root=checkpoint_root,
        base_snapshot_key=base_model["key"],
        base_model_sha256=base_model["sha256"],
        dataset_key=training_dataset["key"],
        dataset_sha256=training_dataset["sha256"],
        settings=asdict(settings),
        runtime=asdict(runtime),
        resume=resume,
    )


def run_torchrun_in_pod(request: TrainingRequest, processes: int, log: Callable[[str], None]):
    """``torchrun --standalone`` with one process per local device, its output streamed to ``log``.

    A SIGTERM to the step (Dagster run terminated, pod deleted) stops the whole process group, so no training
    process outlives the step.
    """
    import json

    _check_visible_gpus(request, processes)
    with tempfile.TemporaryDirectory(prefix="pixtrain-torchrun-") as folder:
        request_file = Path(folder) / "request.json"
        request_file.write_text(request.to_json())
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "pixtrain_dagster.core.distributed",
            "--request",
            str(request_file),
        ]
        log(f"launching {processes} training processes: torchrun --standalone --nproc-per-node={processes}")
        # Set here, so torchrun does not choose one thread per process itself and print a banner saying so.
        env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads_per_worker(processes, os.environ))}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
        )
        previous = signal.getsignal(signal.SIGTERM)

        def stop(signum, frame):
            _kill_group(process)
            raise KeyboardInterrupt(f"training stopped by signal {signum}")

        in_main_thread = _is_main_thread()
        if in_main_thread:
            signal.signal(signal.SIGTERM, stop)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log(line.rstrip())
            code = process.wait()
        except BaseException:
            _kill_group(process)
            raise
        finally:
            process.stdout.close()
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
        if code != 0:
            raise RuntimeError(f"torchrun exited with {code}; the lines above are the training processes' output")
        return result_from_summary(json.loads(result_path(request_file).read_text()))


def omp_threads_per_worker(processes: int, environ: Mapping[str, str]) -> int:
    """OpenMP threads for each of ``processes`` workers: the step's CPU budget split between them, at least one.

    The budget is ``OMP_NUM_THREADS`` when set (in a step pod, the pod's CPU limit: execution.py), else the CPUs
    this process may use (:func:`usable_cpus`). Without the split every worker would start a full budget's threads.
    """
    raw = environ.get("OMP_NUM_THREADS", "").strip()
    budget = int(raw) if raw.isdigit() and int(raw) > 0 else usable_cpus()
    return max(1, budget // processes)


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container started with
    ``--cpus``), which the affinity does not show."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here: the affinity is all we know
    return cpus


def _check_visible_gpus(request: TrainingRequest, processes: int) -> None:
    import torch

    if request.runtime.get("device", "auto") == "cpu" or not torch.cuda.is_available():
        return  # CPU processes (tests, laptops): gloo, no GPU needed
    visible = torch.cuda.device_count()
    if visible < processes:
        raise ValueError(
            f"devices: {processes} but this pod sees {visible} GPU(s); under the k8s executor the pod gets `devices` "
            "GPUs unless execution.config.per_step_k8s_config.lora_training overrides nvidia.com/gpu (remove or "
            "raise that override; docs/scale-out.md), or lower devices"
        )


def _kill_group(process: subprocess.Popen) -> None:
    """torchrun and its workers (which it starts in sessions of their own)."""
    import psutil

    try:
        members = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        return
    for member in members:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread() and os.name == "posix"


def run_trainjob_for_step(context, request: TrainingRequest, settings: LoraTrainingSettings):
    """num_nodes > 1: the request goes onto the artifact volume every TrainJob pod mounts, a TrainJob runs it
    (trainjob_step.py), and rank 0's result comes back next to it."""
    import json

    from .core.artifacts import ArtifactStore
    from .trainjob_step import launch_multinode_training

    store = ArtifactStore(request.artifact_root)
    if not store.is_local:
        raise ValueError(
            f"multi-node training reads its request from the shared artifact volume, but the artifact "
            f"root {request.artifact_root} is not a filesystem path; mount the volume (PVC) instead"
        )
    op_context = getattr(context, "op_execution_context", context)
    request_file = (
        Path(store.root)
        / "trainjob-requests"
        / f"{context.run.run_id}-{op_context.op.name}-{op_context.retry_number}.json"
    )
    request_file.parent.mkdir(parents=True, exist_ok=True)
    staged = request_file.with_name(f".{request_file.name}.tmp")
    staged.write_text(request.to_json())
    staged.replace(request_file)
    launch_multinode_training(
        context, request_uri=str(request_file), num_nodes=settings.num_nodes, gpus_per_node=settings.devices
    )
    return result_from_summary(json.loads(result_path(request_file).read_text()))
