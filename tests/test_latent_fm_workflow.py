"""The latent FM workflow through the three CLIs, as a user runs it: cache the latents of an
image dataset, train from the cache (``data=latents``), then ``eval.py metrics=fid``, whose
reference statistics must come from the source images recorded in the cache's manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

SOURCE = ["data=proc_blobs", "data.image_size=16", "data.num_train=40"]
QUIET = ["extras.print_config=false"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _metrics(log_dir: Path) -> dict[str, float]:
    (file,) = log_dir.glob("eval/runs/*/metrics.json")
    return json.loads(file.read_text())["metrics"]


def test_fid_on_cached_latents_uses_the_source_images(tmp_path: Path) -> None:
    from latentzoo.data.images import ProcBlobsDataModule
    from latentzoo.metrics.generative import ReferenceStats, TinyFeatureExtractor, to_uint8

    cache, logs = tmp_path / "cache", tmp_path / "logs"
    _ok(
        run_cli(
            "src/latentzoo/cache_latents.py",
            *SOURCE,
            "model/autoencoder=identity",
            f"out={cache}",
            f"paths.log_dir={logs}",
        )
    )
    _ok(
        run_cli(
            "src/latentzoo/train.py",
            "experiment=latent_fm_proc_blobs_cached",
            f"data.path={cache}",
            "data.image_shape=[3,16,16]",
            "data.val_size=8",
            "data.global_batch_size=16",
            "model.backbone.patch_size=4",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "callbacks.sample_grid.num_images=4",
            "test=false",
            f"paths.log_dir={logs}",
            "trainer.enable_progress_bar=false",
            "~callbacks.rich_progress_bar",
            *QUIET,
        )
    )
    (ckpt,) = logs.glob("train/runs/*/checkpoints/last.ckpt")
    stats_dir = tmp_path / "stats"
    fid_args = [
        f"ckpt_path={ckpt}",
        "metrics=fid",
        "metrics.fid.extractor=tiny",
        "metrics.fid.kid=false",
        "num_samples=24",
        "sampler=euler",
        "steps=2",
        "test_loop=false",
        *QUIET,
    ]
    _ok(
        run_cli(
            "src/latentzoo/eval.py",
            *fid_args,
            f"metrics.fid.stats_dir={stats_dir}",
            f"paths.log_dir={logs}",
        )
    )
    fid = _metrics(logs)["fid/fid"]

    # the reference is the 40 un-augmented source training images, not the latents or flips
    (reference_file,) = stats_dir.glob("*.npz")
    reference = ReferenceStats.load(reference_file)
    assert reference.count == 40 and reference.meta["dataset"] == "proc_blobs"
    source = ProcBlobsDataModule(image_size=16, num_train=40)
    images = torch.cat([b[0] for b in source.reference_dataloader("train", batch_size=40)])
    features = TinyFeatureExtractor()(to_uint8(images)).double().numpy()
    np.testing.assert_allclose(reference.mu, features.mean(0), rtol=1e-6, atol=1e-9)

    # the same statistics given as a file (metrics.fid.reference_path) give the same FID
    other_logs = tmp_path / "logs_path"
    _ok(
        run_cli(
            "src/latentzoo/eval.py",
            *fid_args,
            f"metrics.fid.reference_path={reference_file}",
            f"paths.log_dir={other_logs}",
        )
    )
    assert _metrics(other_logs)["fid/fid"] == pytest.approx(fid, rel=1e-9)
