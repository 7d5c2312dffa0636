"""The model store: immutable, versioned model manifests and artifacts."""

from model_store.importer import import_from_string
from model_store.manifest import (
    DATATYPES,
    SAMPLES_FILE,
    V2_DATATYPES,
    Artifact,
    ModelManifest,
    Parity,
    StoredFile,
    TensorSpec,
    V2Datatype,
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
    "SAMPLES_FILE",
    "V2_DATATYPES",
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
    "V2Datatype",
    "import_from_string",
    "validate_model_name",
]
