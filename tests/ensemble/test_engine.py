"""The stacked engine against a plain single-model loop (fast: no Lightning, tiny nets)."""

from __future__ import annotations

import pytest
import torch

from latentzoo.callbacks.randomness import rank_seed
from latentzoo.ensemble.engine import StackedEnsemble
from latentzoo.models import BetaTCVAE, BetaVAE
from latentzoo.models.nets import ConvDecoder, ConvEncoder

SHAPE = (1, 16, 16)
STEPS = 3
BATCH = 6


def tiny(seed: int, cls: type = BetaVAE, beta: float = 4.0) -> BetaVAE:
    torch.manual_seed(seed)  # what seed_everything(seed) does to the weights
    kwargs = {"dataset_size": 1000} if cls is BetaTCVAE else {}
    return cls(
        encoder=ConvEncoder(SHAPE, 8, channels=(4, 4), hidden=16),
        decoder=ConvDecoder(SHAPE, 4, channels=(4, 4), hidden=16),
        latent_dim=4,
        beta=beta,
        **kwargs,
    )


def batches(seed: int) -> torch.Tensor:
    """A member's own data stream: STEPS batches."""
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.rand(STEPS, BATCH, *SHAPE, generator=g) > 0.5).float()


def single_run(seed: int, cls: type = BetaVAE, beta: float = 4.0, clip: float | None = None):
    """The single run's semantics: weights from ``seed``, noise from rank_seed(seed, 0)."""
    model = tiny(seed, cls, beta)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(rank_seed(seed, 0))
    for x in batches(seed):
        loss = model.step(x, "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return model.state_dict()


def ensemble(seeds, cls=BetaVAE, betas=None, clip=None, poison=None, vectorize="auto"):
    betas = betas or [4.0] * len(seeds)
    models = [tiny(s, cls, b) for s, b in zip(seeds, betas, strict=True)]
    for m in models:
        m.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-3)
    engine = StackedEnsemble(
        models, seeds, torch.device("cpu"), vectorize=vectorize, gradient_clip_val=clip
    )
    data = torch.stack([batches(s) for s in seeds], dim=1)  # [STEPS, K, B, ...]
    for step, images in enumerate(data):
        if poison is not None and step == poison[1]:
            images = images.clone()
            images[poison[0]] = float("nan")
        engine.training_step(images, step)
    return engine


def close(a: dict, b: dict, atol: float) -> float:
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= atol, diff
    return diff


@pytest.mark.parametrize("cls", [BetaVAE, BetaTCVAE])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_member_is_the_single_run(cls, vectorize):
    seeds = [3, 7]
    engine = ensemble(seeds, cls, vectorize=vectorize)
    for k, seed in enumerate(seeds):
        close(engine.member_state_dict(k), single_run(seed, cls), atol=1e-5)
    # and the members differ from each other (the test could tell them apart)
    other = single_run(seeds[1], cls)
    assert max(float((engine.member_state_dict(0)[n] - other[n]).abs().max()) for n in other) > 1e-2


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_varied_beta_equals_runs_with_that_beta(vectorize):
    engine = ensemble([0, 1], betas=[1.0, 16.0], vectorize=vectorize)
    close(engine.member_state_dict(0), single_run(0, beta=1.0), atol=1e-5)
    close(engine.member_state_dict(1), single_run(1, beta=16.0), atol=1e-5)
    with pytest.raises(AssertionError):  # beta matters at this tolerance
        close(engine.member_state_dict(1), single_run(1, beta=1.0), atol=1e-5)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_gradient_clipping_is_per_member(vectorize):
    engine = ensemble([0, 1], clip=0.5, vectorize=vectorize)
    for k, seed in enumerate([0, 1]):
        close(engine.member_state_dict(k), single_run(seed, clip=0.5), atol=1e-5)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_a_nan_member_is_dropped_and_the_others_are_untouched(vectorize):
    clean = ensemble([0, 1, 2], vectorize=vectorize)
    # member 2's batch is NaN at step 1
    poisoned = ensemble([0, 1, 2], poison=(2, 1), vectorize=vectorize)
    assert poisoned.alive.tolist() == [True, True, False]
    assert poisoned.dropped[2]["step"] == 1
    for k in (0, 1):  # bit-identical to the same members without the bad one's NaN
        a, b = poisoned.member_state_dict(k), clean.member_state_dict(k)
        assert all(torch.equal(a[n], b[n]) for n in a)
    # and to an ensemble without the bad member at all (within float tolerance: K changes the
    # vectorised kernels' shapes, not the arithmetic)
    without = ensemble([0, 1], vectorize=vectorize)
    for k in (0, 1):
        close(poisoned.member_state_dict(k), without.member_state_dict(k), atol=1e-6)
    # the dropped member keeps its last finite weights: those after step 0
    after_one = ensemble_steps([2], 1)
    dropped = poisoned.member_state_dict(2)
    assert all(torch.isfinite(v).all() for v in dropped.values())
    close(dropped, after_one.member_state_dict(0), atol=1e-6)


def ensemble_steps(seeds, steps):
    models = [tiny(s) for s in seeds]
    for m in models:
        m.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-3)
    engine = StackedEnsemble(models, seeds, torch.device("cpu"))
    data = torch.stack([batches(s) for s in seeds], dim=1)
    for step in range(steps):
        engine.training_step(data[step], step)
    return engine
