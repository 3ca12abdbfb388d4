"""User-facing dataset errors: a missing, corrupt or mis-shaped dataset file.

They derive from :class:`~latentzoo.utils.errors.LatentzooError`, so the command-line entry points
print them as one line and exit with status 2 instead of showing a traceback.
"""

from __future__ import annotations

from pathlib import Path

from latentzoo.utils.errors import LatentzooError

__all__ = [
    "BadSampleError",
    "DatasetChecksumError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "bad_sample",
    "file_start",
]


class DatasetNotFoundError(LatentzooError):
    """A dataset file is missing (or could not be downloaded).

    The message names the exact path looked for, the expected file(s), where to get them, and
    how to make latentzoo fetch or prepare them.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        expected: str,
        source: str,
        download_override: str | None = None,
        prepare: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Build the message from its parts.

        Args:
            name: the dataset's display name (``"dSprites"``).
            path: the exact path looked for.
            expected: what should be there (file names, sizes).
            source: where the official files come from (URL or instructions).
            download_override: the Hydra override that turns on the automatic download, for
                datasets whose licence and host allow it (``"data.dataset.download=true"``).
            prepare: the command that converts the official files, for manual downloads.
            reason: why it failed, when it was not simply absent (e.g. the network error).
        """
        self.name = name
        self.path = Path(path)
        parts = [f"{name} not found: looked for {self.path}"]
        if reason:
            parts[0] += f" ({reason})"
        parts.append(f"expected {expected}")
        parts.append(f"get it from {source}")
        if prepare:
            parts.append(f"then convert it with `{prepare}`")
        if download_override:
            parts.append(f"or set {download_override} to download it automatically")
        super().__init__("; ".join(parts))


class DatasetFormatError(LatentzooError):
    """A dataset file exists but does not have the expected keys, shapes, count or order."""


class DatasetChecksumError(LatentzooError):
    """A downloaded file does not match its published checksum (the file is not kept)."""


class BadSampleError(DatasetFormatError):
    """One sample's file (an image, a shard) is corrupt; the message names it and what is wrong.

    Raised in a DataLoader worker, PyTorch re-raises it in the main process as
    ``BadSampleError("Caught BadSampleError in DataLoader worker ... Original Traceback ...")``;
    the constructor keeps only the original one-line message, so the entry points still print
    one line.
    """

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def bad_sample(source: str | Path, what: str) -> BadSampleError:
    """The error for a corrupt sample file, with the two ways out (``source`` and ``what``
    are kept as attributes for the skip handlers)."""
    error = BadSampleError(
        f"corrupt sample {source}: {what}; replace or delete it, or set "
        "data.on_bad_sample=skip to drop bad samples (counted and reported per epoch)"
    )
    error.source, error.what = str(source), what
    return error


def file_start(path: str | Path) -> str:
    """What a file that failed to parse looks like, to point the message the right way:
    empty, text (an HTML error page, a Git LFS pointer), or binary of some size."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with path.open("rb") as file:
        head = file.read(64)
    if head.lstrip()[:1] in (b"<", b"{") or head.startswith(b"version https://git-lfs"):
        return f"it is a text file ({size} bytes: an HTML error page or a Git LFS pointer?)"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"it is a text file ({size} bytes)"
    return f"{size} bytes starting with {head[:8]!r}"
