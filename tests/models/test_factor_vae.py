"""FactorVAE: the discriminator architecture, the dimension-wise permutation, the density-ratio
TC term, both optimizers stepping under Lightning (one global step per batch), shapes and a
short optimisation."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from latentzoo.models import FactorVAE
from latentzoo.models.factor_vae import Discriminator, permute_dims
from latentzoo.models.nets import ConvDecoder, ConvEncoder


def make_factor_vae(image_shape=(1, 64, 64), latent_dim=4, hidden=64, **kwargs):
    return FactorVAE(
        encoder=ConvEncoder(image_shape, 2 * latent_dim, hidden=hidden),
        decoder=ConvDecoder(image_shape, latent_dim, hidden=hidden),
        discriminator=Discriminator(latent_dim, hidden=32, num_layers=2),
        latent_dim=latent_dim,
        **kwargs,
    )


def test_discriminator_is_the_papers_mlp() -> None:
    layers = list(Discriminator(10).net)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (10, 1000),
        *[(1000, 1000)] * 5,
        (1000, 2),
    ]
    slopes = [m.negative_slope for m in layers if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2] * 6


def test_permute_dims_shuffles_each_dimension_independently() -> None:
    torch.manual_seed(0)
    z = torch.arange(200.0).view(50, 4)  # every entry distinct
    perm = permute_dims(z)
    for j in range(4):  # each column keeps its values
        assert torch.equal(perm[:, j].sort().values, z[:, j])
    # ... but rows are mixed: almost no row of the permutation is a row of z
    rows = {tuple(r) for r in z.tolist()}
    assert sum(tuple(r) in rows for r in perm.tolist()) < 5


def test_tc_term_is_the_logit_difference() -> None:
    torch.manual_seed(0)
    vae = make_factor_vae(gamma=7.0)
    x = (torch.rand(6, 1, 64, 64) > 0.5).float()
    torch.manual_seed(1)
    terms, z = vae.vae_terms(x)
    logits = vae.discriminator(z)
    torch.testing.assert_close(terms["tc"], (logits[:, 0] - logits[:, 1]).mean())
    torch.testing.assert_close(terms["loss"], terms["recon"] + terms["kl"] + 7.0 * terms["tc"])
    d = vae.discriminator_terms(z.detach(), z.detach())
    assert 0.0 <= d["d_accuracy"].item() <= 1.0 and d["d_loss"].item() > 0


def test_both_optimizers_step_under_lightning(tmp_path) -> None:
    torch.manual_seed(0)
    vae = make_factor_vae((1, 32, 32), gamma=10.0)
    vae.discriminator_optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-3)
    before = copy.deepcopy(vae.state_dict())
    data = TensorDataset((torch.rand(32, 1, 32, 32) > 0.5).float())
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        log_every_n_steps=1,  # terms are logged on logging steps only
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(vae, DataLoader(data, batch_size=8))
    assert trainer.global_step == 3  # one step per batch although two optimizers stepped
    after = vae.state_dict()
    for prefix in ("encoder.", "decoder.", "discriminator."):
        changed = [
            k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])
        ]
        assert changed, f"no {prefix[:-1]} parameter changed"
    assert {"train/loss", "train/tc", "train/d_loss", "train/d_accuracy"} <= set(
        trainer.callback_metrics
    )


def test_split_batch_mode() -> None:
    vae = make_factor_vae(discriminator_batch="split")
    x = torch.rand(8, 1, 64, 64)
    first, second = vae.split_batch(x)
    assert len(first) == len(second) == 4
    z_real, z_other = vae.discriminator_inputs(vae.vae_terms(first)[1], second)
    assert z_real.shape == z_other.shape == (4, 4) and not z_other.requires_grad
    with pytest.raises(ValueError, match="discriminator_batch"):
        make_factor_vae(discriminator_batch="other")


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(channels: int) -> None:
    vae = make_factor_vae((channels, 64, 64))
    x = torch.rand(4, channels, 64, 64)
    assert vae.encode(x).shape == (4, 4)
    images = vae.sample(2)
    assert images.shape == (2, channels, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert {"loss", "recon", "kl", "tc", "d_loss"} <= set(vae.step((x, None), "val"))


def test_training_steps_reduce_loss_and_discriminator_learns() -> None:
    """The bare two-optimizer loop: the VAE loss falls, and the discriminator, trained against
    latents it can tell apart (the VAE is frozen here), gets better than chance."""
    torch.manual_seed(0)
    vae = make_factor_vae((1, 32, 32), gamma=1.0)
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0
    vae_opt = torch.optim.Adam([*vae.encoder.parameters(), *vae.decoder.parameters()], lr=1e-3)
    losses = []
    for _ in range(30):
        terms, _ = vae.vae_terms(x)
        vae_opt.zero_grad()
        terms["loss"].backward()
        vae_opt.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.5 * losses[0]

    d_opt = torch.optim.Adam(vae.discriminator.parameters(), lr=3e-3)
    shared = torch.randn(256, 1).expand(256, 4)  # fully dependent latents: TC is large
    d_losses = []
    for _ in range(100):
        d = vae.discriminator_terms(shared, shared)
        d_opt.zero_grad()
        d["d_loss"].backward()
        d_opt.step()
        d_losses.append(d["d_loss"].item())
    assert d_losses[-1] < 0.5 and d["d_accuracy"] > 0.75
    assert vae.vae_terms(x)[0]["tc"].item() != 0
