"""Swappable Dagster resources; each wraps a plain-Python component from ``pixtrain_dagster.core``."""

from .artifacts import ArtifactPointerIOManager, ArtifactStoreResource
from .bias_service import BiasDetectionClient
from .metadata import TrainingMetadataResource
from .runtime import ModelHubResource, TrainingRuntimeResource

__all__ = [
    "ArtifactPointerIOManager",
    "ArtifactStoreResource",
    "BiasDetectionClient",
    "ModelHubResource",
    "TrainingMetadataResource",
    "TrainingRuntimeResource",
]
