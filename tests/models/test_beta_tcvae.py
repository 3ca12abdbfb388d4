"""β-TCVAE: the minibatch TC estimators on latents with known dependence, the exact KL
decomposition identity, the loss, shapes and a short optimisation."""

from __future__ import annotations

import math

import pytest
import torch

from latentzoo.models import BetaTCVAE, BetaVAE
from latentzoo.models.beta_tcvae import _log_weights, gaussian_log_density, kl_decomposition
from latentzoo.models.nets import ConvDecoder, ConvEncoder

N = 737_280  # dSprites


def make_tcvae(image_shape=(1, 64, 64), latent_dim=4, **kwargs):
    kwargs.setdefault("dataset_size", 1000)
    return BetaTCVAE(
        encoder=ConvEncoder(image_shape, 2 * latent_dim, hidden=64),
        decoder=ConvDecoder(image_shape, latent_dim, hidden=64),
        latent_dim=latent_dim,
        **kwargs,
    )


def posterior_samples(shared: bool, spread: float, batch=1024, dims=10, seed=0):
    """q(z|x_n) = N(μ_n, (1 − s²) I) with μ_n ~ N(0, s² I): the aggregate posterior is N(0, I),
    independent across dimensions. ``shared``: every dimension of μ_n is the same draw, so
    the dimensions of z are strongly dependent."""
    g = torch.Generator().manual_seed(seed)
    width = 1 if shared else dims
    mean = (torch.randn(batch, width, generator=g) * spread).expand(batch, dims).contiguous()
    logvar = torch.full((batch, dims), math.log(1 - spread**2))
    z = mean + torch.randn(batch, dims, generator=g) * (0.5 * logvar).exp()
    return z, mean, logvar


def test_mss_total_correlation_near_zero_when_independent_positive_when_dependent() -> None:
    tc_independent = kl_decomposition(*posterior_samples(False, 0.5), N, "mss")["tc"]
    tc_dependent = kl_decomposition(*posterior_samples(True, 0.8), N, "mss")["tc"]
    assert abs(tc_independent.item()) < 0.05
    assert tc_dependent.item() > 2.0


def test_mws_total_correlation() -> None:
    # MWS weighs every pair 1/(NM): each row's weights sum to 1/N instead of 1, so when many
    # batch members explain a sample (broad posteriors) log q(z) is low by log N and each
    # log q(z_j) too, and the estimate sits (D − 1)·log N above the TC. The offset is a constant
    # (no effect on gradients); the dependence still shows as a clear excess.
    offset = 9 * math.log(N)
    tc_independent = kl_decomposition(*posterior_samples(False, 0.5), N, "mws")["tc"].item()
    tc_dependent = kl_decomposition(*posterior_samples(True, 0.8), N, "mws")["tc"].item()
    assert tc_independent == pytest.approx(offset, abs=0.1)
    assert tc_dependent - tc_independent > 2.0


def test_mss_weights_sum_to_one() -> None:
    weights = _log_weights(16, N, "mss", torch.zeros(1, dtype=torch.float64)).exp()
    torch.testing.assert_close(weights.sum(1), torch.ones(16, dtype=torch.float64))
    assert weights.diagonal().allclose(torch.full((16,), 1 / N, dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_decomposition_sums_to_sampled_kl(estimator: str) -> None:
    z, mean, logvar = posterior_samples(False, 0.7, batch=64, dims=5)
    parts = kl_decomposition(z, mean, logvar, N, estimator)
    sampled_kl = (
        gaussian_log_density(z, mean, logvar) - gaussian_log_density(z, 0 * z, 0 * z)
    ).sum(1)
    torch.testing.assert_close(parts["mi"] + parts["tc"] + parts["dim_kl"], sampled_kl.mean())


def test_loss_weights_the_decomposition() -> None:
    torch.manual_seed(0)
    vae = make_tcvae(beta=6.0, alpha=2.0, gamma=3.0, estimator="mss")
    x = (torch.rand(8, 1, 64, 64) > 0.5).float()
    torch.manual_seed(1)
    terms = vae.step((x, None), "train")
    expected = (
        terms["recon"] + terms["kl"] + 1.0 * terms["mi"] + 5.0 * terms["tc"] + 2.0 * terms["dim_kl"]
    )
    torch.testing.assert_close(terms["loss"], expected)
    # β = α = γ = 1 is the plain VAE
    plain, reference = (
        make_tcvae(beta=1.0),
        BetaVAE(
            encoder=ConvEncoder((1, 64, 64), 8, hidden=64),
            decoder=ConvDecoder((1, 64, 64), 4, hidden=64),
            latent_dim=4,
            beta=1.0,
        ),
    )
    reference.load_state_dict(plain.state_dict())
    torch.manual_seed(2)
    loss_tc = plain.step((x, None), "train")["loss"]
    torch.manual_seed(2)
    torch.testing.assert_close(loss_tc, reference.step((x, None), "train")["loss"])


def test_needs_dataset_size() -> None:
    vae = make_tcvae(dataset_size=None)
    with pytest.raises(ValueError, match="dataset_size"):
        vae.step((torch.rand(4, 1, 64, 64), None), "train")
    with pytest.raises(ValueError, match="estimator"):
        make_tcvae(estimator="exact")


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(channels: int) -> None:
    vae = make_tcvae((channels, 64, 64))
    x = torch.rand(4, channels, 64, 64)
    assert vae.encode(x).shape == (4, 4)
    images = vae.sample(2)
    assert images.shape == (2, channels, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert {"loss", "recon", "kl", "mi", "tc", "dim_kl"} <= set(vae.step((x, None), "train"))


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    vae = make_tcvae((1, 32, 32), beta=6.0)
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = vae.step((x, None), "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
