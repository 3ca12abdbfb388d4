"""NFPI (spec nfpi.md §13): flow layers invertible with exact log-dets, the FPI fixed points of
both variants, the NLL/bpd formula, classification, dequantisation, training and EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from latentzoo.metrics.classification import FlowClassification, SampleClassifier
from latentzoo.models.ema import EMA
from latentzoo.models.nets.glow import (
    ActNorm,
    Glow,
    InvConv1x1,
    MatrixExpCoupling,
    squeeze2d,
    unsqueeze2d,
)
from latentzoo.models.nfpi import NFPI, fixed_point_iteration, kl_summary, pairwise_kl


def _perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move the zero-initialised parameters so couplings are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _jacobian_logdet(layer: nn.Module, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(
        lambda a: layer(a.view_as(x))[0].flatten(), x.flatten()
    )
    return float(torch.linalg.slogdet(jac)[1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ActNorm((4, 2, 2)),
        lambda: InvConv1x1(4, "matrixexp"),
        lambda: InvConv1x1(4, "conv"),
        lambda: MatrixExpCoupling(4, hidden=8, blocks=1),
        lambda: MatrixExpCoupling(5, hidden=8, blocks=1, attention=True),
    ],
)
def test_layer_inverse_and_logdet(make) -> None:
    torch.manual_seed(0)
    layer = make().double()
    c = 5 if isinstance(layer, MatrixExpCoupling) and layer.c1 == 3 else 4
    x = torch.randn(6, c, 2, 2, dtype=torch.float64)
    layer(x)  # data init
    _perturb(layer, 0.3)
    y, logdet = layer(x)
    assert torch.allclose(layer.inverse(y), x, atol=1e-5)
    assert logdet.shape == (6,)
    assert abs(float(logdet[0].detach()) - _jacobian_logdet(layer, x[:1])) < 1e-5


def test_conv1x1_logdet_is_trace_times_pixels() -> None:
    torch.manual_seed(0)
    conv = InvConv1x1(6, "matrixexp")
    with torch.no_grad():
        conv.weight.add_(0.2 * torch.randn(6, 6))
        _, logdet = conv(torch.randn(2, 6, 3, 5))
    trace = float(torch.diagonal(conv.weight.detach()).sum())
    assert abs(float(logdet[0]) - trace * 15) < 1e-4
    slog = float(torch.linalg.slogdet(torch.linalg.matrix_exp(conv.weight.detach().double()))[1])
    assert abs(trace - slog) < 1e-5
    # init: logm of a special-orthogonal matrix, so the log-det starts at 0
    assert abs(float(torch.diagonal(InvConv1x1(6).weight.detach()).sum())) < 1e-5


def test_squeeze_roundtrip_and_coupling_size_guard() -> None:
    x = torch.randn(2, 3, 4, 6)
    assert squeeze2d(x).shape == (2, 12, 2, 3)
    assert torch.equal(unsqueeze2d(squeeze2d(x)), x)
    with pytest.raises(NotImplementedError, match="rank-2k"):
        MatrixExpCoupling(50, hidden=4, blocks=0)


def test_toy_flow_logdet_matches_jacobian() -> None:
    torch.manual_seed(0)
    flow = Glow((1, 4, 4), levels=1, steps=2, blocks=1, hidden=8).double()
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    flow.data_init(x)
    _perturb(flow, 0.1)
    _, logdet = flow(x[:1])
    assert abs(float(logdet[0].detach()) - _jacobian_logdet(flow, x[:1])) < 1e-4


def test_flow_roundtrip_after_data_init() -> None:
    torch.manual_seed(0)
    flow = Glow((3, 32, 32), levels=3, steps=1, blocks=1, hidden=8)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    flow.data_init(x)
    _perturb(flow, 0.02)
    z, logdet = flow(x)
    assert z.shape == x.shape and torch.isfinite(logdet).all()
    assert (flow.inverse(z) - x).abs().max() < 1e-4


class IdentityFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + 0 * self.dummy, x.new_zeros(x.shape[0])

    def inverse(self, z):
        return z


def _identity_nfpi(num_classes: int, shape=(1, 2, 2), **kwargs) -> NFPI:
    model = NFPI(IdentityFlow(), shape, num_classes, dequant_eval="midpoint", **kwargs)
    return model.eval()


def test_bpd_matches_closed_form_for_a_standard_gaussian() -> None:
    torch.manual_seed(0)
    model = _identity_nfpi(1, shape=(3, 4, 4), ema_decay=None)
    model.prior_var.fill_(1.0)
    x = torch.randint(0, 256, (5, 3, 4, 4)).float() / 255
    y = 2 * (x * 255 + 0.5) / 256 - 1  # midpoint dequantisation
    d = 48
    log_n = -0.5 * (y**2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)
    expected = -(log_n - d * math.log(128)) / (d * math.log(2))
    assert torch.allclose(model.bpd(x), expected, atol=1e-5)
    assert torch.allclose(model.bpd(x, torch.zeros(5)), expected, atol=1e-5)


def test_classification_and_marginal_bpd_on_separated_classes() -> None:
    torch.manual_seed(0)
    k, n = 3, 600
    centers = torch.tensor([[-0.6, 0.6, 0.0, 0.3], [0.6, -0.6, 0.3, 0.0], [0.0, 0.0, -0.6, 0.6]])
    labels = torch.arange(n) % k
    z = (centers[labels] + 0.08 * torch.randn(n, 4)).clamp(-0.99, 0.99)
    x = torch.floor(256 * (z + 1) / 2).clamp(0, 255).view(n, 1, 2, 2) / 255
    model = _identity_nfpi(k, ema_decay=None)
    model.prior_mu.copy_(centers)
    model.prior_var.fill_(0.08**2)
    assert (model.classify(x) == labels).float().mean() > 0.99
    standard = _identity_nfpi(k, ema_decay=None)
    standard.prior_var.fill_(1.0)
    assert model.bpd(x).mean() < standard.bpd(x).mean() - 1.0
    # the evaluator agrees
    loader = [(x[i : i + 100], labels[i : i + 100]) for i in range(0, n, 100)]
    datamodule = type("DM", (), {"test_dataloader": lambda self: loader})()
    out = FlowClassification(num_test_repeats=2, top_k=2)(model=model, datamodule=datamodule)
    assert out["top1"] > 0.99 and out["top2"] == 1.0 and out["top1_std"] < 0.01


def _moments(k: int = 3, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(k, d, generator=g, dtype=torch.float64)
    s = torch.rand(k, d, generator=g, dtype=torch.float64) * 2 + 0.2
    return m, s


def test_fpi_lambda_zero_fixed_points() -> None:
    m, s = _moments()
    mu0, v0 = torch.zeros_like(m), torch.full_like(s, 0.75)
    mu, _, info = fixed_point_iteration(m, s, mu0, v0, 0.0, 0.0, True, False, max_iter=1)
    assert torch.allclose(mu, m) and info["iterations"] == 1
    kwargs = {"tol_mu": 0.0, "tol_sigma": 0.0, "max_iter": 200}
    _, v_derived, _ = fixed_point_iteration(m, s, m, v0, 0, 0, True, True, "derived", **kwargs)
    assert torch.allclose(v_derived, s, atol=1e-6)
    _, v_code, _ = fixed_point_iteration(m, s, m, v0, 0, 0, True, True, "code", **kwargs)
    assert torch.allclose(v_code, s ** (1 / 3), atol=1e-6)
    # derived: v ← √(s v), so the log-error halves every iteration
    errors = []
    for it in (1, 2):
        _, v, _ = fixed_point_iteration(
            m, s, m, v0, 0, 0, False, True, "derived", tol_mu=0, tol_sigma=0, max_iter=it
        )
        errors.append((torch.log(v) - torch.log(s)).abs())
    assert torch.allclose(errors[1], errors[0] / 2, atol=1e-12)


@pytest.mark.parametrize("variant", ["code", "derived"])
def test_fpi_repulsion_increases_min_kl(variant: str) -> None:
    m, s = _moments(k=4, d=6)
    before = kl_summary(m, s)["kl_min"]
    mu, v, _ = fixed_point_iteration(m, s, m, s, 50.0, 50.0, True, True, variant)
    assert kl_summary(mu, v)["kl_min"] >= before
    # two overlapping classes are pushed apart
    m2 = torch.tensor([[0.0, 0.0], [0.1, 0.0]], dtype=torch.float64)
    s2 = torch.ones(2, 2, dtype=torch.float64)
    mu2, _, _ = fixed_point_iteration(m2, s2, m2, s2, 1.0, 0.0, True, False, variant, max_iter=50)
    assert (mu2[1] - mu2[0]).norm() > 0.1 + 1e-3
    assert pairwise_kl(mu2, s2)[0, 1] > pairwise_kl(m2, s2)[0, 1]


def test_dequantisation_roundtrip_every_uint8_value() -> None:
    model = _identity_nfpi(1)
    x = torch.arange(256).float().div(255).repeat(50, 1)
    for midpoint in (False, True):
        y = model.preprocess(x, midpoint=midpoint)
        assert y.min() >= -1 and y.max() < 1
        assert torch.equal(model.postprocess(y), x)


def _tiny_nfpi(**kwargs) -> NFPI:
    flow = Glow((3, 8, 8), levels=2, steps=1, blocks=1, hidden=8)
    return NFPI(flow, (3, 8, 8), 2, **kwargs)


def test_training_step_lowers_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = _tiny_nfpi(ema_decay=None)
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % 2
    model.flow.data_init(model.preprocess(x))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    first = model.step((x, y), "train")
    assert set(first) == {"loss", "bpd", "bpd_marginal"}
    for _ in range(15):
        loss = model.step((x, y), "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    assert model.step((x, y), "train")["loss"] < first["loss"] - 0.05
    assert not model.prior_mu.requires_grad and "prior_mu" in model.state_dict()


def test_ema_schedule_checkpoint_and_sampling() -> None:
    ema = EMA(nn.Linear(2, 2), 0.9999, power=0.75)
    assert ema.current_decay() == 0.0  # first update copies the weights
    ema.num_updates = 1
    assert abs(ema.current_decay() - (1 - 2**-0.75)) < 1e-12
    ema.num_updates = 10**9
    assert ema.current_decay() == 0.9999

    torch.manual_seed(0)
    model = _tiny_nfpi()
    model.flow.data_init(torch.rand(8, 3, 8, 8) * 2 - 1)
    for _ in range(3):
        _perturb(model.flow, 0.01)
        model.ema.update(model.flow)
    assert not any("prior" in name for name in model.ema.shadow)  # Gaussians excluded
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    restored = _tiny_nfpi()
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    assert restored.ema.num_updates == 3
    for name, value in model.ema.shadow.items():
        assert torch.equal(restored.ema.shadow[name], value)
    raw = {k: v.clone() for k, v in restored.flow.state_dict().items()}
    torch.manual_seed(2)
    images = restored.sample(4, labels=torch.tensor([0, 1, 0, 1]), temperature=0.5)
    assert images.shape == (4, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images * 255, (images * 255).round())
    for k, v in restored.flow.state_dict().items():  # raw weights back after sampling
        assert torch.equal(v, raw[k])
    # sampling used the EMA weights: with them loaded as the raw flow the draw is the same
    restored.flow.load_state_dict(restored.ema.module.state_dict())
    restored.ema = None
    torch.manual_seed(2)
    again = restored.sample(4, labels=torch.tensor([0, 1, 0, 1]), temperature=0.5)
    assert torch.equal(images, again)


def test_sample_classifier_runs_on_tiny_samples() -> None:
    torch.manual_seed(0)
    model = _tiny_nfpi(ema_decay=None)
    model.flow.data_init(torch.rand(8, 3, 8, 8) * 2 - 1)
    model.prior_mu[1] += 3.0  # two distinguishable classes
    model.prior_var.fill_(0.1)
    xs = model.sample(40, labels=torch.arange(40) % 2)
    test = [(xs, torch.arange(40) % 2)]
    datamodule = type("DM", (), {"test_dataloader": lambda self: test, "num_classes": 2})()
    metric = SampleClassifier(temperature=1.0, train_size=40, epochs=2, batch_size=20)
    out = metric(model=model, datamodule=datamodule)
    assert set(out) == {"accuracy/T1"} and 0.0 <= out["accuracy/T1"] <= 1.0
