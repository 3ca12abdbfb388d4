"""Download a dataset file: progress bar, atomic write, checksum verification, clean offline error.

Only the datasets whose licence and host allow it are fetched automatically (dSprites, 3D Shapes;
``shared/specs/datasets.md``), and only when the user asks for it (``download=true``). The file is
streamed to a temporary file in the destination folder and renamed into place only once it is
complete and its checksum (when known) matches, so an interrupted or corrupt download never leaves
a half-written file under the real name. Without network access the error says where to put the
file by hand.

Checksums are strings ``"md5:<hex>"`` or ``"sha256:<hex>"``; a bare hex string is read as MD5
(32 digits) or SHA-256 (64 digits); ``None`` skips the check.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from latentzoo.data.datasets.errors import DatasetChecksumError, DatasetNotFoundError

__all__ = ["download_url", "file_checksum", "parse_checksum", "publish_file", "verify_checksum"]

log = logging.getLogger(__name__)

_BLOCK = 1 << 20  # bytes per read/write while streaming and hashing
_HEX_LENGTHS = {32: "md5", 64: "sha256"}
_ALGORITHMS = ("md5", "sha1", "sha256")


def parse_checksum(checksum: str | None) -> tuple[str, str] | None:
    """Split ``"algo:hex"`` (or bare MD5/SHA-256 hex) into ``(algo, hex)``; None -> None."""
    if checksum is None or str(checksum).strip() == "":
        return None
    text = str(checksum).strip().lower()
    if ":" in text:
        algo, digest = text.split(":", 1)
    else:
        algo, digest = _HEX_LENGTHS.get(len(text), ""), text
    if algo not in _ALGORITHMS or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(
            f"checksum must be 'md5:<hex>', 'sha1:<hex>' or 'sha256:<hex>', got {checksum!r}"
        )
    return algo, digest


def file_checksum(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: str | Path, checksum: str | None) -> None:
    """Raise :class:`DatasetChecksumError` when ``path`` does not match ``checksum`` (if given)."""
    parsed = parse_checksum(checksum)
    if parsed is None:
        return
    algo, expected = parsed
    actual = file_checksum(path, algo)
    if actual != expected:
        raise DatasetChecksumError(
            f"checksum mismatch for {path}: expected {algo} {expected}, got {actual} "
            "(corrupt or changed upstream file)"
        )


def publish_file(tmp: str | Path, dest: str | Path) -> None:
    """Rename a complete temporary file onto ``dest`` (atomic on one filesystem).

    Temporary files from ``tempfile.mkstemp`` are private (0600); the published file gets the
    usual permissions (0666 minus the umask) so that shared data folders stay readable.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, dest)


def download_url(
    url: str,
    dest: str | Path,
    *,
    checksum: str | None = None,
    name: str | None = None,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its checksum; return ``dest``.

    Args:
        url: source URL (``http(s)://`` or ``file://``).
        dest: destination file; its folder is created.
        checksum: expected ``"md5:<hex>"`` / ``"sha256:<hex>"`` or None to skip the check.
        name: dataset name for error messages (default: the file name).
        timeout: socket timeout in seconds.
        progress: show a progress bar; None shows it only on a terminal.

    Raises:
        DatasetNotFoundError: the URL cannot be reached (offline, HTTP error); the message says
            where to put the file by hand.
        DatasetChecksumError: the downloaded bytes do not match ``checksum`` (nothing is kept).
    """
    dest = Path(dest)
    parse_checksum(checksum)  # fail on a malformed checksum before downloading anything
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    log.info("downloading %s to %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
                with response:
                    length = response.headers.get("Content-Length") if response.headers else None
                    total = int(length) if length and str(length).isdigit() else None
                    written = 0
                    with tqdm(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=dest.name,
                        disable=None if progress is None else not progress,
                    ) as bar:
                        while block := response.read(_BLOCK):
                            out.write(block)
                            written += len(block)
                            bar.update(len(block))
                    if total is not None and written != total:
                        raise OSError(f"incomplete download: {written} of {total} bytes")
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
                reason = getattr(error, "reason", None) or error
                raise DatasetNotFoundError(
                    name or dest.name,
                    dest,
                    expected=f"the file {dest.name}",
                    source=f"{url} (download it by hand and save it as {dest})",
                    reason=f"download failed: {reason}",
                ) from error
        verify_checksum(tmp, checksum)
        publish_file(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s (%d bytes)", dest, dest.stat().st_size)
    return dest
