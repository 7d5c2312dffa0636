"""One importer for every name -> ``"module:attr"`` table; heavy modules load only when chosen."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_from_string"]


def import_from_string(spec: str) -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted) and return the attribute.

    Raises ``ValueError`` for a spec not of that shape, ``ModuleNotFoundError`` when
    the spec's module does not exist (its ``name`` says which module is missing, also
    when it is one the module itself imports) and ``AttributeError`` when the module
    has no such attribute; each message names the spec.
    """
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr or any(not p for p in attr.split(".")):
        raise ValueError(f"an import spec is 'package.module:attr', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if (
            e.name is not None
            and module_name != e.name
            and not module_name.startswith(e.name + ".")
        ):
            raise  # a module that the spec's module imports is missing: say that one
        raise ModuleNotFoundError(
            f"cannot import {spec!r}: no module named {e.name or module_name!r}", name=e.name
        ) from None
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = ".".join([module_name, *attr.split(".")[:i]])
            raise AttributeError(
                f"cannot import {spec!r}: {owner} has no attribute {part!r}"
            ) from None
    return obj
