"""The errors of the compile side; each says what failed and what to change."""

from __future__ import annotations

from model_store.manifest import Parity

__all__ = ["BuildError", "ExportError", "ParityError", "UnknownTargetError"]


class BuildError(ValueError):
    """A model could not be exported, compiled, validated or published.

    A ``ValueError``: the model, its inputs or its options are what must change,
    and the ``fermion`` entry point reports value errors as a message, not a trace.
    """


class ExportError(BuildError):
    """A module or ONNX file could not be turned into a servable ONNX graph."""


class UnknownTargetError(BuildError):
    """A compile target name is not in the table, or its module could not be loaded."""


class ParityError(BuildError):
    """A compiled artifact's outputs are further from the reference's than the tolerance."""

    def __init__(self, message: str, parity: Parity | None = None) -> None:
        super().__init__(message)
        #: The measured errors, when the outputs could be compared at all.
        self.parity = parity
