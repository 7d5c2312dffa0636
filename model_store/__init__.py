"""The model store: immutable, versioned model manifests and artifacts."""

from model_store.manifest import (
    DATATYPES,
    Artifact,
    ModelManifest,
    Parity,
    StoredFile,
    TensorSpec,
    validate_model_name,
)
from model_store.store import (
    ArtifactSource,
    ImmutableVersionError,
    IntegrityError,
    InvalidNameError,
    ModelNotFoundError,
    ModelStore,
    StoreError,
)

__all__ = [
    "DATATYPES",
    "Artifact",
    "ArtifactSource",
    "ImmutableVersionError",
    "IntegrityError",
    "InvalidNameError",
    "ModelManifest",
    "ModelNotFoundError",
    "ModelStore",
    "Parity",
    "StoreError",
    "StoredFile",
    "TensorSpec",
    "validate_model_name",
]
