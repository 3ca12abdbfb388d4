"""Exact resume through the real CLI (DESIGN.md, "Contracts at scale": checkpoints, seeds): a
run killed with SIGKILL at a random moment and resumed from ``last.ckpt`` ends with weights,
EMA and optimizer state bitwise equal to the uninterrupted run with the same seed."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.resume_harness import Kill, final_state, kill_and_resume, run_to_end

pytestmark = pytest.mark.slow

# steps: 22, "epochs" of 8 batches (limit_train_batches) so that runs cross epoch ends;
# last.ckpt every 3 steps, validation (which samples: it must not shift training) every 4
COMMON = [
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "trainer.max_steps=22",
    "trainer.limit_train_batches=8",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "extras.print_config=false",
    "test=false",
]
BETA_VAE = [
    *COMMON,
    "data.dataset.size=small",
    "data.val_size=16",
    "data.test_size=16",
    "data.batch_size=8",
    "callbacks.reconstruction_grid.every_n_steps=4",  # callbacks that sample, between steps
    "~callbacks.latent_traversal_grid",
]
LATENT_FLOW = [
    *COMMON,
    "experiment=latent_flow_proc_dsprites",
    "data.source.dataset.size=small",
    "data.seq_len=2",
    "data.batch_size=8",
    "data.val_per_k=2",
    "data.test_per_k=2",
    "model.latent_dim=4",
    "model.encoder.channels=[4,4,4,4]",
    "model.encoder.hidden=16",
    "callbacks.flow_paths.every_n_steps=8",
]
LATENT_FM = [  # EMA on; identity first stage; flips per batch
    "model/backbone=dit_tiny",
    "model.backbone.patch_size=4",
    "model/autoencoder=identity",
    "model.ema_decay=0.9",
    "model.sampler.name=euler",
    "model.sampler.steps=2",
    "callbacks.sample_grid.every_n_steps=8",
    "callbacks.sample_grid.num_images=4",
]
LATENT_FM_BLOBS = [
    *COMMON,
    "experiment=latent_fm_proc_blobs",
    *LATENT_FM,
    "data.image_size=16",
    "data.num_train=96",
    "data.num_val=8",
    "data.num_test=8",
    "data.batch_size=8",
]


def _kills(n: int, saves: int, max_delay: float) -> tuple[list[Kill], str]:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    kills = [Kill(rng.randint(1, saves), rng.uniform(0.0, max_delay)) for _ in range(n)]
    return kills, f"kill seed {seed}: {kills}"


def assert_exact_resume(tmp_path: Path, overrides: list[str], kills: int = 1, saves: int = 5):
    run_to_end(tmp_path / "uninterrupted", overrides)
    reference = final_state(tmp_path / "uninterrupted")
    plan, why = _kills(kills, saves, max_delay=1.0)
    result = kill_and_resume(tmp_path / "killed", overrides, plan, reference)
    assert any(a.killed for a in result.attempts), f"never killed; {why}"
    assert not result.differences, f"resumed run differs: {result.differences}; {why}"
    assert reference["global_step"] == 22


def test_beta_vae_kill_and_resume_is_exact(tmp_path: Path) -> None:
    assert_exact_resume(tmp_path, BETA_VAE)


def test_beta_vae_resume_at_an_epoch_end_is_exact(tmp_path: Path) -> None:
    """last.ckpt only at the last batch of an epoch (the epoch counter must not drift); the
    validation (whose new best also refreshes last.ckpt) at the same step."""
    overrides = [
        *BETA_VAE,
        "callbacks.model_checkpoint.every_n_train_steps=8",
        "trainer.val_check_interval=8",
    ]
    run_to_end(tmp_path / "uninterrupted", overrides)
    reference = final_state(tmp_path / "uninterrupted")
    result = kill_and_resume(tmp_path / "killed", overrides, [Kill(1, 0.0)], reference)
    assert result.attempts[0].saved_step == 8
    assert not result.differences, result.differences


def test_latent_flow_kill_and_resume_is_exact(tmp_path: Path) -> None:
    assert_exact_resume(tmp_path, LATENT_FLOW)


def test_latent_fm_with_ema_kill_and_resume_is_exact(tmp_path: Path) -> None:
    assert_exact_resume(tmp_path, LATENT_FM_BLOBS)
    assert final_state(tmp_path / "uninterrupted")["ema"] is not None


def test_latent_fm_on_cached_latents_kill_and_resume_is_exact(tmp_path: Path) -> None:
    from latentzoo.cache_latents import cache_latents
    from latentzoo.models.autoencoders import IdentityFirstStage
    from tests.test_cache_latents import tiny_images

    cache = tmp_path / "cache"
    cache_latents(tiny_images(64), IdentityFirstStage(3), cache, [3, 8, 8], num_classes=3)
    overrides = [
        *COMMON,
        "model=latent_fm",
        *LATENT_FM,
        "model.backbone.patch_size=2",
        "data=latents",
        f"data.path={cache}",
        "data.image_shape=[3,8,8]",
        "data.num_classes=3",
        "data.batch_size=8",
        "data.val_size=8",
        "data.num_workers=2",  # worker-side ε and flips must resume too
        "data.pin_memory=false",
        "~callbacks.reconstruction_grid",
        "~callbacks.latent_traversal_grid",
    ]
    assert_exact_resume(tmp_path, overrides)


def test_ddp_sim_beta_vae_kill_and_resume_is_exact(tmp_path: Path) -> None:
    overrides = [*BETA_VAE, "trainer=ddp_sim", "trainer.max_steps=22"]
    assert_exact_resume(tmp_path, overrides)
