"""Configuration: defaults, validation, unknown keys rejected with their path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serving.config import ConfigError, load_config


def test_defaults_serve_the_local_store(tmp_path: Path) -> None:
    config = load_config()
    assert config.backend == "local"
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert config.store.root == Path("model_store")
    assert config.models == {}
    assert config.batching.max_queue_delay_ms == 0


def test_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fermion.yaml"
    path.write_text(
        "server: {port: 9000}\n"
        "batching: {max_batch_size: 16}\n"
        "models:\n  digits: {versions: [1], batching: {max_batch_size: 4}}\n"
    )
    config = load_config(path, {"server.host": "0.0.0.0", "store.root": "/srv/models"})
    assert config.server.port == 9000
    assert config.server.host == "0.0.0.0"
    assert config.store.root == Path("/srv/models")
    assert config.batching_for("digits").max_batch_size == 4
    assert config.batching_for("other").max_batch_size == 16
    assert config.models["digits"].versions == [1]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("sever: {port: 1}\n", "sever"),
        ("server: {prot: 1}\n", "server.prot"),
        ("models:\n  digits: {batching: {max_batch: 4}}\n", "models.digits.batching.max_batch"),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(tmp_path: Path, text: str, path: str) -> None:
    file = tmp_path / "fermion.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(file)
    assert f"{path}: unknown key" in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {port: 70000}\n", "server.port: Input should be less than or equal to 65535"),
        ("backend: kubernetes\n", "backend: Input should be 'local', 'ray' or 'remote'"),
        ("batching: {max_batch_size: 0}\n", "batching.max_batch_size: Input should be greater"),
        ("models: {'../etc': {}}\n", "invalid model name '../etc'"),
        ("[1, 2]\n", "must be a mapping at the top level"),
        ("server: {port: [\n", "is not valid YAML"),
    ],
)
def test_invalid_values_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "fermion.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(file)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
