"""The CPU-sized latent_fm experiment runs the paper experiments' code path end to end: a
latent cache, a global batch, EMA and LFM's per-epoch cosine schedule, through train()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config


@pytest.mark.slow
def test_cached_proc_blobs_experiment_trains_by_epochs_from_the_cache(tmp_path: Path) -> None:
    from latentzoo.cache_latents import cache_latents
    from latentzoo.models.autoencoders import IdentityFirstStage
    from latentzoo.train import train
    from tests.test_cache_latents import tiny_images

    cache = tmp_path / "cache"
    cache_latents(tiny_images(24), IdentityFirstStage(3), cache, [3, 8, 8], num_classes=0)
    overrides = [
        "experiment=latent_fm_proc_blobs_cached",
        f"data.path={cache}",
        "data.image_shape=[3,8,8]",
        "data.global_batch_size=8",
        "data.val_size=8",
        "model.backbone.patch_size=4",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_grid.num_images=4",
        "~callbacks.rich_progress_bar",
        "~callbacks.rich_model_summary",
        "extras.print_config=false",
        "test=false",
    ]
    _, objects = train(compose_config("train", overrides, tmp_path / "run"))
    trainer, model = objects["trainer"], objects["model"]
    steps_per_epoch = trainer.num_training_batches
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * steps_per_epoch
    assert model.ema.num_updates == trainer.global_step
    # the cosine ran per epoch over max_epochs = 2: lr 1e-3 -> 1e-5
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-5)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["latent_fm"]["first_stage"]["class"] == "IdentityFirstStage"
    images = model.sample(2)
    assert images.shape == (2, 3, 8, 8) and model.last_nfe == 20
