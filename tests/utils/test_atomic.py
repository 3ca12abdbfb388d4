"""Atomic writes: a failed or killed write leaves the previous file intact and, after the next
start's clean-up, no temp files; checkpoints go through the same path (AtomicCheckpointIO)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentzoo.utils.atomic import TEMP_SUFFIX, atomic_write, remove_stale_temp_files
from latentzoo.utils.checkpoint_io import AtomicCheckpointIO, nonfinite_entries
from tests.conftest import ROOT


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{TEMP_SUFFIX}"))


def test_failed_write_keeps_old_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as file:
        file.write("half of the new")
        raise RuntimeError("crash in the middle of a write")
    assert target.read_text() == "old"
    assert temp_files(tmp_path) == []


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    import socket

    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".last.ckpt.{host}.{dead}.abcd1234{TEMP_SUFFIX}"
    stale.write_bytes(b"partial")
    live = tmp_path / f".last.ckpt.{host}.{os.getppid()}.abcd1234{TEMP_SUFFIX}"  # still running
    live.write_bytes(b"being written")
    keep = tmp_path / "last.ckpt"
    keep.write_bytes(b"good")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert temp_files(tmp_path) == [live] and keep.read_bytes() == b"good"


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from latentzoo.utils.checkpoint_io import AtomicCheckpointIO

    class Slow:  # pickled in the middle of torch.save, after the temp file was opened
        def __reduce__(self):
            print("writing", flush=True)
            time.sleep(120)
            return (int, (0,))

    io = AtomicCheckpointIO()
    path = sys.argv[1]
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    big = {"state_dict": {"w": torch.zeros(3), "big": torch.randn(1_000_000)}, "global_step": 2}
    io.save_checkpoint({**big, "slow": Slow()}, path)
    """
)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = writer.stdout.readline()  # blocks until the second save is under way
        assert line.strip() == "writing", writer.stderr.read()
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    checkpoint = torch.load(target, weights_only=True)  # the first save, intact
    assert checkpoint["global_step"] == 1 and torch.equal(
        checkpoint["state_dict"]["w"], torch.ones(3)
    )
    assert len(temp_files(tmp_path)) == 1, "the killed save should have left its temp file"
    remove_stale_temp_files(tmp_path)  # ... removed at the next start (Checkpoints.setup)
    assert temp_files(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_refuses_nonfinite_weights_and_ema(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 5}, good)
    assert io.last_written == (str(good), 5)
    for bad in (
        {"state_dict": {"w": torch.tensor([1.0, float("nan")])}},
        {
            "state_dict": {"w": torch.ones(2)},
            "ema": {"shadow": {"w": torch.tensor([float("inf")])}},
        },
    ):
        path = tmp_path / "bad.ckpt"
        io.save_checkpoint({**bad, "global_step": 6}, path)
        assert not path.exists()
        assert nonfinite_entries(bad)
    assert io.last_written == (str(good), 5)
    assert nonfinite_entries({"state_dict": {"step": torch.tensor(3)}}) == []  # ints are fine
    assert temp_files(tmp_path) == []
