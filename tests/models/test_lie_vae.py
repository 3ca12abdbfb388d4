"""Commutative Lie Group VAE: the exponential map, the Hessian and commutator penalties against
hand-computed values, the loss terms, config validation, shapes and a short optimisation."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

from latentzoo.models import LieVAE
from latentzoo.models.beta_vae import reconstruction_loss
from latentzoo.models.nets import ConvDecoder, ConvEncoder, LieAlgebra

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 map against float64 references


def make_lie_vae(image_shape=(1, 64, 64), subgroup_sizes=(16,), subspace_sizes=(4,), **kwargs):
    return LieVAE(
        encoder=lambda out_features: ConvEncoder(image_shape, out_features, hidden=64),
        decoder=lambda in_features: ConvDecoder(image_shape, in_features, hidden=64),
        latent_dim=sum(subspace_sizes),
        subgroup_sizes=subgroup_sizes,
        subspace_sizes=subspace_sizes,
        **kwargs,
    )


def set_basis(lie: LieAlgebra, *bases: torch.Tensor) -> None:
    with torch.no_grad():
        for parameter, value in zip(lie.bases, bases, strict=True):
            parameter.copy_(value)


def test_group_map_is_the_matrix_exponential() -> None:
    torch.manual_seed(0)
    lie = LieAlgebra([9, 4], [2, 3], init_scale=0.5)
    z = torch.randn(5, 5)
    g = lie(z)
    assert g.shape == (5, 13)
    for b in range(5):
        a1 = sum(z[b, j] * lie.bases[0][j] for j in range(2)).detach().double().numpy()
        a2 = sum(z[b, 2 + j] * lie.bases[1][j] for j in range(3)).detach().double().numpy()
        expected = [scipy.linalg.expm(a1).ravel(), scipy.linalg.expm(a2).ravel()]
        torch.testing.assert_close(g[b, :9].double(), torch.from_numpy(expected[0]), **TOL)
        torch.testing.assert_close(g[b, 9:].double(), torch.from_numpy(expected[1]), **TOL)
        # the block-diagonal algebra exponentiates to the blocks' exponentials
        block = torch.block_diag(torch.from_numpy(a1), torch.from_numpy(a2))
        full = torch.linalg.matrix_exp(block)
        torch.testing.assert_close(full[:3, :3].flatten(), g[b, :9].double(), **TOL)
        torch.testing.assert_close(full[3:, 3:].flatten(), g[b, 9:].double(), **TOL)
        assert full[:3, 3:].abs().max() < 1e-12


def test_zero_basis_gives_identity_and_commuting_basis_is_a_homomorphism() -> None:
    lie = LieAlgebra([9], [2], init_scale=0.0)
    torch.testing.assert_close(lie(torch.randn(4, 2)), torch.eye(3).flatten().expand(4, 9))
    # commuting generators (a rotation and a scaling): g(z1 + z2) = g(z1) g(z2)
    rotation = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 0]])
    set_basis(lie, torch.stack([rotation, torch.eye(3)]))
    z1, z2 = torch.randn(6, 2), torch.randn(6, 2)
    product = lie(z1).view(6, 3, 3) @ lie(z2).view(6, 3, 3)
    torch.testing.assert_close(lie(z1 + z2).view(6, 3, 3), product, rtol=1e-4, atol=1e-5)


def test_hessian_penalty() -> None:
    lie = LieAlgebra([16], [4])
    set_basis(lie, torch.stack([torch.diag(torch.eye(4)[j]) for j in range(4)]))  # e_j e_jᵀ
    assert lie.hessian_penalty().item() == 0.0
    torch.manual_seed(0)
    basis = torch.randn(4, 4, 4)
    set_basis(lie, basis)
    expected = (
        sum((basis[i] @ basis[j]).pow(2).sum() for i in range(4) for j in range(4) if i != j) / 4**2
    )
    torch.testing.assert_close(lie.hessian_penalty(), expected)
    assert expected > 0
    # a subgroup with a single latent has no pairs
    single = LieAlgebra([16], [1], init_scale=1.0)
    assert single.hessian_penalty().item() == 0.0


def test_commutator_penalty() -> None:
    lie = LieAlgebra([9], [3])
    set_basis(lie, torch.randn(3, 3).diag_embed())  # diagonal: commute
    assert lie.commutator_penalty().item() == pytest.approx(0.0, abs=1e-12)
    # commuting but with non-symmetric products: the original's A_jA_i − (A_jA_i)ᵀ is non-zero
    rotation = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 0]])
    set_basis(lie, torch.stack([rotation, torch.eye(3), 2 * torch.eye(3)]))
    assert (rotation - rotation.T).abs().sum() > 0
    assert lie.commutator_penalty().item() == pytest.approx(0.0, abs=1e-12)
    torch.manual_seed(1)
    basis = torch.randn(3, 3, 3)
    set_basis(lie, basis)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum((basis[i] @ basis[j] - basis[j] @ basis[i]).pow(2).sum() for i, j in pairs)
    torch.testing.assert_close(lie.commutator_penalty(), expected * 2 / (3 * 2))
    assert expected > 0


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_capabilities(channels: int) -> None:
    torch.manual_seed(0)
    vae = make_lie_vae((channels, 64, 64), subgroup_sizes=(100,), subspace_sizes=(10,))
    x = torch.rand(3, channels, 64, 64)
    mean, logvar, g_enc = vae.encoder(x)
    assert mean.shape == logvar.shape == (3, 10) and g_enc.shape == (3, 100)
    assert vae.decoder(vae.group(mean)).shape == (3, channels, 64, 64)
    torch.testing.assert_close(vae.encode(x), mean)
    images = vae.sample(2)
    assert images.shape == (2, channels, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert vae.reconstruct(x).shape == x.shape
    # the Lie basis: 10 matrices of 10 x 10, initialised at scale 0.001
    assert vae.lie.bases[0].shape == (10, 10, 10)
    assert vae.lie.bases[0].std().item() == pytest.approx(0.001, rel=0.2)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        make_lie_vae(subgroup_sizes=(15,), subspace_sizes=(4,))
    with pytest.raises(ValueError, match="latent_dim"):
        LieVAE(
            encoder=lambda out_features: ConvEncoder((1, 64, 64), out_features),
            decoder=lambda in_features: ConvDecoder((1, 64, 64), in_features),
            latent_dim=5,
            subgroup_sizes=[16],
            subspace_sizes=[4],
        )
    with pytest.raises(ValueError, match="same length"):
        make_lie_vae(subgroup_sizes=(16, 9), subspace_sizes=(4,))
    with pytest.raises(ValueError, match="eg_flip"):
        make_lie_vae(eg_flip="sometimes")


def test_loss_terms() -> None:
    torch.manual_seed(0)
    vae = make_lie_vae(hy_rec=0.1, hy_hes=40.0, hy_commute=3.0, forward_eg_prob=0.0)
    with torch.no_grad():
        vae.lie.bases[0].normal_()
    x = (torch.rand(4, 1, 64, 64) > 0.5).float()
    terms = vae.step((x, None), "train")
    expected = (
        terms["recon"] + terms["kl"] + 0.1 * terms["grp"] + 40 * terms["hes"] + 3 * terms["com"]
    )
    torch.testing.assert_close(terms["loss"], expected)
    assert terms["hes"] > 0 and terms["com"] > 0 and terms["grp"] > 0
    # capacity: β·|KL − C| with C rising linearly over the lead-in
    capped = make_lie_vae(capacity=10.0, capacity_leadin=100)
    assert capped.capacity_at(50) == pytest.approx(5.0) and capped.capacity_at(500) == 10.0


def test_forward_eg_reconstructs_from_encoder_features() -> None:
    torch.manual_seed(0)
    vae = make_lie_vae(forward_eg_prob=1.0)
    x = (torch.rand(4, 1, 64, 64) > 0.5).float()
    g_enc = vae.encoder(x)[2]
    from_encoder = reconstruction_loss(vae.decoder(g_enc), x, "bernoulli").mean()
    torch.testing.assert_close(vae.step((x, None), "train")["recon"], from_encoder)
    per_sample = make_lie_vae(forward_eg_prob=1.0, eg_flip="per_sample")
    per_sample.load_state_dict(vae.state_dict())
    torch.testing.assert_close(per_sample.step((x, None), "train")["recon"], from_encoder)
    # never in validation: the recon there decodes g(z), which differs from the g_E decode
    assert not torch.allclose(vae.step((x, None), "val")["recon"], from_encoder)


def test_no_exp_ablation() -> None:
    vae = make_lie_vae(no_exp=True)
    assert vae.lie is None
    terms = vae.step((torch.rand(2, 1, 64, 64), None), "train")
    assert terms["hes"] == 0 and terms["com"] == 0 and torch.isfinite(terms["loss"])


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    vae = make_lie_vae((1, 32, 32))
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = vae.step((x, None), "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
