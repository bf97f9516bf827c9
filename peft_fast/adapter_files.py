"""Adapter folders on disk: atomic, exclusive saves and the reads that go with them.

Saving a folder (`write_adapter_files`, used by `save_adapter_folder` and
`PeftConfig.save_pretrained`) is atomic and exclusive. A save that stops at any point (an
exception, a killed process, a power cut) leaves the folder's previous adapter, config and
weights together, loadable; a save that returned left the new one:

1. Lock. `.adapter_save.lock` in the folder is held with an exclusive `flock` for the whole
   save, so concurrent saves into one folder, from threads or processes, run one after the
   other. Loads hold it shared while they read config and weights, so they never see half
   a save.
2. Recover. A journal left by a save that stopped half way is rolled back first (see below).
3. Stage. Every new file (weights, then config) is written to a fresh temporary file in the
   same folder (`.<name>.<random>.peft_fast_tmp`, created exclusively, never through a
   symlink), and `fsync`ed.
4. Journal. The files the save replaces are hard-linked to `.<name>.peft_fast_prev` (the
   previous adapter, kept whole), then the journal `.adapter_save.journal` (the names
   replaced, and which of them existed) is written atomically, and the folder is `fsync`ed.
5. Commit. `os.replace` moves the weights and then the config into place and removes a
   weights file of the other format (`.bin` next to `.safetensors`, which would shadow or
   outlive the new one); the folder is `fsync`ed; deleting the journal is the commit point.
   The backups are deleted last.

While a journal exists, the previous adapter is the folder's content: loads read the backups
(or find no adapter where the interrupted save was the first), and the next save rolls the
journal back (the backups replace the new ones) before it starts. The lock file stays in the
folder (deleting it could let two savers hold two different locks); other files are never
touched.

This module imports nothing from peft_fast: configs (`PeftConfig.save_pretrained`) and
weights (`save_and_load`) are both written through it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".adapter_save.lock"
JOURNAL_NAME = ".adapter_save.journal"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _fsync_dir(folder: str) -> None:
    """Make renames and deletions in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int, shared: bool) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    else:  # pragma: no cover - Windows: msvcrt has exclusive locks only
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)


@contextmanager
def folder_lock(folder: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Hold the folder's save lock: exclusive for a save, shared for a load. A load of a folder
    that peft_fast never saved into (no lock file) takes no lock and creates none."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
        fd = os.open(path, flags | _NOFOLLOW, 0o644)
    except FileNotFoundError:
        if not shared:
            raise
        yield
        return
    try:
        _lock(fd, shared)
        yield
    finally:
        os.close(fd)  # releases the lock


_TMP_SUFFIX = ".peft_fast_tmp"
_PREV_SUFFIX = ".peft_fast_prev"


def _prev_name(name: str) -> str:
    return f".{name}{_PREV_SUFFIX}"


def _read_journal(folder: str) -> dict[str, list[str]] | None:
    path = os.path.join(folder, JOURNAL_NAME)
    try:
        with open(path) as f:
            journal = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"the save journal {path!r} cannot be read ({e}); remove it by hand") from e
    if not isinstance(journal, dict) or not all(isinstance(journal.get(k), list) for k in ("replaces", "previous")):
        raise ValueError(f"the save journal {path!r} is not one peft_fast wrote; remove it by hand")
    return journal


def committed_path(folder: str | os.PathLike, name: str) -> str | None:
    """Where the committed version of file `name` of an adapter folder is (while a save is
    unfinished, its previous version), or None where the folder has none."""
    folder = str(folder)
    journal = _read_journal(folder)
    path: str | None = os.path.join(folder, name)
    if journal is not None and name in journal["replaces"]:
        if name not in journal["previous"]:
            path = None  # what is there is the unfinished save's
        elif os.path.lexists(os.path.join(folder, _prev_name(name))):
            path = os.path.join(folder, _prev_name(name))
        # else an interrupted roll-back already put the previous file back in place
    return path if path is not None and os.path.isfile(path) else None


def _recover(folder: str) -> None:
    """Roll back a save that stopped before its commit point; drop leftovers of any save.
    Runs under the exclusive lock; safe to repeat if it is itself interrupted."""
    journal = _read_journal(folder)
    if journal is not None:
        for name in journal["replaces"]:
            final, prev = os.path.join(folder, name), os.path.join(folder, _prev_name(name))
            if name in journal["previous"]:
                if os.path.lexists(prev):  # else already put back by an earlier recovery
                    os.replace(prev, final)
            elif os.path.lexists(final):
                os.unlink(final)
        _fsync_dir(folder)
        os.unlink(os.path.join(folder, JOURNAL_NAME))
        _fsync_dir(folder)
    for entry in os.listdir(folder):  # staged files and backups of saves that stopped
        if entry.startswith(".") and entry.endswith((_TMP_SUFFIX, _PREV_SUFFIX)):
            os.unlink(os.path.join(folder, entry))


def _stage(folder: str, name: str, data: bytes) -> str:
    """Write `data` to a new temporary file next to `name`, fsynced; return its path."""
    path = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _backup(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except (OSError, NotImplementedError):  # file systems (or platforms) without hard links
        shutil.copyfile(src, dst, follow_symlinks=False)


def write_adapter_files(folder: str | os.PathLike, files: dict[str, bytes], remove: Sequence[str] = ()) -> None:
    """Replace the files `files` ({name: contents}, committed in this order) of `folder` and
    delete the files `remove`, all together or not at all (the protocol in the module
    docstring). The folder is created if needed."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with folder_lock(folder):
        _recover(folder)
        staged: dict[str, str] = {}
        try:
            for name, data in files.items():
                staged[name] = _stage(folder, name, data)
            replaces = list(files) + [n for n in remove if n not in files and os.path.lexists(os.path.join(folder, n))]
            previous = [n for n in replaces if os.path.lexists(os.path.join(folder, n))]
            for name in previous:
                _backup(os.path.join(folder, name), os.path.join(folder, _prev_name(name)))
            journal = json.dumps({"replaces": replaces, "previous": previous}).encode()
            os.replace(_stage(folder, JOURNAL_NAME, journal), os.path.join(folder, JOURNAL_NAME))
            _fsync_dir(folder)
            for name, tmp in staged.items():
                os.replace(tmp, os.path.join(folder, name))
            for name in replaces:
                if name not in files:
                    os.unlink(os.path.join(folder, name))
            _fsync_dir(folder)
            os.unlink(os.path.join(folder, JOURNAL_NAME))  # the commit point
            _fsync_dir(folder)
        finally:
            # A save that raised rolls itself back now; one that returned drops its backups.
            _recover(folder)
