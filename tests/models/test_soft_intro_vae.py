"""Soft-IntroVAE (soft_intro_vae.md §10): architecture shapes, the KL closed form, the expELBO
terms, a hand computation of L_E, the frozen network in each step, both optimisers stepping once
per batch, the β_neg → ∞ limit, a CPU smoke run, and FID in eval mode (the §7 pitfall)."""

from __future__ import annotations

import copy
import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from latentzoo.data.images import ProcBlobsDataModule
from latentzoo.metrics.generative import FIDEvaluator
from latentzoo.models import SoftIntroVAE
from latentzoo.models.nets.introvae import IntroDecoder, IntroEncoder
from latentzoo.models.soft_intro_vae import kl_divergence
from latentzoo.utils.errors import NonFiniteLossError


def make_model(image_shape=(3, 16, 16), channels=(8, 16), latent_dim=8, **kwargs):
    kwargs.setdefault("beta_neg", 256.0)
    return SoftIntroVAE(
        encoder=IntroEncoder(image_shape, channels, latent_dim),
        decoder=IntroDecoder(image_shape, channels, latent_dim),
        latent_dim=latent_dim,
        **kwargs,
    )


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny convs run several times faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same(now, before) -> bool:
    """Every tensor of ``now`` bitwise equal to its counterpart in ``before``."""
    return all(torch.equal(a, b) for a, b in zip(list(now), list(before), strict=True))


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.parametrize(
    "arch,shape,channels,feature,latent,batch",
    [
        ("cifar", (3, 32, 32), [64, 128, 256], (256, 4, 4), 128, 4),
        ("mnist", (1, 28, 28), [64, 128], (128, 7, 7), 32, 4),
        ("celeb256", (3, 256, 256), [64, 128, 256, 512, 512, 512], (512, 4, 4), 256, 1),
    ],
)
def test_architecture_shapes(arch, shape, channels, feature, latent, batch) -> None:
    encoder = IntroEncoder(shape, channels, latent, feature_size=feature[1])
    decoder = IntroDecoder(shape, channels, latent, feature_size=feature[1])
    assert encoder.feature_shape == decoder.feature_shape == feature
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        feats = encoder.features(x)
        assert tuple(feats.shape[1:]) == feature
        out = encoder(x)
        assert out.shape == (batch, 2 * latent)
        if arch != "celeb256":  # shape-only for the 256-px net (CPU time)
            assert decoder(out[:, :latent]).shape == x.shape
    # the residual-block convs carry no bias; the decoder has no output activation
    convs = [m for m in encoder.features.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    assert isinstance(decoder.main[-1], nn.Conv2d)


def test_decoder_output_shape_celeb256_tiny_batch() -> None:
    decoder = IntroDecoder((3, 256, 256), [8, 8, 8, 8, 8, 8], 16, feature_size=4).eval()
    with torch.no_grad():
        assert decoder(torch.randn(1, 16)).shape == (1, 3, 256, 256)


def test_wrong_feature_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="feature_size=4"):
        IntroEncoder((1, 28, 28), [64, 128], 32, feature_size=4)
    with pytest.raises(ValueError, match="not divisible"):
        IntroEncoder((3, 32, 32), [8, 8, 8, 8, 8, 8], 8)


def test_kl_closed_form_matches_monte_carlo() -> None:
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 5, generator=generator)
    logvar = torch.randn(1, 5, generator=generator) * 0.5
    std = (0.5 * logvar).exp()
    z = mean + std * torch.randn(100_000, 5, generator=generator, dtype=torch.float64)
    log_q = torch.distributions.Normal(mean.double(), std.double()).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    monte_carlo = (log_q - log_p).mean().item()
    closed = kl_divergence(mean, logvar).item()
    assert closed > 0.5
    assert abs(monte_carlo - closed) / closed < 0.01


def test_expelbo_terms_in_unit_interval_and_encoder_loss_by_hand() -> None:
    """A linear E and D on 1×2×2 images: L_E recomputed from the formulas of §4."""
    torch.manual_seed(0)
    shape, latent = (1, 2, 2), 2
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(4, 2 * latent))
    decoder = nn.Sequential(nn.Linear(latent, 4), nn.Unflatten(1, shape))
    model = SoftIntroVAE(encoder, decoder, latent, beta_neg=3.0, beta_rec=0.7, beta_kl=0.4)
    x = torch.rand(3, *shape)
    z_fake = torch.randn(3, latent)
    torch.manual_seed(1)
    terms, _ = model.encoder_terms(x, z_fake)
    for key in ("expelbo_rec", "expelbo_fake"):
        assert 0.0 < terms[key].item() <= 1.0

    torch.manual_seed(1)  # the same draws, in the same order: z, then z' of x_r, then of x_f
    s = 1 / 4
    with torch.no_grad():

        def elbo_parts(y):
            mu, lv = encoder(y).chunk(2, 1)
            y_hat = decoder(mu + torch.randn_like(mu) * (0.5 * lv).exp())
            rec = ((y - y_hat) ** 2).sum((1, 2, 3))
            kl = -0.5 * (1 + lv - mu**2 - lv.exp()).sum(1)
            return rec, kl, y_hat

        rec, kl, x_rec = elbo_parts(x)
        rec_r, kl_r, _ = elbo_parts(x_rec)
        rec_f, kl_f, _ = elbo_parts(decoder(z_fake))
        e_r = 0.7 * rec_r + 3.0 * kl_r
        e_f = 0.7 * rec_f + 3.0 * kl_f
        expected = s * (0.7 * rec.mean() + 0.4 * kl.mean()) + 0.25 * (
            torch.exp(-2 * s * e_r).mean() + torch.exp(-2 * s * e_f).mean()
        )
    torch.testing.assert_close(terms["loss_e"].detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["diff_kl"].detach(), kl_f.mean() - kl.mean())


def test_large_beta_neg_leaves_only_the_real_elbo() -> None:
    torch.manual_seed(0)
    model = make_model(beta_neg=1e12, beta_rec=0.5, beta_kl=2.0)
    x = torch.rand(4, 3, 16, 16)
    terms, _ = model.encoder_terms(x, torch.randn(4, 8))
    s = 1 / (3 * 16 * 16)
    real = s * (0.5 * terms["rec"] + 2.0 * terms["kl"])
    assert terms["expelbo_rec"].item() < 1e-30 and terms["expelbo_fake"].item() < 1e-30
    assert abs(terms["loss_e"].item() - real.item()) < 1e-6


def test_each_step_leaves_the_other_network_untouched(tmp_path) -> None:
    """After the encoder step no decoder parameter changed (bitwise), after the decoder step no
    encoder parameter; both Adam states advance by one per batch; one global step per batch."""
    torch.manual_seed(0)
    model = make_model()
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(model, DataLoader(TensorDataset(torch.rand(16, 3, 16, 16)), batch_size=8))
    opt_e, opt_d = model.optimizers()
    x = torch.rand(8, 3, 16, 16)
    z_fake = torch.randn(8, 8)
    encoder_before = copy.deepcopy(list(model.encoder.parameters()))
    decoder_before = copy.deepcopy(list(model.decoder.parameters()))
    model.zero_grad(set_to_none=True)

    model.toggle_optimizer(opt_e)
    terms, z = model.encoder_terms(x, z_fake)
    model._step(opt_e, terms["loss_e"], "encoder", count=False)
    model.untoggle_optimizer(opt_e)
    assert all(p.grad is None for p in model.decoder.parameters())
    assert same(model.decoder.parameters(), decoder_before)
    assert not same(model.encoder.parameters(), encoder_before)

    encoder_after_e = copy.deepcopy(list(model.encoder.parameters()))
    encoder_grads = [p.grad.clone() for p in model.encoder.parameters()]
    model.toggle_optimizer(opt_d)
    d_terms = model.decoder_terms(x, z, z_fake)
    model._step(opt_d, d_terms["loss_d"], "decoder", count=False)
    model.untoggle_optimizer(opt_d)
    assert same(model.encoder.parameters(), encoder_after_e)
    assert same((p.grad for p in model.encoder.parameters()), encoder_grads)
    assert not same(model.decoder.parameters(), decoder_before)
    assert all(p.requires_grad for p in model.parameters())  # untoggle restored them


def test_both_optimizers_step_once_per_batch(tmp_path) -> None:
    torch.manual_seed(0)
    model = make_model()
    trainer = quiet_trainer(tmp_path, max_steps=3, log_every_n_steps=1)
    trainer.fit(model, DataLoader(TensorDataset(torch.rand(32, 3, 16, 16)), batch_size=8))
    assert trainer.global_step == 3
    for optimizer in trainer.optimizers:
        steps = {int(state["step"]) for state in optimizer.state.values()}
        assert steps == {3}
    assert {"train/loss_e", "train/loss_d", "train/diff_kl", "train/expelbo_fake"} <= set(
        trainer.callback_metrics
    )


def test_warm_up_trains_both_networks_on_the_plain_vae_loss(tmp_path) -> None:
    torch.manual_seed(0)
    model = make_model(num_vae=1)
    before = copy.deepcopy(model.state_dict())
    trainer = quiet_trainer(tmp_path, max_steps=2, log_every_n_steps=1)
    trainer.fit(model, DataLoader(TensorDataset(torch.rand(16, 3, 16, 16)), batch_size=8))
    for optimizer in trainer.optimizers:
        assert {int(s["step"]) for s in optimizer.state.values()} == {2}
    assert "train/loss_e" not in trainer.callback_metrics  # no introspective terms yet
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/loss"], metrics["train/rec"] + metrics["train/kl"])
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_nonfinite_loss_names_beta_neg_or_is_skipped(tmp_path) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.full((8, 3, 16, 16), float("nan"))), batch_size=8)
    with pytest.raises(NonFiniteLossError, match="beta_neg"):
        quiet_trainer(tmp_path, max_steps=1).fit(make_model(), data)
    model = make_model(skip_nonfinite=True)
    before = copy.deepcopy(model.state_dict())
    trainer = quiet_trainer(tmp_path, max_steps=2, log_every_n_steps=1)
    trainer.fit(model, data)
    assert trainer.callback_metrics["train/skipped"].item() == 1.0
    after = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)


def test_sample_and_reconstruct_use_eval_mode_batchnorm() -> None:
    torch.manual_seed(0)
    model = make_model()
    model.train()
    for _ in range(3):  # move the running statistics away from their init
        model.decoder(torch.randn(16, 8) * 3)
    torch.manual_seed(5)
    in_train_mode = model.sample(4)
    assert model.training and model.decoder.training  # the mode is restored
    model.eval()
    torch.manual_seed(5)
    torch.testing.assert_close(in_train_mode, model.sample(4), rtol=0, atol=0)
    assert in_train_mode.min() >= 0 and in_train_mode.max() <= 1
    x = torch.rand(2, 3, 16, 16)
    assert model.reconstruct(x).shape == x.shape
    assert model.encode(x).shape == (2, 8)


def test_loss_on_a_fixed_batch_decreases() -> None:
    torch.manual_seed(0)
    model = make_model(beta_neg=256.0)
    x = torch.rand(8, 3, 16, 16)
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=1e-3)
    history = []
    for _ in range(40):
        z_fake = torch.randn(8, 8)
        model.decoder.requires_grad_(False)
        terms, z = model.encoder_terms(x, z_fake)
        opt_e.zero_grad()
        terms["loss_e"].backward()
        opt_e.step()
        model.decoder.requires_grad_(True)
        model.encoder.requires_grad_(False)
        d_terms = model.decoder_terms(x, z, z_fake)
        opt_d.zero_grad()
        d_terms["loss_d"].backward()
        opt_d.step()
        model.encoder.requires_grad_(True)
        history.append((terms["rec"] + terms["kl"]).item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5


def blobs(tmp_path, num_train=64, batch_size=16) -> ProcBlobsDataModule:
    return ProcBlobsDataModule(
        image_size=32,
        num_train=num_train,
        num_val=16,
        num_test=16,
        batch_size=batch_size,
        flip=False,
    )


def test_cpu_smoke_100_iterations_on_procedural_images(tmp_path) -> None:
    torch.manual_seed(0)
    model = make_model((3, 32, 32), channels=(8, 16, 32), latent_dim=16)
    logger = CSVLogger(tmp_path, name="smoke")
    trainer = quiet_trainer(
        tmp_path, max_steps=100, log_every_n_steps=10, logger=logger, limit_val_batches=1
    )
    trainer.fit(model, datamodule=blobs(tmp_path, num_train=256))
    assert trainer.global_step == 100
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    diff_kl = [float(r["train/diff_kl"]) for r in rows if r.get("train/diff_kl")]
    losses = [float(r[k]) for r in rows for k in ("train/loss_e", "train/loss_d") if r.get(k)]
    assert len(diff_kl) >= 9 and all(math.isfinite(v) for v in diff_kl + losses)
    assert "val/loss" in trainer.callback_metrics


class _FixedNoise(nn.Module):
    """sample(n) decodes the next n rows of a fixed latent bank, so FIDs computed at different
    batch sizes see the same latents; ``train_mode_bn`` reproduces the original's pitfall."""

    def __init__(self, vae: SoftIntroVAE, bank: torch.Tensor, train_mode_bn: bool) -> None:
        super().__init__()
        self.vae, self.bank, self.train_mode_bn, self.cursor = vae, bank, train_mode_bn, 0

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        z = self.bank[self.cursor : self.cursor + n]
        self.cursor += n
        if self.train_mode_bn:
            self.vae.train()  # BatchNorm from the statistics of this batch
        return self.vae.decode(z)


def test_fid_is_batch_size_independent_in_eval_mode(tmp_path) -> None:
    torch.manual_seed(0)
    vae = make_model((3, 32, 32), channels=(8, 16, 32), latent_dim=16)
    vae.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(5):
            vae.decoder(torch.randn(32, 16))
    datamodule = blobs(tmp_path, num_train=200)
    bank = torch.randn(200, 16)

    def fid(batch_size: int, train_mode_bn: bool) -> float:
        evaluator = FIDEvaluator(
            num_samples=200,
            batch_size=batch_size,
            extractor="tiny",
            kid=False,
            stats_dir=str(tmp_path / "stats"),
            output_dir=str(tmp_path),
        )
        return evaluator(_FixedNoise(vae, bank, train_mode_bn), datamodule)["fid"]

    eval_2, eval_200 = fid(2, False), fid(200, False)
    assert abs(eval_2 - eval_200) < 1e-4
    train_2, train_200 = fid(2, True), fid(200, True)
    assert abs(train_2 - train_200) > 1e-2  # the original's protocol depends on the batch
    assert abs(train_200 - eval_200) > 1e-2
