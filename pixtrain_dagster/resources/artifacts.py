"""Artifact storage and the IO manager that passes small artifact pointers between steps."""

import os
from typing import Any

from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    Failure,
    InputContext,
    OutputContext,
    ResourceDependency,
)
from pydantic import Field

from ..core.artifacts import ArtifactError, ArtifactStore

DEFAULT_ARTIFACT_ROOT = ".pixtrain/artifacts"


class ArtifactStoreResource(ConfigurableResource):
    """Where datasets, model snapshots, checkpoints, adapters and reports live.

    Each root may be a local folder, a mounted volume (PVC) or an fsspec URI such as ``s3://bucket/prefix``.
    """

    root: str = Field(default=DEFAULT_ARTIFACT_ROOT, description="Artifacts (PIXTRAIN_ARTIFACT_ROOT).")
    checkpoint_root: str | None = Field(
        default=None, description="Training checkpoints (PIXTRAIN_CHECKPOINT_DIR); defaults to the artifact root."
    )
    landing_root: str | None = Field(
        default=None,
        description="Where new chat JSONL lands (PIXTRAIN_TRAINING_DATA_DIR); defaults to <root>/landing.",
    )

    @classmethod
    def from_env(cls) -> "ArtifactStoreResource":
        return cls(
            root=os.environ.get("PIXTRAIN_ARTIFACT_ROOT", DEFAULT_ARTIFACT_ROOT),
            checkpoint_root=os.environ.get("PIXTRAIN_CHECKPOINT_DIR") or None,
            landing_root=os.environ.get("PIXTRAIN_TRAINING_DATA_DIR") or None,
        )

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)

    def checkpoint_store(self) -> ArtifactStore:
        return ArtifactStore(self.checkpoint_root or self.root)

    def landing_store(self) -> ArtifactStore:
        return ArtifactStore(self.landing_root or f"{self.store().root}/landing")


class ArtifactPointerIOManager(ConfigurableIOManager):
    """Stores each asset's value (a small JSON pointer to its artifact) in the artifact store.

    Step pods share no disk, so the default filesystem IO manager would not work in the cluster; the pointers
    live next to the artifacts they point at, on the same shared storage.
    """

    artifact_store: ResourceDependency[ArtifactStoreResource] = Field(
        description="Where the pointers are kept: beside the artifacts, on the same storage."
    )

    def _key(self, asset_key_path: list[str]) -> str:
        return "dagster/assets/" + "/".join(asset_key_path) + ".json"

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:
            return
        self.artifact_store.store().put_json(self._key(context.asset_key.path), obj)

    def load_input(self, context: InputContext) -> Any:
        key = self._key(context.asset_key.path)
        try:
            return self.artifact_store.store().get_json(key)
        except ArtifactError as error:
            if not isinstance(error.__cause__, FileNotFoundError):
                raise
            raise Failure(
                description=f"{context.asset_key.to_user_string()} has not been materialised yet "
                f"({error}); materialise it first"
            ) from error
