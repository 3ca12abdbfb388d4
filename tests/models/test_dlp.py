"""Deep Latent Particles (dlp.md §9): dense kNN / PointNet++ vs loops, Chamfer-KL, spatial
softmax, shapes of both model variants, a training step, the regression helper, the renderer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from latentzoo.data.datasets.proc_multishapes import ProcMultiShapes
from latentzoo.metrics.keypoint_regression import confident_keypoints, landmark_regression_error
from latentzoo.models.dlp import DeepLatentParticles, chamfer_kl
from latentzoo.models.nets.particles import (
    PointNetLayer,
    PointNetPP,
    crop_glimpses,
    knn,
    place_glimpses,
    spatial_softmax,
)
from latentzoo.utils.errors import LatentzooError

SHAPES64 = dict(
    image_shape=[3, 64, 64],
    n_kp=4,
    n_kp_prior=6,
    patch_size=8,
    learned_feature_dim=6,
    anchor_s=0.25,
    enc_channels=[8, 16, 16],
    prior_channels=[8, 8, 8],
    dec_channels=[16, 16],
    use_object_dec=True,
    beta_kl=0.05,
)


def brute_knn(pos: torch.Tensor, k: int) -> list[list[set[int]]]:
    out = []
    for b in range(pos.shape[0]):
        rows = []
        for i in range(pos.shape[1]):
            d = [(float((pos[b, j] - pos[b, i]).norm()), j) for j in range(pos.shape[1])]
            rows.append({j for _, j in sorted(d)[:k]})
        out.append(rows)
    return out


@pytest.mark.parametrize("k", [1, 4, 6])  # 6 = N - 1 with N = 7
def test_dense_knn_matches_loops_with_self_loops(k: int) -> None:
    torch.manual_seed(0)
    pos = torch.rand(2, 7, 2) * 2 - 1
    idx = knn(pos, k)
    expected = brute_knn(pos, k)
    for b, i in itertools.product(range(2), range(7)):
        assert set(idx[b, i].tolist()) == expected[b][i]
        assert i in idx[b, i].tolist()  # self-loop


@pytest.mark.parametrize("k", [3, 6])
def test_pointnet_layer_matches_per_node_loop(k: int) -> None:
    torch.manual_seed(0)
    pos, h = torch.rand(2, 7, 2), torch.randn(2, 7, 5)
    layer = PointNetLayer(5, 8)
    idx = knn(pos, k)
    dense = layer(h, pos, idx)  # train mode: BatchNorm over all B·N·k edges
    edges = [
        torch.cat([h[b, j], pos[b, j] - pos[b, i]])
        for b, i in itertools.product(range(2), range(7))
        for j in idx[b, i]
    ]
    msgs = layer.net(torch.stack(edges)).view(2, 7, k, -1)  # the edge list, as torch_geometric
    for b, i in itertools.product(range(2), range(7)):
        loop = torch.relu(msgs[b, i].max(0).values)
        torch.testing.assert_close(dense[b, i], loop, atol=1e-6, rtol=0)
    layer.eval()  # running statistics: each edge is independent
    dense = layer(h, pos, idx)
    for b, i in itertools.product(range(2), range(7)):
        msgs_i = [layer.net(torch.cat([h[b, j], pos[b, j] - pos[b, i]])[None]) for j in idx[b, i]]
        loop = torch.relu(torch.cat(msgs_i).max(0).values)
        torch.testing.assert_close(dense[b, i], loop, atol=1e-6, rtol=0)


def test_pointnetpp_is_permutation_invariant() -> None:
    torch.manual_seed(0)
    net = PointNetPP(2 + 3, (8, 16), k=4).eval()
    pos, feat = torch.rand(1, 9, 2), torch.randn(1, 9, 3)
    perm = torch.randperm(9)
    torch.testing.assert_close(net(pos, feat), net(pos[:, perm], feat[:, perm]), atol=1e-6, rtol=0)


def test_chamfer_kl_zero_symmetric_and_grows() -> None:
    torch.manual_seed(0)
    lv = math.log(0.01)
    pts = torch.rand(2, 6, 2) * 2 - 1
    logvar = torch.full_like(pts, lv)
    perm_a, perm_b = torch.randperm(6), torch.randperm(6)
    assert chamfer_kl(pts[:, perm_a], logvar, pts[:, perm_b], lv).abs() < 1e-5
    post, plv = torch.rand(2, 4, 2), torch.randn(2, 4, 2) * 0.3 + lv
    prior = torch.rand(2, 6, 2)
    base = chamfer_kl(post, plv, prior, lv)
    torch.testing.assert_close(
        chamfer_kl(post[:, [2, 0, 3, 1]], plv[:, [2, 0, 3, 1]], prior[:, perm_b], lv), base
    )
    shifted = [float(chamfer_kl(pts + t, logvar, pts, lv)) for t in (0.05, 0.1, 0.2)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    # closed form for one pair: ½ Σ (d²/σ_p²) per set direction, both directions
    one = chamfer_kl(
        torch.zeros(1, 1, 2), torch.full((1, 1, 2), lv), torch.full((1, 1, 2), 0.1), lv
    )
    assert float(one) == pytest.approx(2 * 0.5 * 2 * 0.01 / 0.01, rel=1e-5)


def test_spatial_softmax_one_hot_and_rank_one() -> None:
    grid = torch.linspace(-1, 1, 16)
    heat = torch.zeros(1, 1, 16, 16)
    heat[0, 0, 3, 11] = 1e4  # one-hot (scaled so the softmax is sharp)
    rc = spatial_softmax(heat)[0, 0]
    assert rc[0] == pytest.approx(float(grid[3]), abs=1e-3)
    assert rc[1] == pytest.approx(float(grid[11]), abs=1e-3)
    rows = -((grid - 0.25) ** 2) * 200
    cols = -((grid + 0.5) ** 2) * 200
    rank1 = (rows[:, None] + cols[None, :]).view(1, 1, 16, 16) * 16  # outer sum, sharp peak
    rc = spatial_softmax(rank1)[0, 0]
    assert rc[0] == pytest.approx(0.25, abs=0.05) and rc[1] == pytest.approx(-0.5, abs=0.05)


def test_glimpse_crop_and_place_are_inverse() -> None:
    img = torch.zeros(1, 1, 32, 32)
    img[0, 0, 4:12, 20:28] = 1.0  # an 8x8 block centred at pixel (8, 24)
    pos = torch.tensor([[[8 / 16 - 1, 24 / 16 - 1]]])  # (row, col) in [-1, 1]
    crop = crop_glimpses(img, pos, 8)
    assert crop.mean() > 0.95  # the glimpse covers the block
    back = place_glimpses(crop, pos, 32)[0, 0]
    assert (back - img[0]).abs().mean() < 0.02


def test_masked_model_shapes_128() -> None:
    torch.manual_seed(0)
    model = DeepLatentParticles(
        [3, 128, 128],
        n_kp=30,
        enc_channels=[8, 8, 16, 16],
        prior_channels=[8, 8, 8],
        dec_channels=[16, 8, 8],
    ).eval()
    x = torch.rand(1, 3, 128, 128)
    out = model(x)
    assert out["mu_all"].shape == (1, 31, 2) and out["rec"].shape == (1, 3, 128, 128)
    mu, conf = model.keypoints(x)
    assert mu.shape == (1, 30, 2) and conf.shape == (1, 30) and mu.abs().max() <= 1
    assert model.encode(x).shape == (1, 60)
    assert model.encode(x, features=True).shape == (1, 60 + 31 * 10)
    assert model.prior(x).shape == (1, 50, 2)


def test_object_model_stitching_in_unit_range() -> None:
    torch.manual_seed(0)
    model = DeepLatentParticles(**SHAPES64).eval()
    out = model(torch.rand(2, 3, 64, 64))
    masks, objects = out["masks"], out["objects"]
    assert objects.shape == (2, 3, 64, 64)
    assert masks.min() >= 0 and masks.sum(1).max() <= 1 + 1e-6  # effective masks partition
    assert objects.min() >= 0 and objects.max() <= 1
    rec = model.reconstruct(torch.rand(2, 3, 64, 64))
    assert rec.min() >= 0 and rec.max() <= 1


def test_feature_dim_zero_is_rejected() -> None:
    with pytest.raises(LatentzooError, match="learned_feature_dim"):
        DeepLatentParticles(**{**SHAPES64, "learned_feature_dim": 0})


@pytest.mark.slow  # 8 steps of the 64-px object model: tens of seconds on a shared CPU
@pytest.mark.parametrize("warmup", [False, True])
def test_training_steps_lower_the_loss(warmup: bool) -> None:
    torch.manual_seed(0)
    model = DeepLatentParticles(**SHAPES64, warmup_epoch=1)
    model._fixed_epoch = 0 if warmup else 10
    x = ProcMultiShapes(8, 64).get_batch(range(8))[0]
    opt = torch.optim.Adam(model.optimizer_params(), lr=1e-3)
    assert [g["name"] for g in model.optimizer_params()] == ["encoder", "decoder"]
    losses = []
    for _ in range(8):
        terms = model.step((x, None), "train")
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert all(math.isfinite(v) for v in losses)
    # DLP's N(0, 0.01²) conv init starts slowly: ~10 % down in 8 steps (a stalled model: ~0 %)
    assert min(losses[-3:]) < 0.93 * losses[0]
    assert {"rec", "kl_kp", "kl_feat", "psnr", "logvar_kp"} <= set(terms)


def test_regression_helper_exact_linear_map() -> None:
    rng = np.random.default_rng(0)
    lm = rng.uniform(20, 100, size=(60, 5, 2))
    w = rng.normal(size=(10, 12))
    feats = lm.reshape(60, 10) @ w  # keypoints = an exact linear map of the landmarks
    assert landmark_regression_error(feats[:40], lm[:40], feats[40:], lm[40:]) < 1e-6
    noisy = landmark_regression_error(
        rng.normal(size=(40, 12)), lm[:40], rng.normal(size=(20, 12)), lm[40:]
    )
    assert noisy > 5.0
    conf = np.array([[0.0, 3.0, 1.0, 2.0]])
    assert confident_keypoints(conf, 2, most=True).tolist() == [1, 3]
    assert confident_keypoints(conf, 2, most=False).tolist() == [0, 2]


def test_fid_is_refused_with_a_reason() -> None:
    from latentzoo.metrics.capabilities import require_capabilities
    from latentzoo.utils.errors import MissingCapabilityError

    model = DeepLatentParticles(**SHAPES64)
    with pytest.raises(MissingCapabilityError, match="sample.*conditioned on an image"):
        require_capabilities(model, ("sample",), "fid")


def test_masked_model_without_object_encoder() -> None:
    torch.manual_seed(0)
    cfg = {**SHAPES64, "use_object_dec": False, "use_object_enc": False}
    model = DeepLatentParticles(**cfg).eval()
    out = model(torch.rand(2, 3, 64, 64))
    assert out["rec"].shape == (2, 3, 64, 64) and out["feat_mu"].shape == (2, 5, 6)
    assert model.decoder.cnn[0][0].in_channels == 3 * 4  # g_fg, PointNet maps, bg maps


def test_draw_keypoints_colours_by_confidence() -> None:
    from latentzoo.callbacks.keypoints import draw_keypoints

    images = torch.zeros(1, 3, 9, 9)
    mu = torch.tensor([[[-1.0, -1.0], [1.0, 1.0]]])  # top-left, bottom-right corners
    out = draw_keypoints(images, mu, torch.tensor([[0.0, 5.0]]), radius=0)
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])  # least confident: blue
    assert out[0, :, 8, 8].tolist() == pytest.approx([1.0, 0.2, 0.0])  # most confident: red
    assert out[0, :, 4, 4].abs().sum() == 0 and images.abs().sum() == 0  # input untouched
