"""DLP against the released code's gradient paths and object-model details (issue 17): the
detached heatmap paths, glimpses at the posterior mean, the union foreground mask, exclusive
patches, the obj_on head, the noisy-mask phase, the warm-up loss, the box masks and the prior's
image."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentzoo.models.dlp import DeepLatentParticles
from latentzoo.models.nets.particles import (
    GlimpseEncoder,
    ParticleDecoder,
    box_masks,
    crop_glimpses,
    exclusive_masks,
    gaussian_maps,
)

TINY = dict(
    image_shape=[3, 32, 32],
    n_kp=3,
    n_kp_prior=4,
    patch_size=8,
    learned_feature_dim=4,
    enc_channels=[4, 8, 8],  # 8x8 heatmaps
    prior_channels=[4, 4],
    dec_channels=[8, 8],
    knn_k=3,
)
OBJECT = {**TINY, "use_object_dec": True, "anchor_s": 0.25}
MASKED = {**TINY, "use_object_dec": False, "use_object_enc": True, "anchor_s": 0.25}
MASKED_NO_GLIMPSE = {**MASKED, "use_object_enc": False}
VARIANTS = {"object": OBJECT, "masked": MASKED, "masked_no_glimpse": MASKED_NO_GLIMPSE}


def model_and_image(cfg: dict, seed: int = 0) -> tuple[DeepLatentParticles, torch.Tensor]:
    torch.manual_seed(seed)
    return DeepLatentParticles(**cfg), torch.rand(2, 3, 32, 32)


def visible_heatmaps(model: DeepLatentParticles) -> None:
    """At DLP's N(0, 0.01²) init the eval-mode heatmaps are ~1e-10, so any mask of them would
    pass a tolerance check: give each heatmap channel a distinct offset (1, 2, ...)."""
    conv = model.kp_encoder.to_heatmaps
    with torch.no_grad():
        conv.bias.copy_(torch.arange(1.0, conv.out_channels + 1))


def heatmap_conv_grad(model: DeepLatentParticles, loss: torch.Tensor) -> torch.Tensor:
    conv = model.kp_encoder.to_heatmaps
    grad = torch.autograd.grad(loss, conv.weight, allow_unused=True)[0]
    return torch.zeros(1) if grad is None else grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_heatmaps_get_gradients_only_through_mu(variant: str) -> None:
    """Reconstruction + feature-KL gradient to the heatmap conv is exactly zero once the path
    through mu (the head MLP) is cut; with that path open it is non-zero."""
    model, x = model_and_image(VARIANTS[variant])

    def rec_and_feat_kl() -> torch.Tensor:
        terms = model.step(x, "train")
        return terms["rec"] + terms["kl_feat"]

    through_mu = heatmap_conv_grad(model, rec_and_feat_kl())
    assert through_mu.abs().sum() > 0
    hook = model.kp_encoder.head.register_forward_pre_hook(lambda m, a: (a[0].detach(),))
    try:
        other_paths = heatmap_conv_grad(model, rec_and_feat_kl())
    finally:
        hook.remove()
    assert other_paths.abs().max() == 0


def test_obj_on_is_an_mlp_on_the_detached_heatmaps() -> None:
    model, x = model_and_image(OBJECT)
    model.eval()
    out = model(x)
    heatmaps = model.kp_encoder(x)[2]
    expected = torch.sigmoid(model.obj_on_head(heatmaps.flatten(1)))
    torch.testing.assert_close(out["obj_on"], expected)
    assert out["obj_on_used"] is out["obj_on"]  # past the noisy-mask phase
    assert heatmap_conv_grad(model, out["obj_on"].sum()).abs().max() == 0  # detached
    glimpse_params = list(model.feat_encoder.parameters())
    grads = torch.autograd.grad(out["obj_on"].sum(), glimpse_params, allow_unused=True)
    assert all(g is None for g in grads)  # not from the glimpse encoder


def test_glimpses_are_cropped_at_the_posterior_mean() -> None:
    model, x = model_and_image(OBJECT)
    with torch.no_grad():
        model.kp_encoder.head[-1].bias[2::4] = 2.0  # log σ² = 2: z far from mu
        model.kp_encoder.head[-1].bias[3::4] = 2.0
    model.train()
    out = model(x)
    assert (out["z"] - out["mu"]).abs().mean() > 0.3
    at_mu = model.feat_encoder.crops(x, out["mu"].detach())
    at_z = model.feat_encoder.crops(x, out["z"].detach())
    torch.testing.assert_close(out["crops"], at_mu)
    assert (out["crops"] - at_z).abs().max() > 1e-2


def test_crop_is_the_original_translate_then_slice() -> None:
    """crop_glimpses = translate the map by the keypoint (scale 1) and slice the centre."""
    torch.manual_seed(0)
    src, pos = torch.rand(1, 2, 16, 16), torch.rand(1, 3, 2) * 1.6 - 0.8
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = pos[0, :, 1], pos[0, :, 0]
    grid = F.affine_grid(theta, [3, 2, 16, 16], align_corners=False)
    moved = F.grid_sample(src.expand(3, -1, -1, -1), grid, align_corners=False)
    torch.testing.assert_close(crop_glimpses(src, pos, 4), moved[:, :, 6:10, 6:10])


def reference_box_masks(centre: torch.Tensor, box: int, size: int) -> torch.Tensor:
    """The original's construction: a padded box moved with nearest grid sampling."""
    n = centre.shape[0] * centre.shape[1]
    pad = (size - box) // 2
    canvas = F.pad(torch.ones(n, 1, box, box), [pad] * 4)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -centre[..., 1].reshape(-1), -centre[..., 0].reshape(-1)
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    out = F.grid_sample(canvas, grid, mode="nearest", align_corners=False)
    return out.view(*centre.shape[:2], 1, *canvas.shape[-2:])


@pytest.mark.parametrize(("box", "size"), [(4, 16), (2, 16), (16, 64)])
def test_box_masks_match_the_original_construction(box: int, size: int) -> None:
    torch.manual_seed(0)
    centre = torch.rand(3, 5, 2) * 2 - 1
    torch.testing.assert_close(box_masks(centre, box, size), reference_box_masks(centre, box, size))


def test_pointnet_maps_use_the_union_foreground_mask() -> None:
    torch.manual_seed(0)
    dec = ParticleDecoder(3, 4, 8, 32, 3, bg_maps=True, channels=(8, 8), k=3).eval()
    pos, feat = torch.rand(1, 4, 2) * 2 - 1, torch.randn(1, 4, 4)
    gmaps = torch.rand(1, 3, 8, 8)
    fg = torch.zeros(1, 3, 8, 8)
    fg[0, 0, :4] = 1  # particle 0 covers the top half, the others nothing
    union = fg.sum(1, keepdim=True).clamp(0, 1)
    seen = []
    hook = dec.cnn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    dec(pos, feat, gmaps, union, torch.zeros(1, 3, 8, 8))
    hook.remove()
    raw = dec.pointnet_maps(pos, feat, 8)
    pn = seen[0][:, 3:6]
    torch.testing.assert_close(pn, raw * union)
    assert pn[0, 1:, :4].abs().sum() > 0  # particles 1, 2 keep their maps inside the union
    assert pn[0, :, 4:].abs().sum() == 0


def test_model_feeds_the_union_mask_and_detached_bg_heatmaps() -> None:
    model, x = model_and_image(MASKED)
    visible_heatmaps(model)
    model.eval()
    seen = []
    hook = model.decoder.cnn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out = model(x)
    hook.remove()
    gm = gaussian_maps(out["mu"], model.sigma, model.map_size)
    union = (gm > model.mask_threshold).float().sum(1, keepdim=True).clamp(0, 1)
    pos = torch.cat([out["mu"], out["mu"].new_zeros(2, 1, 2)], 1)
    raw = model.decoder.pointnet_maps(pos, out["feat_mu"], model.map_size)
    k = model.k
    torch.testing.assert_close(seen[0][:, k : 2 * k], raw * union)
    heatmaps = model.kp_encoder(x)[2]
    torch.testing.assert_close(seen[0][:, 2 * k :], (1 - union) * heatmaps)
    assert 0 < float(union.mean()) < 1


def test_exclusive_patches_give_one_particle_per_region() -> None:
    torch.manual_seed(0)
    enc = GlimpseEncoder(3, 32, 0.25, 4, cnn=True, encode_location=False, exclusive=True)
    x = torch.rand(1, 3, 32, 32) + 0.1
    pos = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.05], [0.6, -0.6]]])
    crops = enc.crops(x, pos)
    assert crops[0, 0].abs().sum() > 0 and crops[0, 3].abs().sum() > 0
    assert crops[0, 1].abs().sum() == 0  # same box as particle 0: nothing left
    assert 0 < crops[0, 2].abs().sum() < 0.2 * crops[0, 0].abs().sum()  # a sliver
    off = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # particle 0 off: particle 1 gets the object
    crops_off = enc.crops(x, pos, off)
    assert crops_off[0, 0].abs().sum() == 0
    torch.testing.assert_close(crops_off[0, 1], crops[0, 0])
    enc.exclusive = False
    shared = enc.crops(x, pos)
    torch.testing.assert_close(shared[0, 1], shared[0, 0])  # overlapping glimpses allowed
    masks = exclusive_masks(box_masks(pos, 8, 32))
    assert masks.sum(1).max() <= 1


def test_shapes_config_turns_exclusive_patches_on() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("configs/experiment/dlp_shapes.yaml")
    assert cfg.model.exclusive_patches is True
    assert OmegaConf.load("configs/model/dlp.yaml").exclusive_patches is False


def test_noisy_mask_phase_uses_uniform_obj_on() -> None:
    model, x = model_and_image({**OBJECT, "warmup_epoch": 1})
    with torch.no_grad():
        model.obj_on_head[-1].bias.fill_(20.0)  # learned obj_on ≈ 1
    model.train()
    model._fixed_epoch = 2  # after the warm-up, inside 5·warmup_epoch
    used = torch.cat([model(x)["obj_on_used"] for _ in range(20)])
    assert used.min() >= 0 and used.max() <= 1
    assert 0.35 < float(used.mean()) < 0.65 and float(used.std()) > 0.2  # ~ U(0, 1)
    loss = model.step(x, "train")["loss"]
    grads = torch.autograd.grad(loss, list(model.obj_on_head.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)  # noise replaces the head
    model._fixed_epoch = 5  # past the noisy phase: the learned obj_on
    out = model(x)
    assert out["obj_on_used"] is out["obj_on"] and float(out["obj_on"].min()) > 0.99


def test_stitching_detaches_the_taken_space() -> None:
    alpha = torch.tensor([0.6, 0.7]).view(1, 2, 1).requires_grad_()
    masks = exclusive_masks(alpha)
    torch.testing.assert_close(masks.detach().view(-1), torch.tensor([0.6, 0.4]))
    (grad,) = torch.autograd.grad(masks[0, 1].sum(), alpha)
    assert grad.view(-1).tolist() == [0.0, 0.0]  # 1 - 0.6 < 0.7: min picks the detached space


def test_warmup_glimpse_loss_is_the_mean_over_glimpses() -> None:
    model, x = model_and_image({**OBJECT, "warmup_epoch": 1})
    model._fixed_epoch = 0
    torch.manual_seed(1)
    model.train()
    terms = model.step(x, "train")
    torch.manual_seed(1)
    out = model(x)
    crops, rgb = out["crops"], out["glimpses"][:, :, 1:]
    expected = (rgb - crops).pow(2).flatten(2).sum(-1).mean()
    torch.testing.assert_close(terms["rec"], expected)


class PriorSpy:
    def __init__(self, model: DeepLatentParticles) -> None:
        self.inputs: list[torch.Tensor] = []
        model.prior.register_forward_pre_hook(lambda m, a: self.inputs.append(a[0]))


def test_prior_reads_prior_image_when_the_batch_has_one() -> None:
    model, x = model_and_image(MASKED)
    spy = PriorSpy(model)
    warped = torch.rand_like(x)
    model.step({"image": x, "prior_image": warped, "landmarks": None}, "train")
    model.step({"image": x}, "train")
    model.step((x, None), "train")
    assert spy.inputs[0] is warped
    assert spy.inputs[1] is x and spy.inputs[2] is x
    with pytest.raises(Exception, match="'image' key"):
        model.step({"images": x}, "train")


def test_conv_init_and_layers_follow_the_original() -> None:
    torch.manual_seed(0)
    cfg = {**OBJECT, "image_shape": [3, 64, 64], "enc_channels": [32, 64, 128]}
    model = DeepLatentParticles(**cfg)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = torch.cat([c.weight.detach().flatten() for c in convs])
    assert float(weights.std()) == pytest.approx(0.01, rel=0.05)
    assert all(c.bias is None or c.bias.abs().max() == 0 for c in convs)
    leaky = [m for m in model.decoder.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert leaky and all(m.negative_slope == 0.01 for m in leaky)
    bns = [m for m in model.decoder.pointnet.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2 * 4  # two per PointNet layer
    # decoder widths follow the encoder's, reversed; conv first, then upsample
    stage = model.decoder.cnn[0]
    assert isinstance(stage[0], torch.nn.Conv2d) and isinstance(stage[-1], torch.nn.Upsample)
    glimpse_convs = [m for m in model.obj_decoder.cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in glimpse_convs] == [64, 32, 4]  # 16-px glimpse: 1 stage
    assert math.isfinite(float(model.step(torch.rand(2, 3, 64, 64), "train")["loss"]))


def test_object_model_background_features_use_the_glimpse_boxes() -> None:
    model, x = model_and_image(OBJECT)
    visible_heatmaps(model)
    model.eval()
    seen = []
    hook = model.masked_feat.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out = model(x)
    hook.remove()
    heatmaps = model.kp_encoder(x)[2]
    boxes = box_masks(out["mu"], 2, model.map_size).squeeze(2)  # round(0.25 · 7) = 2 cells
    expected = (1 - boxes.sum(1, keepdim=True).clamp(0, 1)) * heatmaps
    assert heatmaps.abs().min() > 0.5
    torch.testing.assert_close(seen[0], expected.flatten(1))
    assert 0 < float(boxes.sum(1).clamp(0, 1).mean()) < 1
