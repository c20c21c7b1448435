"""Small shared helpers: atomic + durable writes, leftover cleanup, fault points, the cache directory.

Every file aqlmkit writes goes through ``atomic_path``/``atomic_write`` (temp file in the same
folder, fsync, rename, fsync the folder) and every output folder through ``atomic_dir`` (temp
folder next to it, swapped in with no moment where the path is missing). Temp names carry the
writer's pid (``.aqlmkit-tmp-<pid>-<name>.<random>``) so a later run removes the leftovers of a
killed one, and only those: nothing else is ever deleted by the cleanup.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Iterator

TMP_TAG, OLD_TAG = ".aqlmkit-tmp-", ".aqlmkit-old-"
LEFTOVER = re.compile(r"^\.aqlmkit-(tmp|old)-(\d+)-(.+)\.[0-9a-f]{8}$")
_FAULT_HITS: dict[str, int] = {}


def cache_dir() -> Path:
    """``$AQLMKIT_CACHE`` or ``$XDG_CACHE_HOME/aqlmkit`` (default ~/.cache/aqlmkit), created."""
    root = os.environ.get("AQLMKIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "aqlmkit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------- fault points
def fault_point(name: str) -> None:
    """Test hook: ``AQLMKIT_FAULT_AT=name`` (or ``name@N`` for the N-th hit) SIGKILLs the process here.

    The fault-injection tests use it to stop a run at exact moments; unset it costs one dict lookup.
    """
    spec = os.environ.get("AQLMKIT_FAULT_AT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------- temp names
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_name(tag: str, name: str) -> str:
    return f"{tag}{os.getpid()}-{name}.{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove aqlmkit temp files/folders in ``folder`` left by killed runs (dead pid); returns them.

    An ``.aqlmkit-old-*`` folder whose target is missing is the previous output of a run killed
    mid-swap: it is renamed back instead of deleted. Only names aqlmkit itself generates match.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = LEFTOVER.match(entry)
        if not m or (name is not None and m.group(3) != name) or _pid_alive(int(m.group(2))):
            continue
        path, target = folder / entry, folder / m.group(3)
        if m.group(1) == "old" and not os.path.lexists(target):
            os.replace(path, target)  # killed between the two renames of the fallback swap
            continue
        _remove(path)
        removed.append(path)
    if removed:
        fsync_dir(folder)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- durability
def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename/creation inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def seal_tree(root: Path) -> None:
    """Before ``root`` is renamed into place: permissions from the umask (libraries such as
    safetensors write 0600 temp files) and fsync of every file and folder, bottom-up."""
    mask = _umask()
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)
                fsync_file(p)
        os.chmod(dirpath, 0o777 & ~mask)
        fsync_dir(dirpath)


# ------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; it replaces ``path`` (durably) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent, path.name)
    tmp = path.parent / _temp_name(TMP_TAG, path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, like open()
    os.close(fd)
    try:
        yield tmp
        if not os.path.islink(tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # the writer may have replaced it with a 0600 file
        fsync_file(tmp)
        fault_point("file:before_rename")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        fault_point("file:after_rename")
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """Open a temp file for writing; it replaces ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def atomic_save_json(path: str | os.PathLike, data: object) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file so that ``dst`` is either its old content or the complete new one."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


# ------------------------------------------------------------------------------- folders
@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder next to ``out_dir``; when the block succeeds it replaces ``out_dir``.

    The caller decides beforehand whether ``out_dir`` may be replaced (``formats.output``). The
    swap is one atomic ``renameat2(RENAME_EXCHANGE)`` where the kernel has it, so ``out_dir`` is
    never missing; elsewhere the old folder is renamed aside first and a killed run's next
    ``clean_leftovers`` puts it back. The old folder is deleted only after the new one is in place.
    """
    out = Path(out_dir)
    with temp_dir(out.parent, out.name) as tmp:
        yield tmp
        fault_point("dir:before_sync")
        seal_tree(tmp)
        fault_point("dir:before_swap")
        _swap_in(tmp, out)


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A scratch folder ``parent/.aqlmkit-tmp-<pid>-<name>.<random>``, removed on exit; one left by
    a killed run is removed by the next ``temp_dir``/``atomic_dir`` for the same name."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(parent, name)
    tmp = parent / _temp_name(TMP_TAG, name)
    tmp.mkdir(mode=0o777)  # 0777 & ~umask: the folder is as readable as any other the user makes
    try:
        yield tmp
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _swap_in(tmp: Path, out: Path) -> None:
    if not os.path.lexists(out):
        os.replace(tmp, out)
        fsync_dir(out.parent)
        fault_point("dir:after_swap")
        return
    if _exchange(tmp, out):  # tmp now holds the previous output
        old = tmp
    else:
        old = out.parent / _temp_name(OLD_TAG, out.name)
        os.replace(out, old)
        fault_point("dir:after_aside")
        os.replace(tmp, out)
    fsync_dir(out.parent)
    fault_point("dir:after_swap")
    _remove(old)
    fsync_dir(out.parent)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    if os.environ.get("AQLMKIT_NO_EXCHANGE") or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_writable_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Refuse, before any work, a file path aqlmkit could not write (existing folder, read-only parent)."""
    from aqlmkit.errors import AqlmkitError

    path = Path(path)
    if path.is_dir():
        raise AqlmkitError(f"{what} {path} is a folder; give a file path")
    return check_parent_writable(path, what)


def check_parent_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` can be created: its nearest existing ancestor is a folder this process may write."""
    from aqlmkit.errors import AqlmkitError

    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AqlmkitError(f"{what} {path}: {parent} is not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AqlmkitError(f"{what} {path}: cannot write into {parent} (permission denied); "
                           "choose a writable location")
    return path
