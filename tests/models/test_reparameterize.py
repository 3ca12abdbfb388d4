"""The posterior sample z = μ + σ·ε: present in training, absent (z = μ) in val/test for the
models whose reference code decodes μ there (β-VAE, FactorVAE, LieVAE), present in both for
β-TCVAE (Chen et al. sample in eval)."""

from __future__ import annotations

import pytest
import torch

from latentzoo.models.base import reparameterize
from tests.models.test_beta_tcvae import make_tcvae
from tests.models.test_beta_vae import make_vae
from tests.models.test_factor_vae import make_factor_vae
from tests.models.test_lie_vae import make_lie_vae


def test_reparameterize_draws_from_the_posterior() -> None:
    torch.manual_seed(0)
    mean = torch.full((20_000, 2), 3.0)
    logvar = torch.log(torch.tensor([[4.0, 0.25]])).expand(20_000, 2)
    z = reparameterize(mean, logvar)
    torch.testing.assert_close(z.mean(0), torch.tensor([3.0, 3.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([2.0, 0.5]), atol=0.03, rtol=0)
    assert torch.equal(reparameterize(mean, logvar, sample=False), mean)


def _latents_seen(model: torch.nn.Module, x: torch.Tensor, stage: str) -> torch.Tensor:
    """The z a loss decodes: the decoder's input, or the group map's input (LieVAE)."""
    seen: list[torch.Tensor] = []
    if hasattr(model, "lie"):
        group = model.group
        model.group = lambda z: seen.append(z.detach()) or group(z)  # type: ignore[method-assign]
    else:
        model.decoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    model.step((x, torch.zeros(len(x))), stage)
    return seen[0]


MODELS = {
    "beta_vae": (make_vae, False),
    "factor_vae": (make_factor_vae, False),
    "lie_vae": (lambda: make_lie_vae(forward_eg_prob=0.0), False),
    "beta_tcvae": (lambda: make_tcvae(dataset_size=1000), True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_samples_z_and_eval_uses_the_mean(name: str) -> None:
    make, samples_in_eval = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x = torch.rand(64, 1, 64, 64).round()
    with torch.no_grad():
        mean, logvar = model.posterior(x)
        model.train()
        z_train = _latents_seen(model, x, "train")
        model.eval()
        z_val = _latents_seen(model, x, "val")
        z_test = _latents_seen(model, x, "test")
    noise = (z_train - mean) / (0.5 * logvar).exp()  # ε: standard normal in training
    assert 0.85 < noise.std().item() < 1.15 and abs(noise.mean().item()) < 0.15
    for z in (z_val, z_test):
        if samples_in_eval:
            assert 0.85 < ((z - mean) / (0.5 * logvar).exp()).std().item() < 1.15
        else:
            assert torch.equal(z, mean)
