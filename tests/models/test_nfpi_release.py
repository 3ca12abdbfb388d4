"""NFPI against the released code (issue 17) and the sync-free matrix exponentials (issue 19):
the residual block and coupling net written out by hand from the release's equations, the
attention placement, the isotropic μ update, Taylor expm vs ``torch.linalg.matrix_exp`` over
the tested norm ranges, equal bits/dim with both expm settings, and the fine-tune weight load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentzoo.models.nets.glow import (
    CouplingNet,
    Glow,
    MatrixExpCoupling,
    ResidualBlock,
    SelfAttention,
)
from latentzoo.models.nets.matrix_exp_taylor import (
    ACTION_THETA,
    action_substeps,
    matrix_exp_action,
    matrix_exp_taylor,
)
from latentzoo.models.nfpi import NFPI, fixed_point_iteration, kl_summary, pairwise_kl
from latentzoo.utils.errors import LatentzooError


def _channel_std(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1).std(1)


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1).mean(1)


def _release_conv_init(weight: torch.Tensor, x: torch.Tensor, pad: int, init_scale: float, act):
    """The release's ``Conv2d`` data init written out: w /= std(act(conv(x))) per channel, then
    the norm scale = init_scale / std(conv'(x)), shift = −mean·scale."""
    out = act(F.conv2d(x, weight, padding=pad))
    w = weight / (_channel_std(out) + 1e-8).view(-1, 1, 1, 1)
    h = F.conv2d(x, w, padding=pad)
    scale = init_scale / (_channel_std(h) + 1e-8)
    return w, scale.view(-1, 1, 1), (-_channel_mean(h) * scale).view(-1, 1, 1)


def test_residual_block_matches_the_release_equations() -> None:
    """Block(x) = ELU(x + N3(conv3(ELU(N2(conv2(ELU(N1(conv1 x)))))))) with data-init norms."""
    torch.manual_seed(0)
    block = ResidualBlock(6).double()
    w1, w2, w3 = (c.conv.weight.detach().clone() for c in (block.conv1, block.conv2, block.conv3))
    x = torch.randn(5, 6, 4, 4, dtype=torch.float64)
    out = block(x)  # first call: data init
    ident = lambda t: t  # noqa: E731
    v1, s1, b1 = _release_conv_init(w1, x, 1, 1.0, ident)
    h = F.elu(s1 * F.conv2d(x, v1, padding=1) + b1)
    v2, s2, b2 = _release_conv_init(w2, h, 0, 1.0, ident)
    h = F.elu(s2 * F.conv2d(h, v2) + b2)
    v3, s3, b3 = _release_conv_init(w3, h, 1, 0.0, ident)
    ref = F.elu(x + s3 * F.conv2d(h, v3, padding=1) + b3)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(out, F.elu(x))  # the last norm starts at zero: the block is ELU(x)
    # after training moves the last norm, the ELU still follows the add
    with torch.no_grad():
        block.conv3.norm.scale.fill_(0.5)
    h3 = block.conv3(F.elu(block.conv2(F.elu(block.conv1(x)))))
    assert torch.allclose(block(x), F.elu(x + h3))
    assert (block(x) < 0).any()  # ELU output, not a plain sum


def test_coupling_net_first_conv_and_attention_after_the_output_conv() -> None:
    torch.manual_seed(1)
    net = CouplingNet(3, 6, hidden=12, blocks=1, attention=True).double()
    first = net.net[0]
    w0 = first.conv.weight.detach().clone()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    net(x)
    v, s, b = _release_conv_init(w0, x, 1, 1.0, F.elu)  # the std is taken after the ELU
    assert torch.allclose(first.conv.weight, v) and torch.allclose(first.norm.scale, s)
    assert torch.allclose(first(x), F.elu(s * F.conv2d(x, v, padding=1) + b))
    assert isinstance(net.net[-1], SelfAttention) and isinstance(net.net[-2], torch.nn.Conv2d)
    assert net.net[-1].norm.num_channels == 6  # attention on the output channels
    assert torch.equal(net(x), torch.zeros(4, 6, 4, 4, dtype=torch.float64))  # zero-init


def test_attention_matches_the_legacy_head_layout() -> None:
    """qkv laid out head by head, softmax(q·k/√d), residual through a zero-init projection."""
    torch.manual_seed(2)
    att = SelfAttention(12, heads=6).double()
    torch.nn.init.normal_(att.out.weight)
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64)
    flat = x.reshape(2, 12, 9)
    qkv = att.qkv(att.norm(flat)).reshape(2 * 6, 3 * 2, 9)
    q, k, v = qkv.split(2, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(2), -1)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(2, 12, 9)
    assert torch.allclose(att(x), (flat + att.out(h)).view_as(x), atol=1e-10)


def test_coupling_matrix_is_laid_out_column_by_column() -> None:
    """The release reads the net's output as [t, M[:, 0], M[:, 1], ...]."""
    layer = MatrixExpCoupling(4, hidden=4, blocks=0).double()
    out = torch.arange(6.0, dtype=torch.float64).view(1, 6, 1, 1)

    class Fixed(torch.nn.Module):
        def forward(self, _: torch.Tensor) -> torch.Tensor:
            return out

    layer.net = Fixed()
    with torch.no_grad():
        layer.a.fill_(1.0)
        layer.r.fill_(1.0)
    t, m = layer._params(torch.zeros(1, 2, 1, 1, dtype=torch.float64))
    assert torch.equal(t.flatten(), torch.tensor([0.0, 1.0], dtype=torch.float64))
    expected = torch.tanh(torch.tensor([[2.0, 4.0], [3.0, 5.0]], dtype=torch.float64))
    assert torch.allclose(m[0, 0, 0], expected)


@pytest.mark.parametrize("norm", [1e-3, 0.3, 1.0, 3.0, 20.0, 60.0])
@pytest.mark.parametrize("n", [4, 24, 48])
def test_matrix_exp_taylor_matches_torch(norm: float, n: int) -> None:
    """Relative to ‖e^A‖, over ‖A‖₁ in [1e-3, 60] (the 1×1-conv weights: logm of a 48-channel
    rotation has ‖W‖₁ ≲ 22; e^A overflows float32 near 88): 1e-12 in float64 (the series and
    the squarings); in float32 1e-6 or, where float32 rounding alone exceeds that (torch's own
    result is 1-2e-6 off at n = 24..48, ‖A‖₁ = 20), within 4× torch's own error."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(3, n, n, generator=g, dtype=torch.float64)
    a = a / a.abs().sum(-2).amax(-1)[:, None, None] * norm
    a[1] = 0.5 * (a[1] - a[1].T)  # a skew-symmetric one, as the 1×1 conv's logm init
    ref = torch.linalg.matrix_exp(a)
    scale = ref.abs().amax((-2, -1), keepdim=True)
    assert ((matrix_exp_taylor(a) - ref).abs() / scale).max() < 1e-12
    ref32 = torch.linalg.matrix_exp(a.float()).double()
    err32 = ((matrix_exp_taylor(a.float()).double() - ref) / scale).abs().max()
    torch32 = ((ref32 - ref) / scale).abs().max()  # torch's own float32 rounding error
    assert err32 < max(1e-6, 4 * torch32)


@pytest.mark.parametrize("norm", [1e-3, 0.5, 1.0, 2.0, 4.0, 8.0])
def test_matrix_exp_action_matches_torch_over_the_coupling_range(norm: float) -> None:
    """e^M·x within 1e-6·‖e^M‖‖x‖ for ‖M‖₁ up to 8 (8× the coupling's bound at init), with the
    substeps :func:`action_substeps` picks for that bound."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(200, 6, 6, generator=g, dtype=torch.float64)
    m = m / m.abs().sum(-2).amax(-1)[:, None, None] * norm
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    ref = (torch.linalg.matrix_exp(m) @ x[..., None])[..., 0]
    steps = action_substeps(norm)
    assert norm * 1.0 / steps <= ACTION_THETA
    scale = torch.linalg.matrix_exp(m).abs().amax() * x.abs().amax()
    assert (matrix_exp_action(m, x, steps) - ref).abs().max() / scale < 1e-9
    out32 = matrix_exp_action(m.float(), x.float(), steps).double()
    assert (out32 - ref).abs().max() / scale < 1e-6


def test_coupling_substeps_follow_the_parameter_bound() -> None:
    layer = MatrixExpCoupling(12, hidden=4, blocks=0)
    x = torch.randn(2, 12, 2, 2)
    layer(x)
    assert layer.substeps == 1  # c2(|r| + |d|) = 1 at init
    with torch.no_grad():
        layer.r.fill_(2.0)  # bound 12 -> 1.5 * 12 / 2 = 9 substeps, published by the next call
    layer(x)
    layer(x)
    assert layer.substeps == action_substeps(12.0) == 9


def _trained_glow(expm: str) -> tuple[Glow, torch.Tensor]:
    torch.manual_seed(0)
    flow = Glow((3, 16, 16), levels=2, steps=2, blocks=1, hidden=16, expm=expm)
    x = torch.rand(8, 3, 16, 16)
    flow.data_init(2 * x - 1)
    opt = torch.optim.Adamax(flow.parameters(), lr=0.02)
    for _ in range(3):
        opt.zero_grad()
        z, logdet = flow(2 * x - 1)
        (0.5 * z.pow(2).sum((1, 2, 3)) - logdet).mean().backward()
        opt.step()
    return flow, x


def test_bits_per_dim_equal_with_both_expm_settings() -> None:
    """Same weights (trained a few steps, so the couplings are not the identity): bits/dim of a
    fixed batch agree to 1e-5 between ``taylor`` and ``torch``, and so do the gradients."""
    flow, x = _trained_glow("torch")
    fast = Glow((3, 16, 16), levels=2, steps=2, blocks=1, hidden=16, expm="taylor")
    fast.load_state_dict(flow.state_dict())
    flow.zero_grad(set_to_none=True)
    bpd = {}
    grads = {}
    for name, f in (("torch", flow), ("taylor", fast)):
        model = NFPI(f, (3, 16, 16), 2, dequant_eval="midpoint", ema_decay=None)
        model.eval()
        y = torch.tensor([0, 1] * 4)
        cond, _ = model._nll(x, y, model.flow)
        value = cond / (model.dims * math.log(2))
        value.mean().backward()
        bpd[name] = value.detach().double()
        grads[name] = torch.cat([p.grad.flatten() for p in f.parameters() if p.grad is not None])
    assert (bpd["torch"] - bpd["taylor"]).abs().max() < 1e-5
    assert torch.allclose(grads["torch"], grads["taylor"], rtol=1e-3, atol=1e-4)
    assert bool((flow.levels[0][0].layers[2].r != 1 / 6).any())  # really trained


def test_isotropic_mean_update_uses_the_mean_variance() -> None:
    """One μ step with isotropic_var_for_mean: μ_i = m_i + λ v̄_i Σ_j (K_ij/v̄_j + K_ji/v̄_i)
    (μ_i − μ_j), with v̄ the per-class mean variance (K from the full-variance KLs)."""
    g = torch.Generator().manual_seed(0)
    k, d = 3, 5
    m = torch.randn(k, d, generator=g, dtype=torch.float64)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64)
    v = torch.rand(k, d, generator=g, dtype=torch.float64) + 0.5
    lam = 2.0
    new_mu, _, _ = fixed_point_iteration(
        m, v, mu, v, lam, 0.0, update_sigma=False, isotropic_var_for_mean=True, max_iter=1
    )
    kl = pairwise_kl(mu, v).clamp_min(1e-8)
    kernel = (math.exp(-0.1) / (10 * kl)) * (1 - torch.eye(k, dtype=torch.float64))
    vbar = v.mean(1)
    expected = m.clone()
    for i in range(k):
        for j in range(k):
            w = kernel[i, j] / vbar[j] + kernel[j, i] / vbar[i]
            expected[i] += lam / (k * (k - 1)) * vbar[i] * w * (mu[i] - mu[j])
    assert torch.allclose(new_mu, expected, atol=1e-12)
    plain, _, _ = fixed_point_iteration(m, v, mu, v, lam, 0.0, update_sigma=False, max_iter=1)
    assert not torch.allclose(plain, expected)  # the trick changes the update


def test_kl_summary_in_row_chunks_equals_the_full_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(40, 3000, generator=g)
    v = torch.rand(40, 3000, generator=g) + 0.1
    full = pairwise_kl(mu.double(), v.double())
    off = full[~torch.eye(40, dtype=torch.bool)]
    summary = kl_summary(mu, v)  # 2**23 // (40 * 3000) = 69 rows -> one chunk; force more:
    assert summary["kl_min"] == pytest.approx(float(off.min()))
    rows = torch.cat(
        [pairwise_kl(mu.double(), v.double(), slice(i, i + 7)) for i in range(0, 40, 7)]
    )
    assert torch.equal(rows, full)


def test_init_flow_from_loads_raw_flow_weights(tmp_path) -> None:
    def make() -> NFPI:
        flow = Glow((3, 8, 8), levels=2, steps=1, blocks=1, hidden=8, attention=True)
        return NFPI(flow, (3, 8, 8), 2, ema_decay=None)

    torch.manual_seed(0)
    source = make()
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = make()
    target.load_flow_weights(str(path))
    for (name, a), b in zip(
        source.flow.state_dict().items(), target.flow.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    other = NFPI(Glow((3, 8, 8), levels=2, steps=1, blocks=1, hidden=8), (3, 8, 8), 2)
    with pytest.raises(LatentzooError, match="attention included"):
        other.load_flow_weights(str(path))
    with pytest.raises(LatentzooError, match="no such checkpoint"):
        other.load_flow_weights(str(tmp_path / "nope.ckpt"))


def test_preprocess_keeps_sub_8_bit_noise() -> None:
    """The release does not round 255·x: the MNIST U(0, 0.05) noise and x > 1 reach the flow."""
    model = NFPI(Glow((1, 8, 8), levels=1, steps=1, blocks=0, hidden=4), (1, 8, 8), 2)
    x = torch.full((1, 1, 8, 8), 200 / 255)
    step = model.preprocess(x + 0.02, midpoint=True) - model.preprocess(x, midpoint=True)
    assert torch.allclose(step, torch.full_like(x, 2 * 255 * 0.02 / 256), atol=1e-6)
    assert model.preprocess(torch.full_like(x, 1.04), midpoint=True).min() > 1.0


def test_substeps_follow_loaded_weights_and_deepcopy() -> None:
    import copy

    layer = MatrixExpCoupling(12, hidden=4, blocks=0)
    layer(torch.randn(2, 12, 2, 2))
    state = layer.state_dict()
    state["r"] = torch.tensor(2.0)
    layer.load_state_dict(state)
    assert layer.substeps == action_substeps(12.0)  # before any forward with the new weights
    assert copy.deepcopy(layer)._published is None
