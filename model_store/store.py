"""The versioned model store on a local filesystem: publish, list, load and verify versions.

Layout: ``<root>/<model>/<version>/`` holds ``manifest.json`` and the version's files.
A version is published by building it in a hidden temporary directory beside its
siblings and renaming it into place, so a reader sees a whole version or none.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from model_store.manifest import (
    Artifact,
    ModelManifest,
    Parity,
    StoredFile,
    TensorSpec,
    validate_model_name,
)

__all__ = [
    "ArtifactSource",
    "ImmutableVersionError",
    "IntegrityError",
    "InvalidNameError",
    "ModelNotFoundError",
    "ModelStore",
    "StoreError",
]

_MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_MAX_ATTEMPTS = 32
_REMOVED_PREFIX = ".removed-"
_TMP_PREFIX = ".tmp-"
#: This host, as it names its temporary directories (no dashes: they separate fields).
_HOST = socket.gethostname().replace("-", "_")[:64] or "host"
#: A temporary directory from another host is removed after this long.
_STALE_S = 24 * 3600.0
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
# What rename(2) says when the target version directory already exists and is not empty.
_TAKEN = frozenset({errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR})
# A placeholder digest: the real one is computed while copying.
_NO_DIGEST = "0" * 64


class StoreError(Exception):
    """A model store operation failed; the message says why."""


class InvalidNameError(StoreError):
    """A model name is not a safe, valid name."""


class ModelNotFoundError(StoreError):
    """The model, or the requested version of it, is not in the store."""


class IntegrityError(StoreError):
    """A stored file or manifest does not match what was published, or cannot be read."""


class ImmutableVersionError(StoreError):
    """Something tried to write into a version that is already published."""


@dataclass(frozen=True)
class ArtifactSource:
    """A file to publish as an artifact of a new version."""

    target: str
    path: Path
    parity: Parity | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: The stored file name; the source's own name when not given.
    file: str | None = None


class ModelStore:
    """Published model versions under one root directory; versions never change once there."""

    def __init__(self, root: str | Path) -> None:
        self._root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"ModelStore(root={str(self._root)!r})"

    @property
    def root(self) -> Path:
        """The directory holding one subdirectory per model."""
        return self._root

    # -- reading -------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models that have at least one published version, sorted."""
        try:
            entries = list(self._root.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name for e in entries if _is_model_name(e.name) and _version_numbers(e))

    def versions(self, name: str) -> list[int]:
        """The published versions of model ``name``, ascending; empty when there are none."""
        return _version_numbers(self._root / _checked_name(name))

    def latest(self, name: str) -> int:
        """The newest published version of model ``name``."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"model {name!r} has no published version in {self._root}")
        return versions[-1]

    def version_dir(self, name: str, version: int) -> Path:
        """The directory of a published version."""
        path = self._version_path(name, version)
        if not path.is_dir():
            raise ModelNotFoundError(f"model {name!r} has no version {version} in {self._root}")
        return path

    def manifest(self, name: str, version: int | None = None) -> ModelManifest:
        """The manifest of version ``version`` of model ``name`` (the latest when None)."""
        if version is None:
            version = self.latest(name)
        directory = self.version_dir(name, version)
        manifest = _read_manifest(directory, f"model {name!r} version {version}", IntegrityError)
        if manifest.name != name or manifest.version != version:
            raise IntegrityError(
                f"model {name!r} version {version}: {directory / _MANIFEST} describes "
                f"model {manifest.name!r} version {manifest.version}"
            )
        return manifest

    def artifact_path(
        self, manifest: ModelManifest, file: StoredFile, *, verify: bool = True
    ) -> Path:
        """The path of one of ``manifest``'s files, checked against its size and sha256."""
        if file not in manifest.artifacts and file not in manifest.files:
            raise StoreError(
                f"file {file.file!r} is not part of model {manifest.name!r} "
                f"version {manifest.version}"
            )
        path = self.version_dir(manifest.name, manifest.version) / file.file
        if verify:
            _verify_file(path, file, f"model {manifest.name!r} version {manifest.version}")
        return path

    def verify(self, manifest: ModelManifest) -> None:
        """Check every artifact and extra file of ``manifest`` against its size and sha256."""
        for file in (*manifest.artifacts, *manifest.files):
            self.artifact_path(manifest, file)

    # -- writing -------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        *,
        platform: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch_size: int,
        artifacts: Sequence[ArtifactSource],
        files: Mapping[str, Path] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ModelManifest:
        """Publish a new version of model ``name`` and return its manifest.

        ``files`` maps a stored file name to the file to store (sample inputs and the
        like). Sizes and sha256 digests are computed here while copying.
        """
        _checked_name(name)
        if not artifacts:
            raise StoreError(f"cannot publish model {name!r}: artifacts: at least one is needed")
        artifact_files = [a.file or Path(a.path).name for a in artifacts]
        extra = {stored: Path(path) for stored, path in (files or {}).items()}
        paths = [Path(a.path) for a in artifacts] + list(extra.values())
        _check_file_names([*artifact_files, *extra], StoreError)
        for stored, path in zip([*artifact_files, *extra], paths, strict=True):
            if not path.is_file():
                raise StoreError(
                    f"cannot publish {stored!r} of model {name!r}: {path} is not a file"
                )
        try:
            draft = ModelManifest(
                name=name,
                version=1,
                platform=platform,
                inputs=list(inputs),
                outputs=list(outputs),
                max_batch_size=max_batch_size,
                artifacts=[
                    Artifact(
                        file=stored,
                        sha256=_NO_DIGEST,
                        size=0,
                        target=a.target,
                        parity=a.parity,
                        options=dict(a.options),
                    )
                    for a, stored in zip(artifacts, artifact_files, strict=True)
                ],
                files=[StoredFile(file=stored, sha256=_NO_DIGEST, size=0) for stored in extra],
                metadata=dict(metadata or {}),
            )
            draft.model_dump_json()
        except ValidationError as e:
            raise StoreError(f"cannot publish model {name!r}: {_describe(e)}") from e
        except PydanticSerializationError as e:
            raise StoreError(f"cannot publish model {name!r}: metadata is not JSON: {e}") from e
        return self._install(name, draft, paths, check_digests=False)

    def push(self, source_dir: Path, name: str | None = None) -> ModelManifest:
        """Publish a copy of a version directory (from any store) as a new version here.

        The source's files must match its manifest's digests; the copy is published
        under ``name``, or the source's own model name when None.
        """
        source_dir = Path(source_dir)
        if name is not None:
            _checked_name(name)
        if not (source_dir / _MANIFEST).is_file():
            raise StoreError(f"{source_dir} is not a published model version: no {_MANIFEST}")
        source = _read_manifest(source_dir, f"version directory {source_dir}", IntegrityError)
        name = source.name if name is None else name
        draft = source.model_copy(update={"name": name, "version": 1})
        paths = [source_dir / f.file for f in (*source.artifacts, *source.files)]
        for path in paths:
            _check_regular(path)  # all of them before anything is copied
        return self._install(name, draft, paths, check_digests=True)

    def remove(self, name: str, version: int) -> None:
        """Delete a published version; readers see it whole until it is gone."""
        path = self._version_path(name, version)
        if not path.is_dir():
            raise ModelNotFoundError(f"model {name!r} has no version {version} in {self._root}")
        # A tombstone first, so that the number is never handed out again: a
        # (name, version) pair names one content forever.
        (path.parent / f"{_REMOVED_PREFIX}{version}").touch()
        trash = path.parent / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFoundError(
                f"model {name!r} has no version {version} in {self._root}"
            ) from None
        _fsync_dir(path.parent)
        shutil.rmtree(trash)

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _removed(model_dir: Path) -> list[int]:
        """Version numbers that were published once and removed since."""
        try:
            names = os.listdir(model_dir)
        except FileNotFoundError:
            return []
        tail = len(_REMOVED_PREFIX)
        return [
            int(n[tail:]) for n in names if n.startswith(_REMOVED_PREFIX) and n[tail:].isdigit()
        ]

    def _version_path(self, name: str, version: int) -> Path:
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"a model version is an int, got {version!r}")
        return self._root / _checked_name(name) / str(version)

    def _install(
        self,
        name: str,
        draft: ModelManifest,
        paths: Sequence[Path],
        *,
        check_digests: bool,
        version: int | None = None,
    ) -> ModelManifest:
        """Copy ``paths`` (one per entry of ``draft``, artifacts then files) into a new version.

        ``version`` None takes the next free number; an explicit one that is already
        published raises ``ImmutableVersionError``.
        """
        model_dir = self._root / _checked_name(name)
        if version is not None and self._version_path(name, version).exists():
            raise ImmutableVersionError(_immutable_message(name, version))
        if not model_dir.is_dir():
            try:
                model_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the directory of model {name!r}: {e}") from e
            _fsync_dir(model_dir.parent)
        _remove_stale_drafts(model_dir)
        tmp = model_dir / f"{_TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o755)
        try:
            manifest = self._fill(draft, paths, tmp, check_digests=check_digests)
            manifest = self._rename_into_place(tmp, model_dir, manifest, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(model_dir)
        return manifest

    def _fill(
        self, draft: ModelManifest, paths: Sequence[Path], tmp: Path, *, check_digests: bool
    ) -> ModelManifest:
        """Copy the files into ``tmp`` and return ``draft`` with their real digests."""
        entries: list[StoredFile] = [*draft.artifacts, *draft.files]
        filled: list[StoredFile] = []
        for entry, src in zip(entries, paths, strict=True):
            try:
                if check_digests:  # a copy of a published version: never more than it says
                    sha256, size = _copy_file(src, tmp / entry.file, at_most=entry.size)
                else:
                    sha256, size = _copy_file(src, tmp / entry.file)
            except OSError as e:
                raise StoreError(
                    f"cannot publish model {draft.name!r}: copying {src} failed: {e}"
                ) from e
            if check_digests and (sha256, size) != (entry.sha256, entry.size):
                raise IntegrityError(_mismatch(f"source {src.parent}", src, entry, sha256, size))
            filled.append(entry.model_copy(update={"sha256": sha256, "size": size}))
        n = len(draft.artifacts)
        return draft.model_copy(
            update={"artifacts": filled[:n], "files": filled[n:], "created_at": datetime.now(UTC)}
        )

    def _rename_into_place(
        self, tmp: Path, model_dir: Path, manifest: ModelManifest, version: int | None
    ) -> ModelManifest:
        """Rename ``tmp`` to the next free version (or ``version``), rewriting its manifest."""
        n = 0
        for _ in range(_MAX_ATTEMPTS):
            if version is None:
                taken = (*self.versions(manifest.name), *self._removed(model_dir))
                n = max(n, *taken, 0) + 1
            else:
                n = version
            manifest = manifest.model_copy(update={"version": n})
            _write_manifest(tmp, manifest)
            try:
                os.rename(tmp, model_dir / str(n))
            except OSError as e:
                if e.errno not in _TAKEN:
                    raise
                if version is not None:
                    raise ImmutableVersionError(_immutable_message(manifest.name, n)) from None
                continue
            return manifest
        raise StoreError(
            f"cannot publish model {manifest.name!r}: other publishers took every version "
            f"number tried ({_MAX_ATTEMPTS} attempts, last {n}); try again"
        )


def _checked_name(name: str) -> str:
    try:
        return validate_model_name(name)
    except ValueError as e:
        raise InvalidNameError(str(e)) from None


def _is_model_name(name: str) -> bool:
    try:
        validate_model_name(name)
    except ValueError:
        return False
    return True


def _version_numbers(model_dir: Path) -> list[int]:
    try:
        entries = list(model_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(e.name) for e in entries if _VERSION_RE.fullmatch(e.name) and e.is_dir())


def _check_file_names(names: Sequence[str], error: type[StoreError]) -> None:
    seen: set[str] = set()
    for name in names:
        if not name or name == _MANIFEST or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise error(
                f"{name!r} cannot be a stored file name: use a plain file name "
                f"(no slashes, not hidden, not {_MANIFEST!r})"
            )
        if name in seen:
            raise error(f"file name {name!r} is used twice in one version")
        seen.add(name)


def _read_manifest(directory: Path, what: str, error: type[StoreError]) -> ModelManifest:
    path = directory / _MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{what}: cannot read {path}: {e.strerror or e}") from None
    try:
        manifest = ModelManifest.model_validate_json(raw)
    except ValidationError as e:
        raise error(f"{what}: {path} is corrupt: {_describe(e)}") from None
    if not manifest.artifacts:
        raise error(f"{what}: {path} is corrupt: it lists no artifact")
    _check_file_names([f.file for f in (*manifest.artifacts, *manifest.files)], error)
    return manifest


def _write_manifest(directory: Path, manifest: ModelManifest) -> None:
    part = directory / f".{_MANIFEST}.part"
    with open(part, "wb") as out:
        out.write(manifest.model_dump_json(indent=2).encode())
        out.flush()
        os.fsync(out.fileno())
    os.chmod(part, 0o444)
    os.replace(part, directory / _MANIFEST)
    _fsync_dir(directory)


def _copy_file(src: Path, dst: Path, *, at_most: int | None = None) -> tuple[str, int]:
    """Copy ``src`` to ``dst``: its sha256 and size. With ``at_most``, ``src`` must be a
    regular file (not followed if a link) and the copy stops one byte past that size."""
    digest = hashlib.sha256()
    size = 0
    limit = None if at_most is None else at_most + 1
    flags = os.O_RDONLY | (os.O_NOFOLLOW | os.O_NONBLOCK if at_most is not None else 0)
    fd = os.open(src, flags)
    with open(fd, "rb") as fin, open(dst, "xb") as fout:
        if at_most is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"{src.name!r} is not a regular file")
        while chunk := fin.read(_CHUNK if limit is None else min(_CHUNK, limit - size)):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o444)
    return digest.hexdigest(), size


def _check_regular(path: Path) -> None:
    """Refuse a source that is a link, a device, a pipe or anything but a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as e:
        raise StoreError(f"cannot read {path.name!r} of the source: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise StoreError(f"refusing to push {path.name!r}: it is {kind}")


def _remove_stale_drafts(model_dir: Path) -> None:
    """Remove the temporary directories of publishes that died (killed, power lost).

    A draft is stale when the process that made it on this host is gone, or, made on
    another host sharing the store, when it is older than a day.
    """
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        host, _, rest = entry.name[len(_TMP_PREFIX) :].rpartition("-")[0].rpartition("-")
        pid = int(rest) if rest.isdigit() else 0
        if host == _HOST and pid:
            stale = not _alive(pid)
        else:
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > _STALE_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fin:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _verify_file(path: Path, expected: StoredFile, what: str) -> None:
    try:
        sha256, size = _hash_file(path)
    except OSError as e:
        raise IntegrityError(
            f"{what}: file {expected.file!r} cannot be read at {path}: {e.strerror or e}"
        ) from None
    if (sha256, size) != (expected.sha256, expected.size):
        raise IntegrityError(_mismatch(what, path, expected, sha256, size))


def _mismatch(what: str, path: Path, expected: StoredFile, sha256: str, size: int) -> str:
    return (
        f"{what}: file {expected.file!r} does not match its manifest: expected sha256 "
        f"{expected.sha256} ({expected.size} bytes), found sha256 {sha256} ({size} bytes) "
        f"at {path}"
    )


def _immutable_message(name: str, version: int) -> str:
    return f"model {name!r} version {version} is already published and cannot be changed"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    more = e.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
