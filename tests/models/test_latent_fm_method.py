"""LatentFlowMatching's method, pinned with stub nets and first stages whose outputs are known:
the time the net receives (both conventions), EMA weights in ``sample``, the posterior sample and
scale factor on encode, label dropout in training steps, the CFG combination and the precision
of each part under autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from latentzoo.models import LatentFlowMatching
from latentzoo.models.autoencoders.base import FirstStage
from latentzoo.models.autoencoders.identity import IdentityFirstStage


def exact_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = 2t·x + 2t·e^{t²}: x(1) = e·(x0 + 1), and a reversed time ends elsewhere."""
    tb = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return 2 * tb * x + 2 * tb * torch.exp(tb * tb)


class StubNet(nn.Module):
    """v = w·field(x, t) in latentzoo's convention, or its LFM-convention counterpart
    v_LFM(x, s) = −field(x, 1 − s); records what it receives."""

    def __init__(self, field=exact_field, lfm: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.field, self.lfm = field, lfm
        self.seen: list[dict] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.seen.append(
            {"t": t.detach().clone(), "y": y, "n": x.shape[0], "training": self.training}
        )
        if self.lfm:
            return -self.w * self.field(x, 1 - t)
        return self.w * self.field(x, t)


def model_with(net: nn.Module, stage: FirstStage | None = None, **kwargs) -> LatentFlowMatching:
    kwargs.setdefault("ema_decay", None)
    return LatentFlowMatching(net, stage or IdentityFirstStage(1), [1, 2, 2], **kwargs)


NOISE = torch.tensor([-1.5, 0.0, 2.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
EXACT = math.e * (NOISE + 1)
DOPRI = {"sampler": "dopri5"}


# ------------------------------------------------------------------ time conventions
@pytest.mark.parametrize("convention", ["latentzoo", "lfm"])
def test_sampling_integrates_the_field_at_the_right_times(convention: str) -> None:
    net = StubNet(lfm=convention == "lfm")
    model = model_with(net, time_convention=convention, sampler={"rtol": 1e-7, "atol": 1e-7})
    z = model.sample(3, noise=NOISE, return_latents=True, **DOPRI)
    assert torch.allclose(z, EXACT, rtol=1e-5), (z - EXACT).abs().max()
    z = model.sample(3, noise=NOISE, return_latents=True, sampler="euler", steps=400)
    assert torch.allclose(z, EXACT, rtol=2e-2)
    times = torch.cat([s["t"] for s in net.seen])
    if convention == "latentzoo":  # euler's grid from noise (t = 0) towards data
        assert times[-3:].min() == pytest.approx(1 - 1 / 400) and times.min() == 0
    else:  # the LFM net runs from noise (its t = 1) to data (its t = 0)
        assert times[-3:].max() == pytest.approx(1 / 400) and times.max() == 1


@pytest.mark.parametrize("convention", ["latentzoo", "lfm"])
def test_training_step_feeds_the_net_the_path_time_and_regresses_the_target(
    convention: str,
) -> None:
    net = StubNet(field=lambda x, t: torch.full_like(x, 0.75), lfm=False)
    model = model_with(net, time_convention=convention)
    recorded = {}
    path_sample = model.path.sample

    def recording_path(x1, eps, t):
        recorded.update(x1=x1, t=t)
        recorded["xt"], recorded["ut"] = path_sample(x1, eps, t)
        return recorded["xt"], recorded["ut"]

    model.path.sample = recording_path
    torch.manual_seed(0)
    loss = model.step({"latent": torch.randn(4096, 1, 2, 2), "label": None}, "train")["loss"]
    t_net = net.seen[-1]["t"]
    sign = 1.0
    if convention == "lfm":  # the LFM net sees 1 − t and its output is negated
        assert torch.allclose(t_net, 1 - recorded["t"])
        sign = -1.0
    else:
        assert torch.equal(t_net, recorded["t"])
    expected = (sign * 0.75 - recorded["ut"]).pow(2).mean()
    assert torch.allclose(loss, expected)
    t = recorded["t"]  # t ~ U(0, 1): mean 1/2, std 1/√12 ≈ 0.289 (logit-normal: 0.21)
    assert abs(float(t.mean()) - 0.5) < 0.02 and abs(float(t.std()) - 12**-0.5) < 0.02


# ------------------------------------------------------------------ EMA in sample()
@pytest.mark.parametrize("sampler", ["euler", "dopri5"])
def test_sample_uses_the_ema_weights_and_keeps_the_raw_ones(sampler: str) -> None:
    const = lambda x, t: torch.ones_like(x)  # noqa: E731  x(1) = x0 + w
    model = model_with(StubNet(field=const), ema_decay=0.9)
    with torch.no_grad():
        model.ema.module.w.fill_(3.0)
    model.net.train()
    z = model.sample(3, noise=NOISE, return_latents=True, sampler=sampler, steps=2)
    assert torch.allclose(z, NOISE + 3.0, atol=1e-5)  # the EMA (w = 3), not the raw w = 1
    assert model.net.seen == [] and model.net.w.item() == 1.0 and model.net.training
    assert not model.ema.module.seen[-1]["training"]

    raw = model_with(StubNet(field=const), ema_decay=None)  # no EMA: the raw net, in eval mode
    raw.net.train()
    assert torch.allclose(
        raw.sample(3, noise=NOISE, return_latents=True, sampler=sampler, steps=2), NOISE + 1
    )
    assert not raw.net.seen[-1]["training"] and raw.net.training


# ------------------------------------------------------------------ first stage
class GaussianStage(FirstStage):
    """Posterior N(mean, std²) everywhere; decode records its input."""

    name = "gaussian"
    rebuilt_from_config = True

    def __init__(self, mean: float, std: float, scale_factor: float) -> None:
        super().__init__()
        self.mean, self.std, self.scale_factor = mean, std, scale_factor
        self.latent_channels, self.downsample = 1, 1
        self.autocast_seen: list[bool] = []
        self.decoded: torch.Tensor | None = None

    def encode(self, x):
        self.autocast_seen.append(torch.is_autocast_enabled(x.device.type))
        return torch.full_like(x[:, :1], self.mean), torch.full_like(x[:, :1], self.std)

    def decode(self, z):
        self.autocast_seen.append(torch.is_autocast_enabled(z.device.type))
        self.decoded = z
        return torch.tanh(z)


def test_encode_draws_a_scaled_posterior_sample_and_decode_unscales() -> None:
    torch.manual_seed(0)
    stage = GaussianStage(mean=1.0, std=2.0, scale_factor=0.25)
    model = model_with(StubNet(), stage)
    z = model.encode_images(torch.rand(4096, 1, 2, 2))
    assert float(z.mean()) == pytest.approx(0.25, abs=0.02)  # scale · mean
    assert float(z.std()) == pytest.approx(0.5, abs=0.02)  # scale · std: a sample, not the mean
    assert torch.equal(
        model_with(StubNet(), stage, posterior="mean").encode_images(torch.rand(3, 1, 2, 2)),
        torch.full((3, 1, 2, 2), 0.25),
    )

    # the training step regresses on that sample
    seen = {}
    path_sample = model.path.sample
    model.path.sample = lambda x1, eps, t: (
        seen.setdefault("x1", x1) is not None and path_sample(x1, eps, t)
    )
    model.step((torch.rand(4096, 1, 2, 2), None), "train")
    assert float(seen["x1"].std()) == pytest.approx(0.5, abs=0.02)

    latents = torch.full((2, 1, 2, 2), 0.5)
    images = model.decode_latents(latents)
    assert torch.equal(stage.decoded, latents / 0.25)  # decode sees unscaled latents
    assert torch.allclose(images, (torch.tanh(torch.tensor(2.0)) + 1) / 2 * torch.ones(2, 1, 2, 2))


# ------------------------------------------------------------------ labels and CFG
def test_label_dropout_is_applied_in_training_steps_only() -> None:
    torch.manual_seed(0)
    net = StubNet(field=lambda x, t: torch.zeros_like(x))
    model = model_with(net, num_classes=7, label_dropout=0.25)
    labels = torch.arange(20_000) % 7
    batch = {"latent": torch.zeros(20_000, 1, 2, 2), "label": labels}
    model.step(batch, "train")
    y = net.seen[-1]["y"]
    dropped = y == 7  # the null label is index num_classes
    assert abs(float(dropped.float().mean()) - 0.25) < 0.02
    assert torch.equal(y[~dropped], labels[~dropped])
    model.step(batch, "val")
    assert torch.equal(net.seen[-1]["y"], labels)


def test_cfg_combines_conditional_and_unconditional_velocities() -> None:
    null = 5

    def by_label(x, t, y):
        v = torch.where(y == null, -0.5, 1.0).to(x.dtype)
        return v.view(-1, 1, 1, 1).expand_as(x)

    net = StubNet()
    net.forward = lambda x, t, y: (net.seen.append({"n": x.shape[0], "y": y}), by_label(x, t, y))[1]
    model = model_with(net, num_classes=5, label_dropout=0.1)
    x0 = torch.zeros(3, 1, 2, 2)
    z = model.sample(3, noise=x0, return_latents=True, sampler="euler", steps=1, cfg_scale=2.5)
    assert torch.allclose(z, torch.full_like(z, -0.5 + 2.5 * (1.0 + 0.5)))  # v_u + s(v_c − v_u)
    assert net.seen[-1]["n"] == 6 and (net.seen[-1]["y"][3:] == null).all()  # one doubled batch
    assert (model.last_nfe, model.last_net_forwards) == (1, 2)
    z = model.sample(3, noise=x0, return_latents=True, sampler="euler", steps=1, cfg_scale=1.0)
    assert torch.allclose(z, torch.ones_like(z)) and net.seen[-1]["n"] == 3
    assert (model.last_nfe, model.last_net_forwards) == (1, 1)


# ------------------------------------------------------------------ precision
class AutocastProbeNet(nn.Module):
    """A 1x1 conv (bf16 under autocast) plus the time; records the autocast state."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x, t, y):
        out = self.conv(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out + t.view(-1, 1, 1, 1).to(out.dtype)


def test_net_runs_under_the_callers_autocast_while_state_and_decode_stay_fp32() -> None:
    stage = GaussianStage(mean=0.0, std=1.0, scale_factor=1.0)
    model = model_with(AutocastProbeNet(), stage)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = model.sample(2, sampler="heun", steps=3)
        model.encode_images(torch.rand(2, 1, 2, 2))
    assert model.net.seen and all(on and dtype == torch.bfloat16 for on, dtype in model.net.seen)
    assert stage.autocast_seen == [False, False]  # decode, then encode: fp32
    assert images.dtype == torch.float32 and stage.decoded.dtype == torch.float32
    model.net.seen.clear()
    model.sample(2, sampler="euler", steps=1)  # no autocast around: plain fp32
    assert model.net.seen == [(False, torch.float32)]
