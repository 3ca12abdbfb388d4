"""``model.compile`` (models.base): the compiled networks give the eager loss and gradients on a
fixed batch, keep the eager parameter names (checkpoints load either way), and train under
manual optimisation, resume and ``trainer=ddp_sim``. Fused Adam/AdamW is chosen on CUDA only.

Tolerance of compiled vs eager: inductor fuses and reorders float32 elementwise ops and picks
its own conv/matmul kernels, so values agree to rounding, not bitwise: loss to rtol 1e-5,
gradients to rtol 1e-4 / atol 1e-6 (a wrong op, e.g. a sign, differs by O(1)).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from latentzoo.models import BetaVAE, FactorVAE
from latentzoo.models.base import compile_mode
from latentzoo.utils.errors import LatentzooError
from tests.conftest import compose_config

TINY_NETS = [
    "model.latent_dim=4",
    "model.encoder.channels=[8,8,8,8]",
    "model.encoder.hidden=32",
    "model.decoder.channels=[8,8,8,8]",
    "model.decoder.hidden=32",
]


def _model(name: str, compile_value: str | bool = False) -> torch.nn.Module:
    cfg = compose_config("train", [f"model={name}", *TINY_NETS, f"model.compile={compile_value}"])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same posterior noise ε
    if isinstance(model, FactorVAE):
        terms, z = model.vae_terms(x)
        loss = terms["loss"] + model.discriminator_terms(z.detach(), z.detach().flip(0))["d_loss"]
    else:
        loss = model.step((x,), "train")["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_compile_values() -> None:
    assert compile_mode(False) is None and compile_mode("false") is None
    assert compile_mode(True) == "default"
    assert compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(LatentzooError, match="model.compile='fast'"):
        compile_mode("fast")
    with pytest.raises(Exception, match="is not an option") as error:
        _model("beta_vae", "fast")  # refused when the model is built (Hydra wraps the error)
    assert isinstance(error.value.__cause__, LatentzooError)


def test_compile_key_keeps_the_models_own_hyperparameters() -> None:
    eager, compiled = _model("factor_vae"), _model("factor_vae", "default")
    assert eager.compile_mode is None and compiled.compile_mode == "default"
    assert dict(compiled.hparams) == dict(eager.hparams)  # gamma, ... of FactorVAE itself
    assert "compile" not in compiled.hparams


@pytest.mark.slow  # inductor compiles C++ kernels: tens of seconds on a 2-core CPU
@pytest.mark.parametrize("name", ["beta_vae", "factor_vae"])
def test_compiled_step_equals_eager_loss_and_gradients(name: str) -> None:
    eager = _model(name)
    compiled = copy.deepcopy(eager)
    compiled.compile_mode = "default"
    compiled.configure_model()
    nets = compiled.compiled_modules()
    assert set(nets) >= {"encoder", "decoder"}
    assert all(net._compiled_call_impl is not None for net in nets.values())
    x = (torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    loss_e, grads_e = _loss_and_grads(eager, x)
    loss_c, grads_c = _loss_and_grads(compiled, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for key in grads_e:
        torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-4, atol=1e-6, msg=key)
    # the same parameter names: an eager model loads a compiled model's checkpoint and back
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    reloaded = _model(name)
    reloaded.load_state_dict(compiled.state_dict())


class _FakeCuda:
    type = "cuda"


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_is_fused_on_cuda_only_unless_the_config_says_otherwise(
    optimizer: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = BetaVAE(torch.nn.Linear(2, 2), torch.nn.Linear(1, 2), latent_dim=1)
    params = list(model.parameters())
    on_cpu = model.make_optimizer(functools.partial(optimizer, lr=1e-3), params)
    # torch builds fused Adam/AdamW for CPU tensors too, so the "CUDA" optimizers are real
    monkeypatch.setattr(type(model), "device", property(lambda self: _FakeCuda()))
    on_cuda = model.make_optimizer(functools.partial(optimizer, lr=1e-3), params)
    told = model.make_optimizer(functools.partial(optimizer, lr=1e-3, foreach=True), params)
    sgd = model.make_optimizer(functools.partial(torch.optim.SGD, lr=1e-3), params)
    assert not on_cpu.defaults["fused"]
    assert on_cuda.defaults["fused"] is True
    assert not told.defaults["fused"] and told.defaults["foreach"] is True
    assert "fused" not in sgd.defaults or not sgd.defaults["fused"]


RUN = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=6",
    "trainer.limit_train_batches=4",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "~callbacks.latent_traversal_grid",
    "~callbacks.reconstruction_grid",
    "extras.print_config=false",
    "test=false",
    "data.dataset.size=small",
    "data.val_size=16",
    "data.test_size=16",
    "data.batch_size=8",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,trainer",
    [("beta_vae", "cpu"), ("factor_vae", "cpu"), ("beta_vae", "ddp_sim")],
)
def test_compiled_training_resumes_and_matches_eager(name: str, trainer: str, tmp_path: Path):
    """6 steps compiled, and 3 + a resume from step 3's last.ckpt, end at the same weights,
    which also match the eager run to rounding (DDP: under trainer=ddp_sim)."""
    from tests.resume_harness import final_state, run_to_end

    common = [*RUN, f"model={name}", *TINY_NETS, f"trainer={trainer}"]
    if trainer == "ddp_sim":
        common.append("trainer.accelerator=cpu")
    compiled = [*common, "model.compile=default"]
    run_to_end(tmp_path / "eager", common)
    run_to_end(tmp_path / "compiled", compiled)
    run_to_end(tmp_path / "half", [*compiled, "trainer.max_steps=3"])
    run_to_end(tmp_path / "half", compiled, ckpt=tmp_path / "half" / "checkpoints" / "last.ckpt")
    eager, full, resumed = (final_state(tmp_path / d) for d in ("eager", "compiled", "half"))
    assert full["global_step"] == resumed["global_step"] == 6
    assert full["state_dict"].keys() == eager["state_dict"].keys()
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(value, eager["state_dict"][key], rtol=1e-3, atol=1e-5)
