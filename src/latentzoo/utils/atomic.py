"""Atomic file writes: a kill at any instant leaves either the old file or the new one.

The new content goes to a temp file in the target's own folder (so the final ``os.replace`` is a
rename on one filesystem, never a copy), is flushed and fsynced, then renamed over the target;
the folder is fsynced so the rename itself survives a power cut. A write that fails removes its
temp file; a write killed with SIGKILL leaves one behind, which :func:`remove_stale_temp_files`
deletes at the next start.

Used for checkpoints (:class:`latentzoo.callbacks.checkpointing.AtomicCheckpointIO`),
``metrics.json`` and the latent-cache manifest.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# <folder>/.<name>.<host>.<pid>.<random>.partial
TEMP_SUFFIX = ".partial"


def _temp_path(path: Path) -> Path:
    host = socket.gethostname().replace(".", "_") or "host"
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, or a filesystem that refuses to open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: ...`` writes ``f`` to ``path`` atomically.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8). The target keeps its old content until the
    block has finished without an error."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(temp, mode, encoding=encoding) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as file:
        file.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as file:
        file.write(text)


def _owner_alive(temp: Path) -> bool:
    """Whether the process that named ``temp`` still runs on this host (then it is writing)."""
    parts = temp.name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
    if len(parts) != 4:
        return False
    _, host, pid, _ = parts
    if host != socket.gethostname().replace(".", "_") or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # ours, but nothing of ours is being written while we clean up
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files that killed :func:`atomic_write` calls left in ``folder``; returns them.

    Temp files of a process that still runs on this host are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):
        if temp.is_file() and not _owner_alive(temp):
            with contextlib.suppress(OSError):
                temp.unlink()
                removed.append(temp)
    return removed
