"""User-facing dataset errors: a missing, corrupt or mis-shaped dataset file.

They derive from :class:`~latentzoo.utils.errors.LatentzooError`, so the command-line entry points
print them as one line and exit with status 2 instead of showing a traceback.
"""

from __future__ import annotations

from pathlib import Path

from latentzoo.utils.errors import LatentzooError

__all__ = ["DatasetChecksumError", "DatasetFormatError", "DatasetNotFoundError"]


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
