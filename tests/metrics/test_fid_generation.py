"""Sampling for FID: the precision option, NFE / net-forward bookkeeping (metrics=nfe at batch
1), and world-size-independent sharding (2 gloo ranks score what 1 rank scores, KID included)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from latentzoo.metrics.generative import (
    FIDEvaluator,
    GenerativeMetrics,
    NFEEvaluator,
    ReferenceStats,
    TinyFeatureExtractor,
    generate_into,
    to_uint8,
)
from latentzoo.metrics.generative.generation import shard_batches
from latentzoo.utils.errors import LatentzooError
from tests.conftest import compose_config


class NoiseModel(nn.Module):
    """Images from the global RNG (as a flow's noise), tinted by the label; NFE that grows with
    the batch (as an adaptive solver's) plus label % 3; CFG doubles the net forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.autocast: list[tuple[bool, torch.dtype]] = []
        self.batch_sizes: list[int] = []

    def sample(self, n, labels=None, sampler=None, steps=None, cfg_scale=None) -> torch.Tensor:
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        self.batch_sizes.append(n)
        x = torch.rand(n, 3, 16, 16) * self.weight
        extra = 0
        if labels is not None:
            x = x * 0.5 + labels.view(-1, 1, 1, 1).float() / 6
            extra = int(labels[0]) % 3
        self.last_nfe = 10 + 2 * n + extra
        guided = cfg_scale is not None and cfg_scale != 1
        self.last_net_forwards = self.last_nfe * (2 if guided else 1)
        return x.clamp(0, 1)


class Classes:
    num_classes = 3
    image_shape = [3, 16, 16]


# --------------------------------------------------------------------------- precision


def test_bf16_precision_samples_under_autocast_and_fp32_does_not() -> None:
    model = NoiseModel()
    metrics = GenerativeMetrics(extractor="tiny", kid=False)
    generate_into(model, metrics, 8, 4, precision="bf16")
    assert model.autocast == [(True, torch.bfloat16)] * 2
    model.autocast.clear()
    generate_into(model, metrics, 8, 4)
    assert [enabled for enabled, _ in model.autocast] == [False, False]
    with pytest.raises(LatentzooError, match="precision must be one of fp32, bf16"):
        generate_into(model, metrics, 8, 4, precision="fp16")


# --------------------------------------------------------------------------- NFE


def test_nfe_metric_is_the_batch1_mean_and_net_forwards_double_with_cfg() -> None:
    model = NoiseModel()
    out = NFEEvaluator(num_samples=30, cfg_scale=1.5)(model, Classes())
    assert model.batch_sizes == [1] * 30
    # batch 1: 10 + 2 + label % 3, labels class-balanced over 3 classes -> mean extra exactly 1
    assert out["nfe"] == pytest.approx(13.0) and out["net_forwards"] == pytest.approx(26.0)
    plain = NFEEvaluator(num_samples=30)(NoiseModel(), Classes())
    assert plain["net_forwards"] == plain["nfe"] == pytest.approx(13.0)
    assert out["images_per_second"] > 0


def test_fid_run_reports_its_own_nfe_net_forwards_and_throughput(tmp_path: Path) -> None:
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(16), sigma=np.eye(16))
    out = FIDEvaluator(
        num_samples=60,
        batch_size=30,
        extractor="tiny",
        kid=False,
        cfg_scale=2.0,
        reference_path=str(stats),
        output_dir=str(tmp_path),
    )(NoiseModel(), Classes())
    assert 70 <= out["nfe"] <= 72  # batch 30: 10 + 2·30 + label % 3, not the batch-1 value
    assert out["net_forwards"] == pytest.approx(2 * out["nfe"])
    assert out["images_per_second"] > 0 and out["sampling_seconds"] > 0


def test_nfe_config_builds_the_evaluator_from_top_level_keys(tmp_path: Path) -> None:
    cfg = compose_config(
        "eval", ["metrics=nfe", "ckpt_path=x.ckpt", "sampler=dopri5", "cfg_scale=1.5"], tmp_path
    )
    evaluator = hydra.utils.instantiate(cfg.metrics.nfe)
    assert isinstance(evaluator, NFEEvaluator) and evaluator.num_samples == 300
    assert evaluator.sample_kwargs == {"sampler": "dopri5", "steps": None, "cfg_scale": 1.5}


def test_nfe_metric_refuses_models_without_an_nfe_counter() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def sample(self, n):
            return torch.rand(n, 3, 8, 8)

    with pytest.raises(LatentzooError, match="no last_nfe"):
        NFEEvaluator(num_samples=3)(Plain(), None)


# --------------------------------------------------------------------------- sharding


def test_shards_cover_every_sample_once_with_world_independent_batches() -> None:
    one = shard_batches(103, 10, 0, 1)
    two = shard_batches(103, 10, 0, 2) + shard_batches(103, 10, 1, 2)
    three = [b for r in range(3) for b in shard_batches(103, 10, r, 3)]
    assert sorted(i for b in two for i in b) == list(range(103))
    assert sorted(two, key=lambda b: b.start) == one == sorted(three, key=lambda b: b.start)


def _fid_run(reference: str, out: str, rank: int = 0, world: int = 1) -> None:
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world
        )
    torch.manual_seed(100 + rank)  # the run's own randomness must not matter
    try:
        metrics = GenerativeMetrics(extractor="tiny", kid_subsets=5, kid_subset_size=40)
        metrics.set_reference(ReferenceStats.load(reference))
        values = generate_into(NoiseModel(), metrics, 90, 20, num_classes=3, seed=7)
        values.update(metrics.compute())
        values["local"] = int(metrics.fid.fake_features_num_samples)
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(values))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _spawned(rank: int, reference: str, out: str) -> None:
    torch.set_num_threads(1)
    _fid_run(reference, out, rank, 2)


@pytest.mark.slow
def test_two_gloo_ranks_score_what_one_rank_scores(tmp_path: Path) -> None:
    features = TinyFeatureExtractor()(to_uint8(torch.rand(200, 3, 16, 16))).double().numpy()
    ReferenceStats(
        features.mean(0),
        np.cov(features, rowvar=False),
        200,
        {"dataset": "x"},
        features.astype(np.float32),
    ).save(tmp_path / "ref.npz")
    reference = str(tmp_path / "ref.npz")
    _fid_run(reference, str(tmp_path / "single"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_spawned, args=(reference, str(tmp_path / "ddp")), nprocs=2, join=True)
    single = json.loads((tmp_path / "single.rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in (0, 1)]
    assert single["local"] == 90 and [r["local"] for r in ranks] == [50, 40]  # batches 0,2,4 | 1,3
    for values in ranks:
        for key in ("fid", "kid_mean", "kid_std"):
            assert values[key] == pytest.approx(single[key], rel=1e-7), key
        assert values["nfe"] == pytest.approx(single["nfe"])
    assert single["fid"] > 0.01 and single["kid_mean"] != 0


def test_latent_fm_through_the_nfe_and_fid_metrics(tmp_path: Path) -> None:
    """The real latent model: euler 3 steps with CFG is NFE 3 and 6 net forwards, in bf16 too."""
    import functools

    from latentzoo.models import LatentFlowMatching
    from latentzoo.models.autoencoders import IdentityFirstStage
    from latentzoo.models.nets.dit import DiT

    torch.manual_seed(0)
    model = LatentFlowMatching(
        functools.partial(DiT, size=None, depth=1, hidden_size=32, num_heads=2, patch_size=2),
        IdentityFirstStage(3),
        [3, 8, 8],
        num_classes=3,
        label_dropout=0.1,
        ema_decay=None,
    )
    options = dict(sampler="euler", steps=3, cfg_scale=1.5)
    out = NFEEvaluator(num_samples=4, precision="bf16", **options)(model, Classes())
    assert out["nfe"] == 3 and out["net_forwards"] == 6
    np.savez(tmp_path / "ref.npz", mu=np.zeros(16), sigma=np.eye(16))
    fid = FIDEvaluator(
        num_samples=8,
        batch_size=4,
        extractor="tiny",
        kid=False,
        reference_path=str(tmp_path / "ref.npz"),
        output_dir=str(tmp_path),
        **options,
    )(model, Classes())
    assert np.isfinite(fid["fid"]) and fid["nfe"] == 3 and fid["net_forwards"] == 6
