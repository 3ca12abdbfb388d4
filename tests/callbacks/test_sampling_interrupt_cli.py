"""Through the CLI: SIGTERM during a slow end-of-training sample grid stops the run within
seconds with status 143 and a last.ckpt (not after the grid, and not with a test stage)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import start_cli

# latent_fm at toy size; the final grid is a 2-million-step Euler solve (hours), so the signal
# certainly arrives during sampling
SLOW_GRID_RUN = [
    "model=latent_fm",
    "model/backbone=dit_tiny",
    "model/autoencoder=identity",
    "data=proc_blobs",
    "data.image_size=8",
    "data.num_train=32",
    "data.num_val=8",
    "data.num_test=8",
    "data.batch_size=8",
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "trainer.enable_progress_bar=false",
    "callbacks.reconstruction_grid=null",
    "callbacks.latent_traversal_grid=null",
    "callbacks.sample_grid.on_cpu.num_images=2",
    "callbacks.sample_grid.on_cpu.steps=2000000",
    "extras.print_config=false",
]


@pytest.mark.slow
def test_sigterm_during_the_final_sample_grid_exits_143_with_last_ckpt(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    process = start_cli("train.py", *SLOW_GRID_RUN, f"hydra.run.dir={tmp_path / 'run'}", log=log)
    try:
        deadline = time.monotonic() + 300
        while "sample grid on cpu" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the sample grid never started"
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the solve
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert returncode == 128 + signal.SIGTERM, text[-3000:]
    assert stopped_after < 30, f"took {stopped_after:.1f} s to stop"  # a bound, not a timing
    assert "samples grid at step 2 skipped: stopping on a signal" in text
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 2
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"
    assert not list((tmp_path / "run").rglob("samples_*.png"))
    assert "Testing" not in text
