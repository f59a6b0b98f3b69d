"""Swappable Dagster resources; each wraps a plain-Python component from ``pixtrain_dagster.core``."""

from .artifacts import ArtifactPointerIOManager, ArtifactStoreResource
from .runtime import ModelHubResource, TrainingRuntimeResource

__all__ = ["ArtifactPointerIOManager", "ArtifactStoreResource", "ModelHubResource", "TrainingRuntimeResource"]
