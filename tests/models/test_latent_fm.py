"""Latent flow matching: path, solvers, CFG, EMA, checkpoint round trip, training, configs."""

from __future__ import annotations

import functools
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from latentzoo.models import KLAutoencoder, LatentFlowMatching
from latentzoo.models.autoencoders import IdentityFirstStage, KLAutoencoderNet, KLFirstStage
from latentzoo.models.ema import EMA
from latentzoo.models.nets.dit import DiT
from latentzoo.models.samplers import StraightPath, convert_lfm, guided_field, solve
from latentzoo.utils.errors import LatentzooError
from tests.conftest import compose_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets run faster on one thread than oversubscribed on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_DIT = functools.partial(DiT, size=None, depth=2, hidden_size=64, num_heads=4, patch_size=2)


def tiny_model(num_classes: int = 0, label_dropout: float = 0.0, **kwargs) -> LatentFlowMatching:
    return LatentFlowMatching(
        TINY_DIT,
        IdentityFirstStage(3),
        [3, 8, 8],
        num_classes=num_classes,
        label_dropout=label_dropout,
        **kwargs,
    )


# ------------------------------------------------------------------ path and conventions
@pytest.mark.parametrize("sigma_min", [0.0, 1e-5, 0.1])
def test_path_matches_closed_form(sigma_min: float) -> None:
    x1, eps, t = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5)
    xt, ut = StraightPath(sigma_min).sample(x1, eps, t)
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(xt, (1 - (1 - sigma_min) * tb) * eps + tb * x1)
    assert torch.allclose(ut, x1 - (1 - sigma_min) * eps)
    # u is the time derivative of x_t along the path
    h = 1e-3
    xt2, _ = StraightPath(sigma_min).sample(x1, eps, t + h)
    assert torch.allclose((xt2 - xt) / h, ut, atol=1e-2)
    at_data = StraightPath(sigma_min).sample(x1, eps, torch.ones(5))[0]
    assert torch.allclose(at_data, x1 + sigma_min * eps, atol=1e-6)  # data plus the floor


def test_convert_lfm_negates_and_reverses_time() -> None:
    v = lambda x, t: x * t.view(-1, 1) + 1.0  # noqa: E731
    x, t = torch.randn(4, 3), torch.rand(4)
    assert torch.allclose(convert_lfm(v)(x, t), -v(x, 1 - t))


# ------------------------------------------------------------------ solvers on dx/dt = A x
def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = a / torch.linalg.matrix_norm(a, ord=2)  # ‖A‖ = 1
    x0 = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(a).T
    return (lambda x, t: x @ a.T), x0, exact


def _rel_err(method: str, steps: int | None = None, **kw) -> tuple[float, int]:
    field, x0, exact = _linear_problem()
    x, nfe = solve(field, x0, method=method, steps=steps, **kw)
    return float((x - exact).norm() / exact.norm()), nfe


def test_euler_converges_first_order_with_exact_nfe() -> None:
    e100, nfe = _rel_err("euler", 100)
    e1000, _ = _rel_err("euler", 1000)
    assert nfe == 100 and e1000 < 1e-2
    assert 8 < e100 / e1000 < 12  # first order: 10x steps -> 10x smaller error


def test_heun_is_second_order_and_counts_nfe() -> None:
    e10, nfe = _rel_err("heun", 10)
    e20, _ = _rel_err("heun", 20)
    assert nfe == 20 and 3.5 < e10 / e20 < 4.5
    assert _rel_err("heun_edm", 10)[1] == 19 and _rel_err("midpoint", 10)[1] == 20
    assert e20 < _rel_err("euler", 20)[0] / 10


@pytest.mark.parametrize("method,tol", [("dopri5", 1e-4), ("bosh3", 1e-3), ("dopri8", 1e-4)])
def test_adaptive_torchdiffeq_solvers_reach_tolerance(method: str, tol: float) -> None:
    err, nfe = _rel_err(method, rtol=1e-6, atol=1e-6)
    assert err < tol and nfe > 0
    assert _rel_err("rk4", 10)[0] < 1e-5  # fixed-grid torchdiffeq method by name


def test_unknown_sampler_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        _rel_err("nope")


# ------------------------------------------------------------------ CFG and labels
def test_cfg_scale_one_is_the_conditional_field_and_scale_combines() -> None:
    net = DiT(4, 8, 5, 0.1, size=None, depth=1, hidden_size=32, num_heads=2)
    for p in net.parameters():  # leave the zero init so the output depends on y
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 2, 4])
    assert torch.allclose(guided_field(net, y, 5, 1.0)(x, t), net(x, t, y))
    v_c, v_u = net(x, t, y), net(x, t, torch.full_like(y, 5))
    assert not torch.allclose(v_c, v_u)
    assert torch.allclose(guided_field(net, y, 5, 2.5)(x, t), v_u + 2.5 * (v_c - v_u), atol=1e-5)


def test_label_dropout_rate_and_cfg_refusal() -> None:
    model = tiny_model(num_classes=10, label_dropout=0.2)
    y = model._labels(torch.zeros(10_000, dtype=torch.long), 10_000, train=True)
    assert abs(float((y == 10).float().mean()) - 0.2) < 0.02
    assert (model._labels(torch.zeros(10, dtype=torch.long), 10, train=False) == 0).all()
    untrained = tiny_model(num_classes=10, null_class=True)
    with pytest.raises(LatentzooError, match="never trained"):
        untrained.sample(2, sampler="euler", steps=1, cfg_scale=1.5)
    untrained.allow_untrained_guidance = True
    untrained.sample(2, sampler="euler", steps=2, cfg_scale=1.5)
    assert untrained.last_nfe == 2 and untrained.last_net_forwards == 4


# ------------------------------------------------------------------ EMA
def test_ema_update_math_on_a_separate_copy() -> None:
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1))
    assert torch.allclose(
        ema.module(torch.eye(2)).T - ema.module.bias[:, None], ema.shadow["weight"]
    )
    assert torch.equal(net.weight, w0 + 1)  # the raw weights are never touched
    ema.reset(net)
    assert ema.num_updates == 0 and torch.equal(ema.shadow["weight"], net.weight)


def test_ema_warmup_follows_early_weights() -> None:
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.999, warmup=True)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # first update: decay min(0.999, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], 0.1 * w0 + 0.9 * (w0 + 1))
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.999  # the ramp ends at the configured decay
    assert EMA(net, decay=0.999).current_decay() == 0.999  # no warmup: fixed from the start


def _loader(n: int = 16, classes: int = 3) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 8, 8, generator=gen)
    return DataLoader(TensorDataset(images, torch.arange(n) % classes), batch_size=8)


def _trainer(tmp_path: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )


def test_ema_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    model = tiny_model(
        num_classes=3,
        label_dropout=0.1,
        ema_decay=0.5,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
    )
    trainer = _trainer(tmp_path, 3)
    trainer.fit(model, _loader())
    assert model.ema.num_updates == 3
    raw = model.net.final_layer.linear.weight.detach().clone()
    assert not torch.allclose(model.ema.shadow["final_layer.linear.weight"], raw)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert checkpoint["latent_fm"]["null_label"] == 3 and "ema" in checkpoint

    fresh = tiny_model(num_classes=3, label_dropout=0.1, ema_decay=0.5)
    fresh.on_load_checkpoint(checkpoint)  # as eval.py does, before load_state_dict
    fresh.load_state_dict(checkpoint["state_dict"])
    for name, value in model.ema.shadow.items():
        assert torch.equal(fresh.ema.shadow[name].cpu(), value.cpu())
    noise = torch.randn(2, 3, 8, 8)
    a = model.sample(2, sampler="euler", steps=3, noise=noise, return_latents=True)
    b = fresh.sample(2, sampler="euler", steps=3, noise=noise, return_latents=True)
    assert torch.allclose(a, b, atol=1e-6)
    # sampling used the EMA weights, not the raw ones
    ema_out = fresh.velocity(noise, torch.zeros(2), torch.tensor([0, 1]), net=fresh.ema.module)
    assert not torch.allclose(ema_out, fresh.velocity(noise, torch.zeros(2), torch.tensor([0, 1])))
    raw_sample = tiny_model(num_classes=3, label_dropout=0.1, ema_decay=None)
    raw_sample.load_state_dict(checkpoint["state_dict"])
    c = raw_sample.sample(2, sampler="euler", steps=3, noise=noise, return_latents=True)
    assert not torch.allclose(b, c, atol=1e-4)
    assert torch.equal(fresh.net.final_layer.linear.weight, raw)

    wrong = tiny_model(num_classes=4, label_dropout=0.1)
    with pytest.raises(Exception, match="num_classes"):
        wrong.on_load_checkpoint(checkpoint)


# ------------------------------------------------------------------ training
def test_warmup_cosine_schedule() -> None:
    from latentzoo.models.latent_fm import warmup_cosine_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way down the cosine
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_few_steps_lower_the_fm_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = tiny_model(ema_decay=None)
    batch = (torch.rand(16, 3, 8, 8), torch.zeros(16, dtype=torch.long))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def fixed_loss() -> float:
        torch.manual_seed(1)  # same t and ε each time
        with torch.no_grad():
            return float(model.step(batch, "val")["loss"])

    before = fixed_loss()
    for _ in range(30):
        loss = model.step(batch, "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.9 * before


def test_latent_batches_and_time_convention_lfm_give_the_same_loss() -> None:
    torch.manual_seed(0)
    model = tiny_model(ema_decay=None, posterior="mean")
    for p in model.net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    lfm = tiny_model(ema_decay=None, time_convention="lfm")
    lfm.net.load_state_dict(model.net.state_dict())
    z = torch.randn(4, 3, 8, 8)
    torch.manual_seed(3)
    a = model.step({"latent": z, "label": torch.zeros(4)}, "val")["loss"]
    torch.manual_seed(3)
    b = model.step(((z + 1) / 2, torch.zeros(4)), "val")["loss"]
    assert torch.allclose(a, b, atol=1e-5)  # identity stage: images x ↦ latents 2x − 1
    t, x = torch.rand(4), torch.randn(4, 3, 8, 8)
    assert torch.allclose(lfm.velocity(x, t, None), -model.net(x, 1 - t, None))


def test_sample_returns_images_in_unit_range_with_nfe() -> None:
    model = LatentFlowMatching(
        TINY_DIT,
        KLFirstStage(net=KLAutoencoderNet(3, 3, 8, [1, 2], 1)),
        [3, 16, 16],
        sampler={"name": "heun", "steps": 4},
    )
    images = model.sample(3)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert model.last_nfe == 8
    model.sample(2, sampler="dopri5")
    assert model.last_nfe >= 6


def test_kl_autoencoder_trains_a_few_steps() -> None:
    torch.manual_seed(0)
    model = KLAutoencoder(KLAutoencoderNet(3, 3, 8, [1, 2], 1), kl_weight=1e-6)
    images = torch.rand(4, 3, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss = model.step((images, None), "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model.encode(images).shape == (4, 3, 4, 4)
    with pytest.raises(LatentzooError, match="perceptual_weight"):
        try:
            import lpips  # noqa: F401

            pytest.skip("lpips installed")
        except ImportError:
            KLAutoencoder(KLAutoencoderNet(3, 3, 8, [1, 2], 1), perceptual_weight=1.0)


def test_kl_first_stage_loads_a_kl_autoencoder_checkpoint(tmp_path: Path) -> None:
    from latentzoo.utils.checkpoint import CHECKPOINT_KEY

    net_cfg = {
        "_target_": "latentzoo.models.autoencoders.KLAutoencoderNet",
        "in_channels": 3,
        "z_channels": 3,
        "ch": 8,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
    }
    model = KLAutoencoder(hydra.utils.instantiate(net_cfg))
    checkpoint = {
        "state_dict": model.state_dict(),
        CHECKPOINT_KEY: {
            "config": {"model": {"_target_": "latentzoo.models.KLAutoencoder", "net": net_cfg}}
        },
    }
    torch.save(checkpoint, tmp_path / "kl.ckpt")
    stage = KLFirstStage(ckpt_path=str(tmp_path / "kl.ckpt"), scale_factor=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(stage.encode(x)[0], model.net.encode(x)[0])
    assert stage.downsample == 2 and stage.latent_channels == 3
    assert not any(p.requires_grad for p in stage.parameters())


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("backbone", ["dit_tiny", "unet_tiny"])
def test_latent_fm_config_composes_and_builds(tmp_path: Path, backbone: str) -> None:
    cfg = compose_config(
        "train",
        [
            "model=latent_fm",
            f"model/backbone={backbone}",
            "model/autoencoder=identity",
            "data=proc_dsprites",
        ],
        tmp_path,
    )
    model = hydra.utils.instantiate(cfg.model)
    assert model.latent_shape == [1, 64, 64] and model.num_classes == 0
    assert model.sampler["name"] == "dopri5" and model.ema.decay == 0.9999
    opt = model.configure_optimizers()
    assert isinstance(opt["optimizer"], torch.optim.AdamW)
    n_opt = sum(p.numel() for g in opt["optimizer"].param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.net.parameters())
    sched = opt["lr_scheduler"]["scheduler"]
    assert sched.get_last_lr()[0] == pytest.approx(2e-4)  # constant by default (LFM)


def test_big_backbone_configs_resolve(tmp_path: Path) -> None:
    for name, depth in [("dit_b2", 12), ("dit_xl2", 28), ("dit_s8", 12)]:
        cfg = compose_config(
            "train",
            [
                "model=latent_fm",
                f"model/backbone={name}",
                "model/autoencoder=identity",
                "data=proc_dsprites",
            ],
            tmp_path,
        )
        with torch.device("meta"):
            net = hydra.utils.instantiate(cfg.model.backbone)(in_channels=4, input_size=32)
        assert len(net.blocks) == depth


def test_train_then_eval_restores_ema_from_the_checkpoint(tmp_path: Path) -> None:
    from latentzoo.eval import evaluate
    from latentzoo.train import train
    from tests.conftest import TINY_TRAINER

    model_overrides = [
        *TINY_TRAINER,
        "~callbacks.rich_progress_bar",
        "~callbacks.rich_model_summary",
        "data=proc_blobs",
        "data.image_size=16",
        "data.num_train=64",
        "data.num_val=16",
        "data.num_test=16",
        "data.batch_size=8",
        "test=false",  # the test stage would reload the best (step-2) checkpoint into the model
        "model=latent_fm",
        "model/backbone=dit_tiny",
        "model.backbone.patch_size=8",
        "model/autoencoder=identity",
        "model.ema_decay=0.5",
    ]
    run = tmp_path / "run"
    _, objects = train(compose_config("train", model_overrides, run))
    trained = objects["model"]
    assert objects["trainer"].global_step == 4 and trained.ema.num_updates == 4
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            "trainer.enable_progress_bar=false",
            "callbacks=none",
            "extras.print_config=false",
        ],
        tmp_path / "ev",
    )
    metrics, objects = evaluate(cfg)
    model = objects["model"]
    saved = torch.load(ckpt, weights_only=False)["ema"]["shadow"]
    for name, value in saved.items():
        assert torch.equal(model.ema.shadow[name].cpu(), value), name
    images = model.sample(4, sampler="euler", steps=2)
    assert images.shape == (4, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert model.last_nfe == 2 and "test/loss" in metrics


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "configs/data/proc_blobs.yaml").is_file(),
    reason="data=proc_blobs comes from the image-datamodule branch",
)
def test_proc_blobs_experiment_composes_and_samples(tmp_path: Path) -> None:
    cfg = compose_config(
        "train", ["experiment=latent_fm_proc_blobs", "data.image_size=16"], tmp_path
    )
    model = hydra.utils.instantiate(cfg.model)
    images = model.sample(4)
    assert images.shape == (4, 3, 16, 16) and model.last_nfe == 20


TINY_VAE = {  # a random diffusers AutoencoderKL: widths [32, 64], 1 layer, 8 groups (f2)
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
}


def test_diffusers_vae_wrapper_local_folder_and_offline_message(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from latentzoo.models.autoencoders import DiffusersVAE

    vae = DiffusersVAE(config=TINY_VAE)
    assert (vae.latent_channels, vae.downsample, vae.scale_factor) == (4, 2, 0.18215)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and (std > 0).all()
    vae.vae.save_pretrained(tmp_path / "vae")
    loaded = DiffusersVAE(pretrained=str(tmp_path / "vae"))
    assert torch.allclose(loaded.encode(x)[0], mean) and loaded.fingerprint() == vae.fingerprint()
    with pytest.raises(LatentzooError, match="local folder with config.json"):
        DiffusersVAE(pretrained=str(tmp_path / "missing"), local_files_only=True)


@pytest.mark.slow
def test_cpu_smoke_dit_s8_on_a_tiny_vae() -> None:
    """Spec §13: DiT-S/8 on 64-px images with the tiny VAE, 20 steps, then sample(4)."""
    pytest.importorskip("diffusers")
    from latentzoo.models.autoencoders import DiffusersVAE

    torch.manual_seed(0)
    model = LatentFlowMatching(
        functools.partial(DiT, size="S", patch_size=8),
        DiffusersVAE(config=TINY_VAE),
        [3, 64, 64],
        sampler={"name": "euler", "steps": 4},
    )
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-4)
    images = torch.rand(4, 3, 64, 64)
    for _ in range(20):
        loss = model.step((images, torch.zeros(4, dtype=torch.long)), "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.ema.update(model.net)
    assert torch.isfinite(loss)
    samples = model.sample(4)
    assert samples.shape == (4, 3, 64, 64) and samples.min() >= 0 and samples.max() <= 1


def test_kl_autoencoder_trains_through_the_train_task_and_loads_frozen(tmp_path: Path) -> None:
    from latentzoo.train import train
    from tests.conftest import TINY

    overrides = [
        *TINY,
        "model=kl_autoencoder",
        "model.net.ch=8",
        "~callbacks.latent_traversal_grid",
    ]
    _, objects = train(compose_config("train", overrides, tmp_path))
    assert objects["trainer"].global_step == 4
    assert list((tmp_path / "images").glob("reconstructions_step*.png"))
    stage = KLFirstStage(ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), name="kl_f4")
    assert (stage.latent_channels, stage.downsample) == (3, 4)
    x = torch.rand(2, 1, 64, 64)
    trained = objects["model"].cpu()
    assert torch.allclose(stage.encode(x * 2 - 1)[0], trained.encode(x), atol=1e-6)
