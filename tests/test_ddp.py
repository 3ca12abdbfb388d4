"""Every method trains under DDP (``trainer=ddp_sim``: 2 CPU processes over gloo, the code path
of multi-GPU DDP): after every step both ranks hold the same weights (and EMA), while each rank
draws its own training randomness and batches; the same seed reproduces the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY_NFPI, run_cli
from tests.ddp_equivalence import METHODS as EQUIVALENCE_METHODS

SHORT = [
    "trainer=ddp_sim",
    "trainer.max_steps=4",
    "trainer.max_epochs=-1",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=null",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "extras.print_config=false",
    "+callbacks.ddp_probe._target_=tests.ddp_probe.DDPProbe",
]
FACTORS = ["data.dataset.size=small", "data.batch_size=8", "data.val_size=32", "data.test_size=32"]
SEQUENCES = [
    "experiment=latent_flow_proc_dsprites",
    "data.batch_size=4",
    "data.val_per_k=4",
    "data.test_per_k=4",
    "callbacks.flow_paths.every_n_steps=0",
]
BLOBS = ["data=proc_blobs", "data.image_size=16", "data.num_val=8", "data.num_test=8"]
DLP = [
    "experiment=dlp_shapes_debug",
    "data.num_train=16",  # 2 steps per epoch per rank: epoch 0 is the object model's warm-up
    "data.global_batch_size=8",  # 4 per rank
    "callbacks.keypoint_overlay.every_n_steps=0",
]
METHODS = {
    "beta_vae": FACTORS,
    "beta_tcvae": ["model=beta_tcvae", *FACTORS],
    "factor_vae": ["model=factor_vae", *FACTORS],
    "lie_vae": ["model=lie_vae", *FACTORS],
    "latent_flow": SEQUENCES,
    "latent_flow_weak": [*SEQUENCES, "model.variant=weak"],
    "latent_fm": [
        "experiment=latent_fm_proc_blobs",
        *BLOBS,
        "data.batch_size=4",
        "model.sampler.steps=2",
        "callbacks.sample_grid.num_images=4",
    ],
    "kl_autoencoder": [
        "model=kl_autoencoder",
        *BLOBS,
        "data.batch_size=2",
        "model.net.ch=8",
        "callbacks.latent_traversal_grid=null",
    ],
    "soft_intro_vae": [
        "experiment=soft_intro_vae_proc_cifar",
        "data.num_train=64",
        "data.val_size=16",
        "data.batch_size=4",
        "callbacks.epoch_checkpoint=null",
    ],
    "dlp_masked": [*DLP, "model.use_object_dec=false"],
    "dlp_object": DLP,
    "nfpi": TINY_NFPI,
}


def train_ddp(tmp_path: Path, overrides: list[str], name: str = "run") -> list[dict]:
    """Run a 2-process training; return each rank's per-step probe records."""
    probe = tmp_path / f"{name}_probe"
    result = run_cli(
        "train.py",
        *SHORT,
        *overrides,
        f"+callbacks.ddp_probe.out_dir={probe}",
        f"hydra.run.dir={tmp_path / name}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "global batch" in result.stdout + result.stderr
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world"] == 2 for rank in ranks)
    return [rank["steps"] for rank in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_under_ddp_with_equal_weights_and_per_rank_noise(
    method: str, tmp_path: Path
) -> None:
    rank0, rank1 = train_ddp(tmp_path, METHODS[method])
    assert len(rank0) == len(rank1) >= 4
    for a, b in zip(rank0, rank1, strict=True):
        assert a["step"] == b["step"]
        assert a["params"] == b["params"], f"weights differ across ranks at step {a['step']}"
        assert a.get("ema") == b.get("ema"), f"EMA differs across ranks at step {a['step']}"
        assert a["noise"] != b["noise"], f"both ranks draw the same noise at step {a['step']}"
        assert a["batch"] != b["batch"], f"both ranks got the same batch at step {a['step']}"
    assert len({step["params"] for step in rank0}) == len(rank0)  # the weights do move
    if method in ("latent_fm", "nfpi"):
        assert all("ema" in step for step in rank0)
    if method == "latent_fm":  # the sample grid was drawn in shares and gathered: 4 images
        log = (tmp_path / "run" / "train.log").read_text()
        assert "samples grid at step 4: " in log and "on each of 2 rank(s)" in log
        grid = Image.open(next((tmp_path / "run" / "images").glob("samples_step*.png")))
        assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # make_grid: 2×2 tiles, padding 2


@pytest.mark.slow
def test_same_seed_and_world_size_reproduce_the_run(tmp_path: Path) -> None:
    first = train_ddp(tmp_path, FACTORS, "first")
    again = train_ddp(tmp_path, FACTORS, "again")
    assert first == again
    other = train_ddp(tmp_path, [*FACTORS, "seed=7"], "other")
    assert other[0][0]["params"] != first[0][0]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(EQUIVALENCE_METHODS))
def test_two_rank_step_equals_one_rank_step_on_the_global_batch(
    method: str, tmp_path: Path
) -> None:
    """Gradients are averaged over ranks exactly once per optimizer (single-optimizer, manual
    two-optimizer and find_unused_parameters models): one step on the two halves of a global
    batch on 2 ranks gives the weights of one step on the whole batch on 1 rank."""
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"{devices}.pt"
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "ddp_equivalence.py"),
                method,
                str(devices),
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        results[devices] = torch.load(out)
    before = results[1]["before"]
    steps = {
        key: (one - before[key], results[2]["after"][key] - before[key])
        for key, one in results[1]["after"].items()
        if one.is_floating_point()
    }
    # float64 rounding of updates that are zero analytically (e.g. a bias before a softmax)
    floor = 1e-12 * max(float(one.norm()) for one, _ in steps.values())
    moved = 0
    for key, (step_one, step_two) in steps.items():
        if step_one.norm() > floor:
            error = float((step_two - step_one).norm() / step_one.norm())
            assert error < 1e-6, f"{key}: the 2-rank update is off by {error:.2e} (relative)"
            moved += 1
        else:
            assert step_two.norm() <= 1e3 * floor, f"{key}: moved on 2 ranks only"
    assert moved >= 2  # the step did update the networks
