"""import_from_string: one importer for every name -> "module:attr" table."""

from __future__ import annotations

import json
import os.path
import sys
from pathlib import Path

import pytest

from model_store.importer import import_from_string


def test_imports_an_attribute_and_a_dotted_attribute() -> None:
    assert import_from_string("json:dumps") is json.dumps
    assert import_from_string("os:path.join") is os.path.join


@pytest.mark.parametrize("spec", ["json", "json:", ":dumps", "", "json:dumps.", "json:.dumps"])
def test_a_spec_not_shaped_module_colon_attr_is_a_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match=r"'package\.module:attr'"):
        import_from_string(spec)


def test_a_missing_module_names_the_spec_and_the_module() -> None:
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz") as info:
        import_from_string("no_such_module_xyz.sub:thing")
    assert "'no_such_module_xyz.sub:thing'" in str(info.value)
    assert info.value.name == "no_such_module_xyz"


def test_a_missing_attribute_names_the_spec_and_the_attribute() -> None:
    with pytest.raises(AttributeError, match=r"'json:no_such_attr'.*'no_such_attr'"):
        import_from_string("json:no_such_attr")
    with pytest.raises(AttributeError, match=r"os\.path has no attribute 'nope'"):
        import_from_string("os:path.nope")


def test_a_dependency_missing_inside_the_module_says_which_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_absent_dep.py").write_text("import absent_dep_for_importer_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            import_from_string("needs_absent_dep:anything")
        # The name is the dependency, as the CLI needs to say which extra is missing.
        assert info.value.name == "absent_dep_for_importer_test"
    finally:
        sys.modules.pop("needs_absent_dep", None)
