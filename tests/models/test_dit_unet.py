"""DiT and ADM UNet backbones: shapes, zero output at init, published parameter counts."""

from __future__ import annotations

import pytest
import torch

from latentzoo.models.nets.dit import DiT, timestep_embedding
from latentzoo.models.nets.unet_adm import ADMUNet
from latentzoo.utils.errors import LatentzooError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets run faster on one thread than oversubscribed on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "channels,size,patch,classes", [(4, 32, 2, 0), (4, 16, 4, 10), (3, 32, 8, 5), (1, 8, 2, 0)]
)
def test_dit_shapes(channels: int, size: int, patch: int, classes: int) -> None:
    net = DiT(
        channels,
        size,
        classes,
        0.1,
        size=None,
        depth=2,
        hidden_size=64,
        num_heads=4,
        patch_size=patch,
    )
    y = torch.randint(0, classes, (3,)) if classes else None
    out = net(torch.randn(3, channels, size, size), torch.rand(3), y)
    assert out.shape == (3, channels, size, size)


def test_dit_adaln_zero_output_is_zero_at_init() -> None:
    net = DiT(4, 16, 10, 0.1, size=None, depth=3, hidden_size=64, num_heads=4, patch_size=2)
    out = net(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 10]))
    assert torch.count_nonzero(out) == 0
    # after perturbing the final layer the output is no longer zero
    torch.nn.init.normal_(net.final_layer.linear.weight)
    assert net(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 10])).abs().sum() > 0


def test_dit_parameter_counts_match_the_spec() -> None:
    expected = {"S": 32.9, "B": 130.3, "L": 457.8, "XL": 674.8}  # 1000 classes + null, p = 2
    with torch.device("meta"):
        for size, millions in expected.items():
            net = DiT(4, 32, 1000, 0.1, size=size, patch_size=2)
            assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - millions) < 0.1


def test_dit_label_null_row_and_time_dependence() -> None:
    net = DiT(4, 8, 3, 0.1, size=None, depth=1, hidden_size=32, num_heads=2)
    assert net.y_embedder.num_embeddings == 4
    assert (
        DiT(4, 8, 3, 0.0, size=None, depth=1, hidden_size=32, num_heads=2).y_embedder.num_embeddings
        == 3
    )
    emb = timestep_embedding(torch.tensor([0.0, 0.5]), 256)
    assert emb.shape == (2, 256) and torch.allclose(emb[0, :128], torch.ones(128))


@pytest.mark.parametrize(
    "mult,attn,classes,scale_shift",
    [([1, 2], [], 0, True), ([1, 2, 2], [8, 4], 5, True), ([1, 1, 2, 2], [16], 0, False)],
)
def test_unet_shapes_and_zero_init(mult, attn, classes, scale_shift) -> None:
    net = ADMUNet(
        4,
        16,
        classes,
        0.1,
        model_channels=32,
        channel_mult=mult,
        num_res_blocks=1,
        attention_resolutions=attn,
        num_heads=2,
        use_scale_shift_norm=scale_shift,
    )
    y = torch.randint(0, classes + 1, (2,)) if classes else None
    out = net(torch.randn(2, 4, 16, 16), torch.rand(2), y)
    assert out.shape == (2, 4, 16, 16)
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    n_attn = sum(type(m).__name__ == "AttentionBlock" for m in net.modules())
    # encoder (1 per block at each attention level) + decoder (2 per level) + bottleneck
    assert n_attn == 3 * len(attn) + 1


def test_unet_rejects_attention_at_a_missing_resolution() -> None:
    with pytest.raises(LatentzooError, match="attention_resolutions"):
        ADMUNet(4, 32, model_channels=32, channel_mult=[1, 2], attention_resolutions=[8])


def test_dit_grad_checkpointing_matches_plain_forward_and_grads() -> None:
    torch.manual_seed(0)
    net = DiT(4, 8, 3, 0.1, size=None, depth=2, hidden_size=32, num_heads=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    out = net(x, t, y)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.grad_checkpointing = True
    out_ckpt = net(x, t, y)
    out_ckpt.square().sum().backward()
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    for g, p in zip(grads, net.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_reference_dit_keys_convert_and_load_strictly() -> None:
    from latentzoo.models.nets.dit import convert_reference_dit_state_dict

    net = DiT(4, 8, 3, 0.1, size=None, depth=2, hidden_size=32, num_heads=2)
    ours = net.state_dict()
    reference = {}  # the names facebookresearch/DiT (and LFM, under DDP) would save
    for key, value in ours.items():
        key = key.replace("x_embedder.", "x_embedder.proj.")
        key = key.replace("y_embedder.", "y_embedder.embedding_table.")
        key = key.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.")
        reference[f"module.{key}"] = value + 1
    reference["module.pos_embed"] = torch.zeros(1, 16, 32)
    fresh = DiT(4, 8, 3, 0.1, size=None, depth=2, hidden_size=32, num_heads=2)
    fresh.load_state_dict(convert_reference_dit_state_dict(reference), strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ours[key] + 1), key


def test_guided_unet_equals_lfm_guided_diffusion_unet_on_the_same_weights() -> None:
    """LFM's models/guided_diffusion UNetModel (adm_guided), attention at downsample rate 2 of a
    16x16 input = latent resolution 8 here; its state dict loads under the same names."""
    from latentzoo.import_lfm import convert_lfm_state_dict
    from tests.lfm_fixtures import load_fixture, reference_state_dict

    fx = load_fixture("guided_uncond")
    config = fx["config"]
    assert config["attention_resolutions"] == [2] and config["image_size"] == 16
    net = ADMUNet(
        3,
        16,
        model_channels=config["model_channels"],
        channel_mult=config["channel_mult"],
        num_res_blocks=config["num_res_blocks"],
        attention_resolutions=[8],
        num_heads=config["num_heads"],
    ).eval()
    assert sum(p.numel() for p in net.parameters()) == fx["num_params"]
    net.load_state_dict(convert_lfm_state_dict(reference_state_dict(fx, "module."), net))
    with torch.no_grad():
        assert torch.allclose(net(fx["x"], fx["t"]), fx["out"], atol=1e-5, rtol=0)


def test_guided_unet_lfm_celeba256_parameter_count_and_logged_conversion(caplog) -> None:
    """configs/model/backbone/adm_guided.yaml = LFM's CelebA-HQ 256 adm_guided (mult 1 2 2 2,
    "--attn_resolution 16 8" = latent 4x4): 153,099,524 parameters, counted from LFM's code."""
    import logging

    import hydra
    from omegaconf import OmegaConf

    from latentzoo.paths import config_dir

    backbone = OmegaConf.load(f"{config_dir()}/model/backbone/adm_guided.yaml")
    logger = "latentzoo.models.nets.unet_adm"
    with caplog.at_level(logging.INFO, logger=logger), torch.device("meta"):
        net = hydra.utils.instantiate(backbone)(in_channels=4, input_size=32)
    assert sum(p.numel() for p in net.parameters()) == 153_099_524
    assert "latent resolutions [4] (guided-diffusion downsample rates [8])" in caplog.text


@pytest.mark.parametrize("name,classes", [("dit_uncond", 0), ("dit_cond", 5)])
def test_dit_equals_lfm_dit_on_the_same_weights(name: str, classes: int) -> None:
    """LFM's models/DiT.py: unconditional (num_classes 1, a 1-row table folded into the
    time-MLP bias on import) and class-conditional with a null row (label_dropout 0.1)."""
    from latentzoo.import_lfm import convert_lfm_state_dict
    from tests.lfm_fixtures import load_fixture, reference_state_dict

    fx = load_fixture(name)
    config = fx["config"]
    net = DiT(
        config["in_channels"],
        config["img_resolution"],
        classes,
        config["label_dropout"],
        size=None,
        depth=config["depth"],
        hidden_size=config["hidden_size"],
        num_heads=config["num_heads"],
        patch_size=config["patch_size"],
    ).eval()
    net.load_state_dict(convert_lfm_state_dict(reference_state_dict(fx, "module."), net))
    with torch.no_grad():
        assert torch.allclose(net(fx["x"], fx["t"], fx.get("y")), fx["out"], atol=1e-5, rtol=0)
        if "out_null" in fx:
            null = torch.full((3,), classes)
            assert torch.allclose(net(fx["x"], fx["t"], null), fx["out_null"], atol=1e-5, rtol=0)
