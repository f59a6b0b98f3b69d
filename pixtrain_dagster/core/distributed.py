"""The multi-process entry point: every process of a torchrun launch (one node with several GPUs, or each pod of
a Kubeflow TrainJob) runs this module with the same training request; rank 0 writes the result.

    torchrun --nnodes N --nproc-per-node G ... -m pixtrain_dagster.core.distributed --request REQUEST.json

A request names everything by artifact-store location, never by a local path of the launching pod, since the
training pods share only the artifact and checkpoint storage with it. The result is written atomically (temporary
name, then rename) so the launcher never reads half of one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .artifacts import ArtifactRef, ArtifactStore
from .settings import LoraTrainingSettings, RuntimeSettings
from .warning_filters import install_library_filters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingRequest:
    artifact_root: str
    checkpoint_root: str
    base_snapshot_key: str
    base_model_sha256: str
    dataset_key: str
    dataset_sha256: str
    settings: dict[str, Any]
    runtime: dict[str, Any] = field(default_factory=dict)
    resume: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> TrainingRequest:
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            unknown = set(raw) - known
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            return cls(**raw)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{source}: not a training request ({error}); it is written by the lora_training step, do not edit it"
            ) from None

    def training_settings(self) -> LoraTrainingSettings:
        values = dict(self.settings)
        values["lora_target_modules"] = tuple(values.get("lora_target_modules", ()))
        return LoraTrainingSettings(**values)


def result_path(request_path: Path) -> Path:
    return request_path.with_name(request_path.stem + ".result.json")


def run(request_path: Path) -> dict[str, Any] | None:
    """Train as one process of the launch; rank 0 returns (and writes) the result summary."""
    from .conversations import load_conversations
    from .training import train_lora_adapter

    request = TrainingRequest.from_json(request_path.read_text(), str(request_path))
    store, checkpoint_store = ArtifactStore(request.artifact_root), ArtifactStore(request.checkpoint_root)
    dataset_dir = store.local_path(request.dataset_key)
    result = train_lora_adapter(
        store=store,
        checkpoint_store=checkpoint_store,
        base_snapshot_dir=store.local_path(request.base_snapshot_key),
        base_model_name=request.base_snapshot_key,
        base_model_sha256=request.base_model_sha256,
        dataset_sha256=request.dataset_sha256,
        train_conversations=load_conversations(dataset_dir / "train.jsonl"),
        validation_conversations=load_conversations(dataset_dir / "validation.jsonl"),
        settings=request.training_settings(),
        runtime=RuntimeSettings(**request.runtime),
        resume=request.resume,
    )
    if result.adapter is None:
        return None  # not rank 0
    summary = result.summary()
    out = result_path(request_path)
    staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(summary, indent=2))
    staged.replace(out)
    return summary


def result_from_summary(summary: dict[str, Any]):
    """The TrainingResult a launcher reads back from rank 0's summary."""
    from .training import TrainingResult

    values = dict(summary)
    values["adapter"] = ArtifactRef(**values["adapter"])
    values["checkpoints"] = [ArtifactRef(**c) for c in values["checkpoints"]]
    if values.get("resumed_from_checkpoint"):
        values["resumed_from_checkpoint"] = ArtifactRef(**values["resumed_from_checkpoint"])
    return TrainingResult(**values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One process of a multi-process LoRA training run.")
    parser.add_argument("--request", required=True, type=Path, help="training request JSON (written by the step)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s")
    # Lightning prints through a console handler of its own; propagating to the root handler too doubled each line.
    logging.getLogger("lightning").propagate = False
    install_library_filters()  # train_lora_adapter installs them too; here they also cover loading and imports
    import torch

    # The thread count shows whether this process got its share of the pod's CPUs (launch.py, trainjob.py).
    logging.getLogger(__name__).info(
        "process %s of %s: %d CPU threads",
        os.environ.get("RANK", "0"),
        os.environ.get("WORLD_SIZE", "1"),
        torch.get_num_threads(),
    )
    run(args.request)


if __name__ == "__main__":
    main()
