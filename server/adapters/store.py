"""The adapter store: one folder per adapter id under ``--adapter-root``, read on first use, written atomically.

Layout::

    <root>/<id>                      what readers resolve: a folder placed there by hand (or by
                                     ``training``), or the symlink :meth:`AdapterStore.write` makes
    <root>/.store/<id>@<version>/    a written adapter (adapter_config.json + adapter_model.safetensors),
                                     complete and fsynced before its name appears, never changed after
    <root>/.store/.tmp-*, .old-*     a write or removal under way (swept by the next writer after a crash)
    <root>/.store/lock               writers hold an exclusive flock on it: one writer at a time, also
                                     across processes sharing the folder (replicas on one host or NFS)

A reader resolves ``<root>/<id>`` once and reads both files from the folder it names, so it sees one
version whole, never parts of two: a replace writes a new version folder, then renames a new symlink
over ``<root>/<id>`` (atomic) and removes the old folder; a reader caught in the old folder while it is
removed reads again. Replacing or removing a hand-placed folder moves it aside first: readers see
NOT_FOUND for that instant, never a mixture.

The version of an adapter is a hash of its two files (:func:`content_version`): the same content has
the same version, so a replica holding an adapter compares its version with :meth:`AdapterStore.version`
(one readlink for written adapters) to tell that what it holds is stale.

Ids follow RegisterAdapter's rules; ids starting with '.' are the store's own. Every path stays inside
the root: symlinks leading out of it, symlink loops, files where a folder is expected, FIFOs and
oversize files are refused (AdapterPathError / AdapterFormatError: INVALID_ARGUMENT); nothing at
``<root>/<id>`` is AdapterNotFoundError (NOT_FOUND). Messages name the adapter, never the server's paths;
reads name no request field (callers prefix theirs: ``adapter_id: ...``, ``adapters[1].adapter_id: ...``),
writes name ``adapter_id`` (the admin requests' field).

Threads: any thread but the event loop (every method does file I/O).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from server.adapters.entry import AdapterExistsError, AdapterNotFoundError
from server.adapters.errors import AdapterFormatError, AdapterPathError
from server.adapters.formats import (
    CONFIG_NAME,
    AdapterLimits,
    AdapterSpec,
    _os_reason,
    load_adapter_files,
    read_adapter_dir,
    resolve_adapter_path,
    validate_adapter_id,
)
from server.adapters.safetensors_file import WEIGHTS_NAME
from server.model.config import ModelArgs

__all__ = ["AdapterStore", "AdapterStoreError", "StoredAdapter", "check_store_id", "content_version"]

log = logging.getLogger("adapterserve.adapters")

STORE_DIR = ".store"
READ_ATTEMPTS = 3  # a reader whose folder was replaced under it reads the new one; more is a writer storm


class AdapterStoreError(Exception):
    """FAILED_PRECONDITION: the store folder cannot be written (read-only, full, not a folder)."""


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter read from (or just written to) the store: parsed, validated, with its version."""

    adapter_id: str
    version: str
    spec: AdapterSpec


def content_version(config_json: bytes, weights: bytes | torch.Tensor) -> str:
    """The version of an adapter: 32 hex digits of SHA-256 over its config and weights bytes."""
    h = hashlib.sha256(b"adapterserve-store-1\n")
    h.update(len(config_json).to_bytes(8, "little"))
    h.update(config_json)
    h.update(memoryview(weights.numpy()) if isinstance(weights, torch.Tensor) else weights)
    return h.hexdigest()[:32]


def check_store_id(adapter_id: str) -> None:
    """RegisterAdapter's id rules, and no leading '.' (the store's own names); else AdapterFormatError."""
    try:
        validate_adapter_id(adapter_id)
        ok = not adapter_id.startswith(".")
    except AdapterFormatError:
        ok = False
    if not ok:
        raise AdapterFormatError(f"{adapter_id[:40]!r} is not a valid adapter id: use 1-128 characters of "
                                 "A-Z a-z 0-9 . _ - not starting with '.'")


def _check_request_id(adapter_id: str) -> None:
    """check_store_id, the message naming the field of the admin requests that write (``adapter_id``)."""
    try:
        check_store_id(adapter_id)
    except AdapterFormatError as e:
        raise AdapterFormatError(f"adapter_id: {e}") from None


class AdapterStore:
    """One folder per adapter id under `root`; reads validate as RegisterAdapter does (any thread but the loop)."""

    def __init__(self, root: str | Path, model: ModelArgs, limits: AdapterLimits):
        self.root = Path(root)
        self.model = model
        self.limits = limits
        self._lock = threading.Lock()  # writers in this process; the flock covers other processes
        self._flock_warned = False

    # ------------------------------------------------------------------ reads
    def folder(self, adapter_id: str) -> Path:
        """The folder ``<root>/<id>`` resolves to (inside the root). NOT_FOUND when nothing is there."""
        check_store_id(adapter_id)
        root = self._root()
        link = root / adapter_id
        name = repr(adapter_id)
        for _ in range(READ_ATTEMPTS):  # a version folder removed between resolving and checking it: again
            try:
                os.lstat(link)
                target = link.resolve(strict=True)
                mode = os.stat(target).st_mode
            except FileNotFoundError:  # nothing there, or a symlink to nothing (replaced or removed meanwhile)
                continue
            except (OSError, RuntimeError) as e:  # RuntimeError: pathlib's symlink loop before 3.13
                raise AdapterPathError(f"adapter {name} in the adapter store cannot be resolved: "
                                       f"{_os_reason(e)}") from None
            if target == root or not target.is_relative_to(root):
                raise AdapterPathError(f"adapter {name} in the adapter store is a symlink leading outside the "
                                       "adapter root")
            if not stat.S_ISDIR(mode):
                raise AdapterPathError(f"adapter {name} in the adapter store is not a folder")
            return target
        raise AdapterNotFoundError(f"adapter {name} is not registered and the adapter store has no folder {name}")

    def load(self, adapter_id: str) -> StoredAdapter:
        """Read, validate and parse ``<root>/<id>`` exactly as RegisterAdapter reads a path."""
        for _ in range(READ_ATTEMPTS):
            folder = self.folder(adapter_id)
            try:
                config_json, weights = read_adapter_dir(folder, self.model, self.limits, root=self._root())
            except (AdapterFormatError, AdapterPathError, OSError) as e:
                if self._moved(adapter_id, folder):
                    continue  # replaced or removed while read: read what is there now
                if isinstance(e, OSError):  # e.g. a folder that cannot be listed
                    raise AdapterPathError(f"adapter {adapter_id!r} in the adapter store cannot be read: "
                                           f"{_os_reason(e)}") from None
                raise type(e)(f"adapter {adapter_id!r} in the adapter store: {e}") from None
            version = content_version(config_json, weights)  # before parsing: tensors are views of `weights`
            try:
                spec = load_adapter_files(config_json, weights, self.model, self.limits)
            except (AdapterFormatError, AdapterPathError) as e:
                raise type(e)(f"adapter {adapter_id!r} in the adapter store: {e}") from None
            return StoredAdapter(adapter_id, version, spec)
        raise AdapterFormatError(f"adapter {adapter_id!r} in the adapter store changed {READ_ATTEMPTS} times while "
                                 "it was read; retry")

    def version(self, adapter_id: str) -> str | None:
        """The stored version of `adapter_id`, None when the store has none: one readlink for adapters
        written by :meth:`write`, a hash of the files for a hand-placed folder."""
        try:
            folder = self.folder(adapter_id)
        except AdapterNotFoundError:
            return None
        own = self._own_version(adapter_id)
        if own is not None:
            return own
        config_json, weights = read_adapter_dir(folder, self.model, self.limits, root=self._root())
        return content_version(config_json, weights)

    def list_ids(self) -> list[str]:
        """Ids with a folder in the store (not validated: reading one may still fail), sorted."""
        try:
            names = os.listdir(self._root())
        except OSError:
            return []
        ids = []
        for n in names:
            try:
                check_store_id(n)
            except AdapterFormatError:
                continue
            if (self.root / n).is_dir():  # False for loops, files and dangling links
                ids.append(n)
        return sorted(ids)

    # ------------------------------------------------------------------ writes
    def write(self, adapter_id: str, config_json: bytes, weights: bytes | torch.Tensor, *,
              replace: bool = False) -> StoredAdapter:
        """Validate the adapter as RegisterAdapter does, then store it atomically under `adapter_id`.

        Readers see the old adapter or the new one, whole. ALREADY_EXISTS when the id is taken and
        `replace` is not set; a replace removes the old content after the swap. Returns the parsed
        adapter (ready to register) and its version.
        """
        _check_request_id(adapter_id)
        data = weights if isinstance(weights, bytes) else bytes(memoryview(weights.numpy()))
        version = content_version(config_json, data)
        spec = load_adapter_files(config_json, data, self.model, self.limits)
        with self._writing(adapter_id) as (root, store):
            link = root / adapter_id
            present = os.path.lexists(link)
            if present and not replace:
                raise AdapterExistsError(f"adapter_id {adapter_id!r} is already in the adapter store "
                                         "(set replace to swap it)")
            final = store / f"{adapter_id}@{version}"
            if not final.is_dir():  # the same content may be stored already
                tmp = store / f".tmp-{uuid.uuid4().hex}"
                tmp.mkdir()
                _write_file(tmp / CONFIG_NAME, config_json)
                _write_file(tmp / WEIGHTS_NAME, data)
                _fsync_dir(tmp)
                os.rename(tmp, final)
                _fsync_dir(store)
            old = self._own_folder(adapter_id)
            aside = None
            if present and not os.path.islink(link) and os.path.isdir(link):  # a hand-placed folder
                aside = store / f".old-{uuid.uuid4().hex}"
                os.rename(link, aside)
            new_link = store / f".tmp-{uuid.uuid4().hex}"
            os.symlink(f"{STORE_DIR}/{final.name}", new_link)  # relative to the root, where it is renamed to
            os.rename(new_link, link)
            _fsync_dir(root)
            _fsync_dir(store)
            for gone in (old, aside):
                if gone is not None and gone != final:
                    shutil.rmtree(gone, ignore_errors=True)
        log.info("stored adapter %s version %s (%s)", adapter_id, version, spec.kind.value)
        return StoredAdapter(adapter_id, version, spec)

    def write_folder(self, adapter_id: str, rel_path: str, *, replace: bool = False) -> StoredAdapter:
        """:meth:`write` the adapter folder at `rel_path` under the root (RegisterAdapter's ``path``: same
        containment rules). When `rel_path` is the id's own folder in the store, nothing is written."""
        _check_request_id(adapter_id)
        folder = resolve_adapter_path(self._root(), rel_path)
        try:
            own = self.folder(adapter_id)
        except AdapterNotFoundError:
            own = None
        if own == folder:
            return self.load(adapter_id)
        config_json, weights = read_adapter_dir(folder, self.model, self.limits, root=self._root())
        return self.write(adapter_id, config_json, weights, replace=replace)

    def remove(self, adapter_id: str) -> bool:
        """Remove `adapter_id` from the store; False when it held nothing under that id. A symlink is
        removed, never what it points to."""
        _check_request_id(adapter_id)
        with self._writing(adapter_id) as (root, store):
            link = root / adapter_id
            if not os.path.lexists(link):
                return False
            gone = self._own_folder(adapter_id)
            if not os.path.islink(link) and os.path.isdir(link):  # a hand-placed folder: out of sight first
                gone = store / f".old-{uuid.uuid4().hex}"
                os.rename(link, gone)
            else:
                os.unlink(link)
            _fsync_dir(root)
            if gone is not None:
                shutil.rmtree(gone, ignore_errors=True)
        log.info("removed adapter %s from the store", adapter_id)
        return True

    # ------------------------------------------------------------------ helpers
    def _root(self) -> Path:
        root = self.root.resolve()
        if not root.is_dir():
            raise AdapterPathError("the server's adapter root is not a folder")
        return root

    def _own_version(self, adapter_id: str) -> str | None:
        """The version in ``<root>/<id>``'s symlink when :meth:`write` made it, else None."""
        try:
            target = os.readlink(self._root() / adapter_id)
        except OSError:
            return None
        prefix = f"{STORE_DIR}/{adapter_id}@"
        return target[len(prefix):] if target.startswith(prefix) and "/" not in target[len(prefix):] else None

    def _own_folder(self, adapter_id: str) -> Path | None:
        version = self._own_version(adapter_id)
        return None if version is None else self._root() / STORE_DIR / f"{adapter_id}@{version}"

    def _moved(self, adapter_id: str, folder: Path) -> bool:
        try:
            return self.folder(adapter_id) != folder
        except AdapterNotFoundError:
            return True  # removed: the next attempt reports NOT_FOUND
        except AdapterPathError:
            return False

    @contextlib.contextmanager
    def _writing(self, adapter_id: str) -> Iterator[tuple[Path, Path]]:
        """(root, store folder) with the write locks held; leftovers of crashed writers swept."""
        root = self._root()
        store = root / STORE_DIR
        with self._lock:
            try:
                if os.path.islink(store) or (os.path.lexists(store) and not store.is_dir()):
                    raise AdapterStoreError(f"adapter store: {STORE_DIR} in the adapter root is not a folder")
                store.mkdir(exist_ok=True)
                fd = os.open(store / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise AdapterStoreError(f"adapter store: cannot write adapter {adapter_id!r}: {_os_reason(e)}") from None
            try:
                self._flock(fd)
                for leftover in [*store.glob(".tmp-*"), *store.glob(".old-*")]:  # a crashed writer's
                    _remove_any(leftover)
                try:
                    yield root, store
                except OSError as e:
                    raise AdapterStoreError(
                        f"adapter store: cannot write adapter {adapter_id!r}: {_os_reason(e)}") from None
            finally:
                os.close(fd)  # releases the flock

    def _flock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a mount without locks: this process's writers stay serialized
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if not self._flock_warned:
                log.warning("adapter store: the folder does not support flock; writers of other processes "
                            "are not serialized")
                self._flock_warned = True


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_any(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()

