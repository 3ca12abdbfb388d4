"""LFM's `adm` backbone (EDM's DhariwalUNet): equal to LFM's/EDM's network on the same weights,
EDM's init, the null label, the published layout's parameter count."""

from __future__ import annotations

import logging

import pytest
import torch

from latentzoo.import_lfm import convert_lfm_state_dict
from latentzoo.models.nets.unet_edm import DhariwalUNet, UNetBlock
from latentzoo.utils.errors import LatentzooError
from tests.lfm_fixtures import load_fixture, reference_state_dict


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_edm(config: dict, **overrides) -> DhariwalUNet:
    """Our net with the settings of an LFM/EDM DhariwalUNet config (its argument names)."""
    kwargs = dict(
        model_channels=config["model_channels"],
        channel_mult=config["channel_mult"],
        channel_mult_emb=config["channel_mult_emb"],
        num_res_blocks=config["num_blocks"],
        attention_resolutions=config["attn_resolutions"],
        dropout=config["dropout"],
    )
    kwargs.update(overrides)
    return DhariwalUNet(
        config["in_channels"], config["img_resolution"], config["label_dim"], 0.0, **kwargs
    )


def test_forward_equals_lfm_edm_dhariwal_unet_on_the_same_weights() -> None:
    """LFM's models/EDM.py DhariwalUNet (= NVlabs/edm's, max diff 0 on these weights) with
    label_dim 5 at 16x16: labels, the null label (zero one-hot) and no labels."""
    fx = load_fixture("edm_adm_cond")
    net = tiny_edm(fx["config"]).eval()
    assert sum(p.numel() for p in net.parameters()) == fx["num_params"]
    net.load_state_dict(convert_lfm_state_dict(reference_state_dict(fx, "module."), net))
    x, t = fx["x"], fx["t"]
    with torch.no_grad():
        assert torch.allclose(net(x, t, fx["y"]), fx["out"], atol=1e-5, rtol=0)
        null = torch.full((3,), net.num_classes)
        assert torch.allclose(net(x, t, null), fx["out_null"], atol=1e-5, rtol=0)
        assert torch.allclose(net(x, t, None), fx["out_null"], atol=1e-5, rtol=0)
        # a scalar t (torchdiffeq) is broadcast over the batch
        assert torch.allclose(net(x, t[1], fx["y"])[1], fx["out"][1], atol=1e-5, rtol=0)


def test_edm_init_zero_output_and_zero_last_layers() -> None:
    torch.manual_seed(0)
    net = tiny_edm(load_fixture("edm_adm_cond")["config"])
    out = net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 5]))
    assert torch.count_nonzero(out) == 0  # EDM's zero-initialised output conv
    blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
    for block in blocks:
        assert (
            torch.count_nonzero(block.conv1.weight) == 0
            and torch.count_nonzero(block.conv1.bias) == 0
        )
        if block.num_heads:
            assert torch.count_nonzero(block.proj.weight) == 0
        # EDM's kaiming-uniform × √(1/3): uniform with bound 1/√fan_in (weights and biases)
        fan_in = block.conv0.weight[0].numel()
        assert block.conv0.weight.abs().max() <= fan_in**-0.5
        assert block.conv0.weight.abs().max() > 0.9 * fan_in**-0.5
    assert abs(float(net.map_label.weight.detach().std()) - 1.0) < 0.05  # N(0, 1)
    # once the output conv is non-zero the output depends on x, t and y
    torch.nn.init.normal_(net.out_conv.weight)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert net(x, t, torch.tensor([1, 5])).abs().sum() > 0


def test_layout_resampling_inside_blocks_and_attention_where_configured() -> None:
    net = tiny_edm(load_fixture("edm_adm_cond")["config"])
    names = list(net.enc) + [f"dec.{n}" for n in net.dec]
    assert names == [
        "16x16_conv", "16x16_block0", "8x8_down", "8x8_block0", "4x4_down", "4x4_block0",
        "dec.4x4_in0", "dec.4x4_in1", "dec.4x4_block0", "dec.4x4_block1", "dec.8x8_up",
        "dec.8x8_block0", "dec.8x8_block1", "dec.16x16_up", "dec.16x16_block0",
        "dec.16x16_block1",
    ]  # fmt: skip
    with_attention = {n for n, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads}
    # attention_resolutions [8] plus the bottleneck's first block
    assert with_attention == {"enc.8x8_block0", "dec.4x4_in0", "dec.8x8_block0", "dec.8x8_block1"}
    assert net.enc["8x8_down"].resample == "down" and net.dec["16x16_up"].resample == "up"
    assert net.dec["4x4_in0"].num_heads == 128 // 64


def test_lfm_256px_parameter_counts_match_lfm_code() -> None:
    """LFM's FFHQ/bedroom `adm` (and ImageNet with label_dim 1000), counted from LFM's code."""
    import hydra
    from omegaconf import OmegaConf

    from latentzoo.paths import config_dir

    backbone = OmegaConf.load(f"{config_dir()}/model/backbone/adm.yaml")
    with torch.device("meta"):
        for classes, expected in [(0, 406_396_420), (1000, 407_420_420)]:
            net = hydra.utils.instantiate(backbone)(
                in_channels=4, input_size=32, num_classes=classes
            )
            assert sum(p.numel() for p in net.parameters()) == expected


def test_null_label_is_the_zero_one_hot() -> None:
    torch.manual_seed(0)
    net = DhariwalUNet(3, 8, 4, 0.1, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                       attention_resolutions=[4], num_head_channels=32)  # fmt: skip
    for param in net.parameters():  # make the zero-initialised layers live
        if not param.any():
            torch.nn.init.normal_(param, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    null = net(x, t, torch.tensor([4, 4]))
    assert torch.allclose(null, net(x, t, None))
    assert not torch.allclose(null, net(x, t, torch.tensor([0, 3])))


def test_bad_settings_are_refused_and_the_build_is_logged(caplog) -> None:
    with pytest.raises(LatentzooError, match="attention_resolutions"):
        DhariwalUNet(4, 32, model_channels=32, channel_mult=[1, 2], attention_resolutions=[8])
    with pytest.raises(LatentzooError, match="num_head_channels"):
        DhariwalUNet(4, 8, model_channels=48, channel_mult=[1], attention_resolutions=[8])
    with caplog.at_level(logging.INFO, logger="latentzoo.models.nets.unet_edm"):
        DhariwalUNet(4, 8, model_channels=32, channel_mult=[1, 2], num_head_channels=32,
                     attention_resolutions=[4])  # fmt: skip
    assert "M parameters" in caplog.text and "attention at [4]" in caplog.text


@pytest.mark.parametrize("backbone", ["adm_tiny", "adm_guided"])
def test_backbone_configs_build_in_latent_fm_and_train_a_step(tmp_path, backbone: str) -> None:
    import hydra

    from tests.conftest import compose_config

    overrides = ["model=latent_fm", f"model/backbone={backbone}", "model/autoencoder=identity",
                 "data=proc_blobs", "data.image_size=16", "model.num_classes=3",
                 "model.label_dropout=0.5"]  # fmt: skip
    if backbone == "adm_guided":  # the CelebA-256 layout, narrowed for a 16x16 latent
        overrides += ["model.backbone.model_channels=32", "model.backbone.channel_mult=[1,2,2]"]
    model = hydra.utils.instantiate(compose_config("train", overrides, tmp_path).model)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = model.step((images, labels), "train")["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.null_label == 3
    # EDM/ADM zero-init: the first gradient reaches the zero-initialised output conv
    out_conv = model.net.out_conv if backbone == "adm_tiny" else model.net.out[-1]
    assert out_conv.weight.grad.abs().sum() > 0
