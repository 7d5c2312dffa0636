"""The local model store: publishing, listing, loading, verification, removal, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import model_store
from model_store import (
    ArtifactSource,
    ImmutableVersionError,
    IntegrityError,
    InvalidNameError,
    ModelManifest,
    ModelNotFoundError,
    ModelStore,
    Parity,
    StoreError,
    TensorSpec,
)

INPUTS = [TensorSpec(name="x", datatype="FP32", shape=[-1, 4])]
OUTPUTS = [TensorSpec(name="y", datatype="FP32", shape=[-1, 3])]
BAD_NAMES = ["..", "a/b", "/abs", "a\\b", ".hidden", "", "m" * 129, "con/../x", "a\0b", "."]


def _blob(path: Path, size: int = 2048) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _publish(store: ModelStore, name: str, src: Path, **kwargs: Any) -> ModelManifest:
    """Publish one ONNX-like artifact (and whatever ``kwargs`` adds) as model ``name``."""
    args: dict[str, Any] = {
        "platform": "onnxruntime_onnx",
        "inputs": INPUTS,
        "outputs": OUTPUTS,
        "max_batch_size": 8,
        "artifacts": [ArtifactSource(target="onnxruntime", path=_blob(src / "model.onnx"))],
    }
    args.update(kwargs)
    return store.publish(name, **args)


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in directory.iterdir()}


def _hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")]


def _make_writable(path: Path) -> None:
    path.chmod(0o644)


# -- publishing -------------------------------------------------------------------------------


def test_publish_stores_files_with_digests_and_a_manifest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    src = tmp_path / "src"
    onnx = _blob(src / "model.onnx", 3 * 1024 * 1024 + 17)
    plan = _blob(src / "build" / "engine.plan", 999)
    samples = _blob(src / "inputs.npz", 100)
    parity = Parity(
        reference="torch", samples=64, max_abs_err=1e-6, max_rel_err=1e-5, atol=1e-4, rtol=1e-3
    )
    before = datetime.now(UTC)
    m = store.publish(
        "resnet",
        platform="onnxruntime_onnx",
        inputs=INPUTS,
        outputs=OUTPUTS,
        max_batch_size=16,
        artifacts=[
            ArtifactSource(target="onnxruntime", path=onnx, parity=parity),
            ArtifactSource(
                target="tensorrt", path=plan, options={"precision": "fp16"}, file="sm90.plan"
            ),
        ],
        files={"samples.npz": samples},
        metadata={"framework": "torch"},
    )
    after = datetime.now(UTC)

    assert (m.name, m.version) == ("resnet", 1)
    assert before <= m.created_at <= after
    assert [(a.target, a.file) for a in m.artifacts] == [
        ("onnxruntime", "model.onnx"),
        ("tensorrt", "sm90.plan"),
    ]
    assert m.artifacts[0].parity == parity
    assert m.artifacts[1].options == {"precision": "fp16"}
    assert m.metadata == {"framework": "torch"}
    for entry, source in [(m.artifacts[0], onnx), (m.artifacts[1], plan), (m.files[0], samples)]:
        data = source.read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.size == len(data)
        stored = store.artifact_path(m, entry)
        assert stored.read_bytes() == data
        assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    assert m.files[0].file == "samples.npz"

    vdir = store.version_dir("resnet", 1)
    assert vdir == tmp_path / "store" / "resnet" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "samples.npz",
        "sm90.plan",
    ]
    assert (vdir / "manifest.json").read_text() == m.model_dump_json(indent=2)
    assert stat.S_IMODE((vdir / "manifest.json").stat().st_mode) == 0o444
    assert store.manifest("resnet") == m
    assert store.manifest("resnet", 1) == m
    assert store.models() == ["resnet"]
    assert store.versions("resnet") == [1]
    assert store.latest("resnet") == 1
    store.verify(m)
    assert _hidden(store.root) == []


def test_root_is_created_on_first_publish(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "a" / "b")
    assert store.models() == []
    assert store.versions("m") == []
    assert not store.root.exists()
    _publish(store, "m", tmp_path / "src")
    assert store.models() == ["m"]


def test_republishing_makes_a_new_version_and_leaves_the_old_one_byte_identical(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "store")
    v1 = _publish(store, "m", tmp_path / "src1")
    old = _snapshot(store.version_dir("m", 1))
    v2 = _publish(store, "m", tmp_path / "src2")  # same file name, other bytes
    assert (v1.version, v2.version) == (1, 2)
    assert v1.artifacts[0].sha256 != v2.artifacts[0].sha256
    assert _snapshot(store.version_dir("m", 1)) == old
    assert store.manifest("m", 1) == v1
    assert store.manifest("m") == v2
    assert store.versions("m") == [1, 2]


def test_writing_into_a_published_version_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    v1 = _publish(store, "m", tmp_path / "src1")
    old = _snapshot(store.version_dir("m", 1))
    other = _blob(tmp_path / "other.onnx")
    with pytest.raises(ImmutableVersionError, match="'m' version 1 is already published"):
        store._install("m", v1, [other], check_digests=False, version=1)
    assert _snapshot(store.version_dir("m", 1)) == old
    assert store.versions("m") == [1]
    assert _hidden(store.root) == []
    # The same private path with a free explicit version works, so the refusal above is real.
    v5 = store._install("m", v1, [other], check_digests=False, version=5)
    assert v5.version == 5
    assert store.artifact_path(v5, v5.artifacts[0]).read_bytes() == other.read_bytes()


def test_a_stale_listing_makes_publish_take_the_next_free_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, "m", tmp_path / "s1")
    v2 = _publish(store, "m", tmp_path / "s2")
    old = _snapshot(store.version_dir("m", 2))
    # As if another process published 2 between our listing and our rename.
    monkeypatch.setattr(store, "versions", lambda name: [1])
    v3 = _publish(store, "m", tmp_path / "s3")
    monkeypatch.undo()
    assert v3.version == 3
    assert store.manifest("m", 3) == v3
    assert json.loads((store.version_dir("m", 3) / "manifest.json").read_text())["version"] == 3
    assert store.manifest("m", 2) == v2
    assert _snapshot(store.version_dir("m", 2)) == old
    assert _hidden(store.root) == []


def test_publish_gives_up_cleanly_when_every_number_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store")
    for i in range(3):
        _publish(store, "m", tmp_path / f"s{i}")
    old = {v: _snapshot(store.version_dir("m", v)) for v in (1, 2, 3)}
    monkeypatch.setattr("model_store.store._MAX_ATTEMPTS", 3)
    monkeypatch.setattr(store, "versions", lambda name: [])
    with pytest.raises(StoreError, match="took every version number tried"):
        _publish(store, "m", tmp_path / "s-late")
    monkeypatch.undo()
    assert store.versions("m") == [1, 2, 3]
    assert {v: _snapshot(store.version_dir("m", v)) for v in (1, 2, 3)} == old
    assert _hidden(store.root) == []


@pytest.mark.parametrize(
    ("artifact_files", "extra", "message"),
    [
        (["a.bin", "a.bin"], [], "used twice"),
        (["a.bin"], ["a.bin"], "used twice"),
        (["manifest.json"], [], "cannot be a stored file name"),
        (["a.bin"], ["manifest.json"], "cannot be a stored file name"),
        (["a.bin"], [".hidden"], "cannot be a stored file name"),
        (["sub/a.bin"], [], "cannot be a stored file name"),
    ],
)
def test_publish_rejects_bad_or_duplicate_file_names(
    tmp_path: Path, artifact_files: list[str], extra: list[str], message: str
) -> None:
    store = ModelStore(tmp_path / "store")
    artifacts = [
        ArtifactSource(target="onnxruntime", path=_blob(tmp_path / f"src{i}"), file=f)
        for i, f in enumerate(artifact_files)
    ]
    files = {f: _blob(tmp_path / f"extra{i}") for i, f in enumerate(extra)}
    with pytest.raises(StoreError, match=message):
        _publish(store, "m", tmp_path, artifacts=artifacts, files=files)
    assert store.versions("m") == []
    assert not store.root.exists()


def test_publish_rejects_a_missing_source_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    missing = ArtifactSource(target="onnxruntime", path=tmp_path / "nope.onnx")
    with pytest.raises(StoreError, match=r"nope\.onnx is not a file"):
        _publish(store, "m", tmp_path, artifacts=[missing])
    assert not store.root.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"inputs": []}, "inputs"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"artifacts": []}, "artifacts"),
        ({"metadata": {"when": object()}}, "metadata is not JSON"),
    ],
)
def test_publish_rejects_an_invalid_manifest_before_copying(
    tmp_path: Path, override: dict[str, Any], message: str
) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match=message):
        _publish(store, "m", tmp_path / "src", **override)
    assert not store.root.exists()


# -- listing ----------------------------------------------------------------------------------


def test_listing_skips_everything_that_is_not_a_published_model(tmp_path: Path) -> None:
    # The default root is the model_store package itself: its code must not look like models.
    root = tmp_path / "model_store"
    root.mkdir()
    for code in Path(model_store.__file__).parent.glob("*.py"):
        shutil.copy(code, root / code.name)
    assert (root / "store.py").is_file()
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "store.cpython-311.pyc").write_bytes(b"\0")
    (root / ".tmp-abc" / "1").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "01").mkdir()
    (root / "notes" / "draft").mkdir()
    (root / "notes" / "7").write_text("a file, not a version")
    (root / "bad..name" / "1").mkdir(parents=True)
    store = ModelStore(root)
    assert store.models() == []
    _publish(store, "real", tmp_path / "src")
    assert store.models() == ["real"]
    with pytest.raises(StoreError, match=r"cannot create the directory of model 'store\.py'"):
        _publish(store, "store.py", tmp_path / "src2")
    assert store.versions("store.py") == []
    assert (root / "store.py").read_bytes() == (
        Path(model_store.__file__).parent / "store.py"
    ).read_bytes()
    assert store.versions("notes") == []
    assert store.versions("empty") == []
    with pytest.raises(ModelNotFoundError, match="'notes' has no published version"):
        store.latest("notes")


def test_versions_ignore_temporary_and_non_numeric_entries(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for _ in range(3):
        _publish(store, "m", tmp_path / "src")
    mdir = tmp_path / "m"
    for junk in (".tmp-123", ".trash-456", "0", "00", "01", "-1", "x", "1.5", "\u0661"):
        (mdir / junk).mkdir()
    assert store.versions("m") == [1, 2, 3]
    assert store.latest("m") == 3
    assert store.models() == ["m"]
    assert _publish(store, "m", tmp_path / "src").version == 4


def test_models_are_sorted(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for name in ("zeta", "Alpha", "beta-2", "beta.1"):
        _publish(store, name, tmp_path / "src")
    assert store.models() == sorted(["zeta", "Alpha", "beta-2", "beta.1"])


def test_unknown_models_and_versions_are_not_found(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "m", tmp_path / "src")
    with pytest.raises(ModelNotFoundError, match="'ghost' has no published version"):
        store.latest("ghost")
    with pytest.raises(ModelNotFoundError, match="'ghost' has no published version"):
        store.manifest("ghost")
    with pytest.raises(ModelNotFoundError, match="'m' has no version 2"):
        store.manifest("m", 2)
    with pytest.raises(ModelNotFoundError, match="'m' has no version 0"):
        store.version_dir("m", 0)
    with pytest.raises(ModelNotFoundError, match="'m' has no version 9"):
        store.remove("m", 9)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_every_method_taking_a_name_rejects_unsafe_names(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "store"
    store = ModelStore(root)
    _publish(store, "good", tmp_path / "src")
    calls: list[Callable[[], object]] = [
        lambda: store.versions(bad),
        lambda: store.latest(bad),
        lambda: store.manifest(bad),
        lambda: store.manifest(bad, 1),
        lambda: store.version_dir(bad, 1),
        lambda: store.remove(bad, 1),
        lambda: _publish(store, bad, tmp_path / "src"),
        lambda: store.push(store.version_dir("good", 1), name=bad),
    ]
    for call in calls:
        with pytest.raises(InvalidNameError, match="invalid model name"):
            call()
    assert sorted(p.name for p in root.iterdir()) == ["good"]
    assert store.versions("good") == [1]


def test_a_non_int_version_is_a_type_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "m", tmp_path / "src")
    with pytest.raises(TypeError, match="version is an int"):
        store.remove("m", "../m")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="version is an int"):
        store.version_dir("m", True)
    assert store.versions("m") == [1]


# -- verification -----------------------------------------------------------------------------


def test_a_tampered_file_is_refused_with_both_digests(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    m = _publish(store, "m", tmp_path / "src", files={"samples.npz": _blob(tmp_path / "s.npz")})
    path = store.artifact_path(m, m.artifacts[0])
    _make_writable(path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(IntegrityError) as info:
        store.artifact_path(m, m.artifacts[0])
    message = str(info.value)
    for part in ("'m'", "version 1", "'model.onnx'", m.artifacts[0].sha256, actual):
        assert part in message
    with pytest.raises(IntegrityError, match=r"'model\.onnx'"):
        store.verify(m)
    assert store.artifact_path(m, m.artifacts[0], verify=False) == path
    # The untouched extra file still verifies on its own.
    assert store.artifact_path(m, m.files[0]).read_bytes() == (tmp_path / "s.npz").read_bytes()


def test_a_tampered_extra_file_fails_verify(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    m = _publish(store, "m", tmp_path / "src", files={"samples.npz": _blob(tmp_path / "s.npz")})
    path = store.artifact_path(m, m.files[0])
    _make_writable(path)
    path.write_bytes(b"x" * m.files[0].size)
    with pytest.raises(IntegrityError, match=r"'samples\.npz' does not match"):
        store.verify(m)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    m = _publish(store, "m", tmp_path / "src")
    path = store.artifact_path(m, m.artifacts[0])
    _make_writable(path)
    with path.open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(IntegrityError, match=r"\(2048 bytes\), found sha256 [0-9a-f]{64} \(1000"):
        store.verify(m)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    m = _publish(store, "m", tmp_path / "src")
    store.artifact_path(m, m.artifacts[0]).unlink()
    with pytest.raises(IntegrityError, match=r"'model\.onnx' cannot be read"):
        store.verify(m)


def test_a_file_of_another_version_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    v1 = _publish(store, "m", tmp_path / "src1")
    v2 = _publish(store, "m", tmp_path / "src2")
    with pytest.raises(StoreError, match="not part of model 'm' version 1"):
        store.artifact_path(v1, v2.artifacts[0])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda text: "{ not json", "is corrupt: Invalid JSON"),
        (lambda text: text[: len(text) // 2], "is corrupt"),
        (lambda text: text.replace('"platform"', '"platfrom"'), "is corrupt"),
        (
            lambda text: text.replace('"version": 1', '"version": 2'),
            "describes model 'm' version 2",
        ),
        (lambda text: text.replace('"name": "m"', '"name": "n"'), "describes model 'n' version 1"),
        (
            lambda text: text.replace('"file": "model.onnx"', '"file": "manifest.json"'),
            "is corrupt",
        ),
        (
            lambda text: json.dumps(dict(json.loads(text), artifacts=[])),
            "lists no artifact",
        ),
    ],
)
def test_a_corrupt_manifest_is_refused(tmp_path: Path, corrupt: Any, message: str) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, "m", tmp_path / "src")
    path = store.version_dir("m", 1) / "manifest.json"
    _make_writable(path)
    path.write_text(corrupt(path.read_text()))
    with pytest.raises(IntegrityError, match=message):
        store.manifest("m", 1)
    with pytest.raises(IntegrityError, match=message):  # the latest version is that one
        store.manifest("m")


def test_a_version_without_a_manifest_is_corrupt_not_missing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, "m", tmp_path / "src")
    (store.version_dir("m", 1) / "manifest.json").unlink()
    assert store.versions("m") == [1]
    with pytest.raises(IntegrityError, match=r"cannot read .*manifest\.json"):
        store.manifest("m")
    assert _publish(store, "m", tmp_path / "src").version == 2


# -- push -------------------------------------------------------------------------------------


def test_push_copies_a_version_from_another_store(tmp_path: Path) -> None:
    a = ModelStore(tmp_path / "a")
    b = ModelStore(tmp_path / "b")
    src = _publish(a, "m", tmp_path / "s1", files={"samples.npz": _blob(tmp_path / "x.npz")})
    _publish(b, "m", tmp_path / "s2")
    _publish(b, "m", tmp_path / "s3")
    pushed = b.push(a.version_dir("m", 1))
    assert pushed.version == 3
    assert pushed.created_at >= src.created_at
    assert pushed.model_dump(exclude={"version", "created_at"}) == src.model_dump(
        exclude={"version", "created_at"}
    )
    b.verify(pushed)
    assert b.manifest("m", 3) == pushed
    renamed = b.push(a.version_dir("m", 1), name="m-copy")
    assert (renamed.name, renamed.version) == ("m-copy", 1)
    assert b.models() == ["m", "m-copy"]
    again = a.push(a.version_dir("m", 1))
    assert again.version == 2
    assert a.versions("m") == [1, 2]


def test_push_refuses_a_tampered_source_and_publishes_nothing(tmp_path: Path) -> None:
    a = ModelStore(tmp_path / "a")
    b = ModelStore(tmp_path / "b")
    src = _publish(a, "m", tmp_path / "s1", files={"samples.npz": _blob(tmp_path / "x.npz")})
    path = a.artifact_path(src, src.files[0])
    _make_writable(path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match=r"'samples\.npz' does not match"):
        b.push(a.version_dir("m", 1))
    assert b.versions("m") == []
    assert b.models() == []
    assert _hidden(b.root) == []


def test_push_refuses_a_directory_that_is_not_a_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match="not a published model version"):
        store.push(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("[]")
    with pytest.raises(IntegrityError, match="is corrupt"):
        store.push(bad)
    assert store.models() == []


# -- remove -----------------------------------------------------------------------------------


def test_remove_deletes_one_version_and_nothing_else(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    for i in range(3):
        _publish(store, "m", tmp_path / f"s{i}")
    keep = {v: _snapshot(store.version_dir("m", v)) for v in (1, 3)}
    store.remove("m", 2)
    assert store.versions("m") == [1, 3]
    assert {v: _snapshot(store.version_dir("m", v)) for v in (1, 3)} == keep
    assert [p.name for p in _hidden(store.root)] == [".removed-2"]
    with pytest.raises(ModelNotFoundError, match="model 'm' has no version 2"):
        store.remove("m", 2)
    store.remove("m", 1)
    store.remove("m", 3)
    assert store.models() == []
    with pytest.raises(ModelNotFoundError, match="model 'm' has no published version"):
        store.latest("m")


# -- concurrency ------------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from model_store import ArtifactSource, ModelStore, StoreError, TensorSpec

    root, name, go, count, tag = sys.argv[1:]
    store = ModelStore(root)
    spec = [TensorSpec(name="x", datatype="FP32", shape=[-1, 4])]
    src = Path(root).parent / f"src-{tag}"
    src.mkdir()
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("never got the go signal")
        time.sleep(0.001)
    results = []
    for i in range(int(count)):
        blob = src / f"model-{i}.onnx"
        blob.write_bytes(os.urandom(4096 + i))
        try:
            m = store.publish(
                name, platform="onnxruntime_onnx", inputs=spec, outputs=spec,
                max_batch_size=4, artifacts=[ArtifactSource(target="onnxruntime", path=blob)],
                metadata={"tag": tag, "i": i},
            )
            results.append({"version": m.version, "sha256": m.artifacts[0].sha256})
        except StoreError as e:
            results.append({"error": str(e)})
    print(json.dumps(results))
    """
)


def test_concurrent_publishes_from_processes_get_distinct_complete_versions(
    tmp_path: Path,
) -> None:
    workers, per_worker, rounds = 4, 6, 3
    for round_ in range(rounds):
        base = tmp_path / f"round{round_}"
        root = base / "store"
        go = base / "go"
        base.mkdir()
        store = ModelStore(root)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(root), "m", str(go), str(per_worker), str(w)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for w in range(workers)
        ]
        # Let them all reach the start line, then race.
        while len(list(base.glob("src-*"))) < workers:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, f"a worker died before the start: {dead[0].communicate()[1]}"
            time.sleep(0.01)
        go.touch()
        # Meanwhile, every version a reader can see must already be whole.
        seen: set[int] = set()
        while any(p.poll() is None for p in procs):
            for v in store.versions("m"):
                if v not in seen:
                    store.verify(store.manifest("m", v))
                    seen.add(v)
        outputs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outputs.append(json.loads(out))

        published = [r for rs in outputs for r in rs if "version" in r]
        errors = [r["error"] for rs in outputs for r in rs if "error" in r]
        assert errors == []  # 32 attempts always outlast 3 rivals publishing 18 versions
        versions = sorted(r["version"] for r in published)
        assert versions == list(range(1, workers * per_worker + 1))
        assert store.versions("m") == versions
        for r in published:
            m = store.manifest("m", r["version"])
            assert m.artifacts[0].sha256 == r["sha256"]
            store.verify(m)
        manifests = [store.manifest("m", v) for v in versions]
        tags = {(m.metadata["tag"], m.metadata["i"]) for m in manifests}
        assert len(tags) == workers * per_worker
        assert _hidden(root) == []


def test_removed_version_numbers_are_never_reused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    first = _publish(store, "m", tmp_path / "s1")
    second = _publish(store, "m", tmp_path / "s2")
    store.remove("m", second.version)
    third = _publish(store, "m", tmp_path / "s3")
    assert (first.version, second.version, third.version) == (1, 2, 3)
    assert store.versions("m") == [1, 3]


# -- push from an untrusted directory ---------------------------------------------------------


def _source_version(tmp_path: Path) -> tuple[Path, ModelManifest]:
    a = ModelStore(tmp_path / "a")
    manifest = _publish(a, "m", tmp_path / "s1")
    copy = tmp_path / "incoming"
    shutil.copytree(a.version_dir("m", 1), copy)
    for p in copy.iterdir():
        _make_writable(p)
    return copy, manifest


@pytest.mark.parametrize("kind", ["link to /dev/zero", "link to a good copy", "fifo"])
def test_push_refuses_links_and_special_files_at_once(tmp_path: Path, kind: str) -> None:
    source, manifest = _source_version(tmp_path)
    artifact = source / manifest.artifacts[0].file
    if kind == "fifo":
        artifact.unlink()
        os.mkfifo(artifact)
    else:
        # A link to a file with the right digest would pass the digest check: still refused.
        good = tmp_path / "elsewhere.onnx"
        shutil.copyfile(artifact, good)
        artifact.unlink()
        artifact.symlink_to("/dev/zero" if kind == "link to /dev/zero" else good)
    store = ModelStore(tmp_path / "b")
    expected = "is not a regular file" if kind == "fifo" else "is a symbolic link"
    with pytest.raises(StoreError, match=expected):
        store.push(source)
    assert store.models() == [] and _hidden(store.root) == []


def test_push_copies_no_more_than_the_manifest_says(tmp_path: Path) -> None:
    source, manifest = _source_version(tmp_path)
    artifact = source / manifest.artifacts[0].file
    with artifact.open("r+b") as f:
        f.truncate(1 << 30)  # a GiB (sparse) where the manifest says 2 kB
    store = ModelStore(tmp_path / "b")
    with pytest.raises(
        IntegrityError,
        match=f"expected sha256 .* \\({manifest.artifacts[0].size}"
        f" bytes\\), found sha256 .* \\({manifest.artifacts[0].size + 1} bytes\\)",
    ):
        store.push(source)
    assert store.models() == [] and _hidden(store.root) == []


def test_a_killed_publish_leaves_a_draft_that_the_next_publish_removes(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, "m", tmp_path / "s1")
    model_dir = store.root / "m"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = model_store.store._HOST
    stale = model_dir / f".tmp-{host}-{int(dead.stdout)}-{'a' * 32}"
    alive = model_dir / f".tmp-{host}-{os.getpid()}-{'b' * 32}"  # a publish under way
    old_elsewhere = model_dir / f".tmp-otherhost-123-{'c' * 32}"
    for draft in (stale, alive, old_elsewhere):
        draft.mkdir()
        _blob(draft / "model.onnx")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_elsewhere, (day_ago, day_ago))
    _publish(store, "m", tmp_path / "s2")
    assert sorted(p.name for p in _hidden(model_dir)) == [alive.name]
    assert store.versions("m") == [1, 2]
