"""Writing a run's files safely: every file or folder is written aside (``name.tmp``) and renamed
over the old one, so a reader — or a resume after ``kill -9`` — sees the old version or the new one,
never half of one; a full disk or a denied write is one line naming the path and the space needed
(:class:`~flowrl.safeload.WriteError`), and the partial write is removed."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from flowrl.safeload import WriteError


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` aside (``<name>.tmp``) and rename it over ``path``: a reader sees the old file
    or the new one, never half of one. A full disk or a denied write is one line naming the path."""
    with written_aside(Path(path)) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def written_aside(path: Path, *, folder: bool = False, needed_bytes: int | None = None):
    """Yield a temporary sibling of ``path`` (a file, or a folder with ``folder=True``) to write;
    on success it replaces ``path`` (a folder: the old one is renamed away first, then removed).
    On failure the temporary is removed and a full disk or a denied write raises
    :class:`~flowrl.safeload.WriteError` (one line: the path, the cause, the space needed)."""
    path = Path(path)
    # a file keeps its suffix (image writers pick the format from it): reward_curve.tmp.png
    tmp = path.with_name(path.name + ".tmp") if folder else path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        yield tmp
        _flush_to_disk(tmp)  # the rename must not reach the disk before the data (power loss)
        if folder and path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        failure = write_failure(exc)
        if failure is not None:
            raise WriteError(disk_error(failure, path, needed_bytes)) from None
        raise


def _flush_to_disk(tmp: Path) -> None:
    """fsync every file written under ``tmp`` (a file or a folder), then its folder, so that after
    a power loss the renamed name never points at data the disk did not keep."""
    files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else [tmp]
    for f in files:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(tmp if tmp.is_dir() else tmp.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_failure(exc: BaseException) -> OSError | None:
    """The write error behind ``exc`` as an ``OSError`` (torch's zip writer reports a full disk as
    ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos``), else None."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "file write failed" in text or "unexpected pos" in text):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def state_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state: what writing it needs on disk, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def disk_error(exc: OSError, path: Path, needed_bytes: int | None = None) -> str:
    """One line for a failed write: the path, what went wrong, the space needed when known."""
    if exc.errno == errno.ENOSPC:
        need = f"; about {_size(needed_bytes)} are needed" if needed_bytes else ""
        try:
            st = os.statvfs(path if path.exists() else path.parent)
            have = f", {_size(st.f_bavail * st.f_frsize)} free"
        except OSError:
            have = ""
        return f"no space left on the device writing {path}{need}{have}. Free some space (or set train.save_total_limit), then resume with train.resume_from=latest."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {os.strerror(exc.errno)}. Make the folder writable or choose another train.output_dir."
    return f"cannot write {path}: {os.strerror(exc.errno) if exc.errno else exc}."


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"
