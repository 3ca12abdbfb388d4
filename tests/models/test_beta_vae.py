"""β-VAE and its conv encoder/decoder: shapes, loss terms against hand-computed values, and
that a few optimisation steps reduce the loss."""

from __future__ import annotations

import math

import pytest
import torch

from latentzoo.models import BetaVAE
from latentzoo.models.beta_vae import gaussian_kl, reconstruction_loss
from latentzoo.models.nets import ConvDecoder, ConvEncoder


def make_vae(image_shape=(1, 64, 64), latent_dim=4, beta=4.0, likelihood="bernoulli"):
    return BetaVAE(
        encoder=ConvEncoder(image_shape, 2 * latent_dim),
        decoder=ConvDecoder(image_shape, latent_dim),
        latent_dim=latent_dim,
        beta=beta,
        likelihood=likelihood,
    )


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_decoder_shapes(size: int, channels: int) -> None:
    shape = (channels, size, size)
    x = torch.rand(2, *shape)
    assert ConvEncoder(shape, 20)(x).shape == (2, 20)
    assert ConvDecoder(shape, 10)(torch.randn(2, 10)).shape == (2, *shape)


def test_encoder_rejects_unsupported_sizes() -> None:
    with pytest.raises(ValueError, match="4 \\* 2\\^k"):
        ConvEncoder((1, 48, 48), 20)
    with pytest.raises(ValueError, match="square"):
        ConvEncoder((1, 64, 32), 20)


def test_standard_architecture_parameter_count() -> None:
    # dlib conv_encoder on 64x64x1 with 10 latents: convs 32-32-64-64 (k4), dense 256, dense 20.
    convs = (16 * 1 * 32 + 32) + (16 * 32 * 32 + 32) + (16 * 32 * 64 + 64) + (16 * 64 * 64 + 64)
    dense = (1024 * 256 + 256) + (256 * 20 + 20)
    assert sum(p.numel() for p in ConvEncoder((1, 64, 64), 20).parameters()) == convs + dense


def test_gaussian_kl_matches_closed_form() -> None:
    mean, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # KL(N(1,1)||N(0,1)) = 0.5; KL(N(0,4)||N(0,1)) = 0.5 * (4 - log 4 - 1)
    expected = torch.tensor([[0.5, 0.5 * (4.0 - math.log(4.0) - 1.0)]])
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)


def test_reconstruction_losses() -> None:
    x = torch.tensor([[1.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0]])
    # Bernoulli with p = 0.5 everywhere: -log 0.5 per pixel; l2 on sigmoid: 0.25 per pixel
    torch.testing.assert_close(
        reconstruction_loss(logits, x, "bernoulli"), torch.tensor([2 * math.log(2.0)])
    )
    torch.testing.assert_close(reconstruction_loss(logits, x, "gaussian"), torch.tensor([0.5]))
    with pytest.raises(ValueError):
        reconstruction_loss(logits, x, "poisson")


def test_capabilities_and_loss_terms() -> None:
    torch.manual_seed(0)
    vae = make_vae()
    x = (torch.rand(8, 1, 64, 64) > 0.5).float()
    code = vae.encode(x)
    assert code.shape == (8, 4)
    torch.testing.assert_close(code, vae.encode(x))  # deterministic: the posterior mean
    images = vae.sample(3)
    assert images.shape == (3, 1, 64, 64) and images.min() >= 0 and images.max() <= 1
    terms = vae.step((x, None), "val")
    torch.testing.assert_close(terms["loss"], terms["recon"] + 4.0 * terms["kl"])


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    vae = make_vae(beta=1.0)
    x = torch.zeros(16, 1, 64, 64)
    x[:, :, 16:48, 16:48] = 1.0
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = vae.step((x, None), "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
