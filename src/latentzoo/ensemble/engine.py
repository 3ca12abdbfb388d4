"""K members of one model trained as one: parameters stacked [K, ...], one vectorised step.

The members' weights live as stacked leaves (``torch.func.stack_module_state``); a step runs the
model's own ``step`` (or FactorVAE's ``vae_terms`` / ``discriminator_terms``) on each member's
batch through ``functional_call`` under ``vmap`` over the member dimension, so the loss code is
the model's, unchanged. Member losses are independent, so the gradient of their sum is each
member's own gradient, and the optimizer (Adam, elementwise) on [K, ...] tensors keeps per-member
moments. What is *not* elementwise is made per member here: gradient-norm clipping (one norm per
member, as Lightning's ``clip_grad_norm_`` over that member's parameters) and the NaN guard (a
member whose loss is non-finite is dropped: its weights and optimizer state stay at their last
finite values, the others go on untouched).

The model's lr scheduler runs on the stacked optimizer (the lr is shared, as every single run
follows the same schedule) and is stepped at Lightning's cadence (:meth:`step_schedulers`).
Between training steps, validation and callbacks draw from each member's stream as the single
run's draw from its global RNG, and the streams are put back before the next step
(:meth:`side_streams`, as ``TrainingRandomness`` does).

Models whose step branches in Python on a random draw (LieVAE's ``eg_flip=per_batch``) cannot be
vmapped; they run member by member on the stacked weights (``vectorize=loop``), still with one
optimizer step for all.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.optim.lr_scheduler import LRScheduler

from latentzoo.ensemble.noise import MemberGenerators, MemberNoise
from latentzoo.utils.errors import LatentzooError


class _Call(nn.Module):
    """Wraps the template model so that ``functional_call`` can run any of its methods."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.fn: Callable[..., Any] | None = None

    def forward(self, *args: Any) -> Any:
        assert self.fn is not None
        return self.fn(self.model, *args)


class _StepClock:
    """Stands in for ``model.trainer`` inside the template (LieVAE's capacity reads
    ``global_step``)."""

    def __init__(self) -> None:
        self.global_step = 0


_CPU = torch.device("cpu")


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    return torch.cuda.default_generators[device.index or 0]


def varied_attributes(models: list[nn.Module]) -> dict[str, list[float]]:
    """The scalar hyper-parameters (loss weights: β, γ, capacity, ...) that differ between
    members; the vectorised step hands each member its own value."""
    varied = {}
    for name, first in models[0].hparams.items():
        values = [m.hparams[name] for m in models]
        if all(v == first for v in values):
            continue
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise LatentzooError(
                f"ensemble: members differ in model.{name} ({values}); only numbers (loss "
                "weights) may vary across members"
            )
        if not isinstance(getattr(models[0], name, None), int | float):
            raise LatentzooError(f"ensemble: model.{name} is not an attribute the step reads")
        varied[name] = [float(v) for v in values]
    return varied


def _loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return terms["loss"]


def _stack(*members: torch.Tensor) -> torch.Tensor:
    return torch.stack(members)


def _detach(value: Any) -> Any:
    return value.detach() if torch.is_tensor(value) else value


def _view(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


class StackedEnsemble:
    """The members' weights, optimizers and noise streams, and the vectorised training step."""

    def __init__(
        self,
        models: list[nn.Module],
        seeds: list[int],
        device: torch.device,
        vectorize: str = "auto",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        self.kind = type(models[0]).__name__
        self.num = len(models)
        self.device = device
        self.models = models  # the unstacked members: configs, hparams, state_dict layout
        self.template = copy.deepcopy(models[0]).to(device)
        self.clock = _StepClock()
        self.template._trainer = self.clock  # type: ignore[assignment]
        self.caller = _Call(self.template)
        params, buffers = stack_module_state([m.to(device) for m in models])
        self.params: dict[str, torch.Tensor] = params
        self.buffers: dict[str, torch.Tensor] = buffers
        for model in models:  # the stacks hold the weights now; keep the members small on CPU
            model.to("cpu")
        self.generators = [MemberGenerators(seed) for seed in seeds]
        self.seeds = list(seeds)
        self._side_depth = 0  # open side_streams blocks
        self.alive = torch.ones(self.num, dtype=torch.bool)
        self.dropped: dict[int, dict[str, Any]] = {}  # member -> {step, loss}
        self._frozen: dict[int, dict[str, Any]] = {}  # member -> its last finite params/state
        self.clip_val = gradient_clip_val
        self.clip_algorithm = gradient_clip_algorithm
        self.is_factor_vae = hasattr(models[0], "discriminator_terms")
        if self.is_factor_vae and gradient_clip_val:
            raise LatentzooError(
                "FactorVAE optimises manually: Lightning refuses trainer.gradient_clip_val for it, "
                "and so does the ensemble; set trainer.gradient_clip_val=null"
            )
        self.varied = varied_attributes(models)
        self._varied_stacks = {
            name: torch.tensor(values, dtype=torch.float32, device=device)
            for name, values in self.varied.items()
        }
        self.vectorize = self._choose_vectorize(vectorize)
        self.optimizers = self._build_optimizers()
        self.scheduler_interval = getattr(self.template, "scheduler_interval", "step")
        self.schedulers = self._build_schedulers()

    # --- set-up -------------------------------------------------------------------------------
    def _choose_vectorize(self, vectorize: str) -> str:
        if vectorize not in ("auto", "vmap", "loop"):
            raise LatentzooError(f"ensemble.vectorize must be auto, vmap or loop, not {vectorize}")
        branches = (
            getattr(self.template, "eg_flip", None) == "per_batch"
            and getattr(self.template, "forward_eg_prob", 0) > 0
        )
        if vectorize == "vmap" and branches:
            raise LatentzooError(
                "ensemble.vectorize=vmap: LieVAE with eg_flip=per_batch branches on a random draw "
                "per member; use ensemble.vectorize=auto (loop) or model.eg_flip=per_sample"
            )
        if vectorize == "auto":  # measured: benchmarks/results/ensemble_cpu.json
            # vmap turns the members' convolutions into grouped ones, which oneDNN runs about 2x
            # slower than K plain ones on CPU; on GPUs one launch for K members is the point
            return "loop" if branches or self.device.type == "cpu" else "vmap"
        return vectorize

    def _param_names(self, module: nn.Module, prefix: str) -> list[str]:
        return [f"{prefix}{name}" for name, _ in module.named_parameters()]

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        model = self.template
        if self.is_factor_vae:
            vae = self._param_names(model.encoder, "encoder.") + self._param_names(
                model.decoder, "decoder."
            )
            disc = self._param_names(model.discriminator, "discriminator.")
            self.groups = [vae, disc]
            return [
                model.optimizer_factory(params=[self.params[n] for n in vae]),
                model.discriminator_optimizer_factory(params=[self.params[n] for n in disc]),
            ]
        names = [name for name, _ in model.named_parameters()]
        self.groups = [names]
        return [model.optimizer_factory(params=[self.params[n] for n in names])]

    def _build_schedulers(self) -> list[LRScheduler]:
        """``model.scheduler`` on the (first) stacked optimizer, where the model's
        ``configure_optimizers`` puts it in the single run. The members share that optimizer's
        lr, and the lr of every single run follows the same schedule, so one scheduler stepped
        at the single run's cadence (:meth:`step_schedulers`) gives every member its run's lr."""
        factory = getattr(self.template, "scheduler_factory", None)
        if factory is None:
            return []
        if self.scheduler_interval not in ("step", "epoch"):
            raise LatentzooError(
                f"model.scheduler_interval must be step or epoch, not {self.scheduler_interval}"
            )
        scheduler = factory(optimizer=self.optimizers[0])
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise LatentzooError(
                "ensemble: ReduceLROnPlateau follows a monitored metric, which differs per member "
                "while the members share one lr; use a fixed schedule or train single runs"
            )
        return [scheduler]

    def step_schedulers(self, epoch_ended: bool) -> None:
        """After a training step, as Lightning does: ``interval=step`` schedulers every step,
        ``interval=epoch`` ones on the last batch of an epoch (FactorVAE steps its own the same
        way in ``training_step``)."""
        if self.scheduler_interval == "step" or epoch_ended:
            for scheduler in self.schedulers:
                scheduler.step()

    # --- the functional calls -----------------------------------------------------------------
    def _run(self, fn: Callable[..., Any], *batched: torch.Tensor) -> Any:
        """``fn(model, *member_args)`` for every member; outputs stacked [K, ...]."""
        if self.vectorize == "vmap":
            self.caller.fn = fn
            prefixed = {f"model.{k}": v for k, v in self.params.items()}
            prefixed_buffers = {f"model.{k}": v for k, v in self.buffers.items()}

            def one(p: dict, b: dict, v: dict, *args: torch.Tensor) -> Any:
                with self._member_values(v):
                    return functional_call(self.caller, (p, b), args)

            with MemberNoise(self.generators):
                return vmap(one, randomness="same")(
                    prefixed, prefixed_buffers, self._varied_stacks, *batched
                )
        # member by member (evaluation; training loops in _loop_with_grads)
        outputs = [
            self._call_member(k, fn, {name: t[k] for name, t in self.params.items()}, batched)
            for k in range(self.num)
        ]
        return torch.utils._pytree.tree_map(_stack, *outputs)

    def _call_member(
        self, k: int, fn: Callable[..., Any], params: dict[str, torch.Tensor], batched: tuple
    ) -> Any:
        """``fn(model, *member_args)`` for member k alone, with its ``params``, buffers, loss
        weights and noise stream."""
        self.caller.fn = fn
        p = {f"model.{name}": t for name, t in params.items()}
        b = {f"model.{name}": t[k] for name, t in self.buffers.items()}
        values = {name: vals[k] for name, vals in self.varied.items()}
        with MemberNoise(self.generators, member=k), self._member_values(values):
            return functional_call(self.caller, (p, b), tuple(a[k] for a in batched))

    @contextlib.contextmanager
    def _member_values(self, values: dict[str, Any]) -> Iterator[None]:
        """The template reads this member's loss weights (a batched scalar under vmap)."""
        saved = {name: getattr(self.template, name) for name in values}
        for name, value in values.items():
            object.__setattr__(self.template, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                object.__setattr__(self.template, name, value)

    # --- one training step --------------------------------------------------------------------
    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step of every member on ``images`` [K, B, ...]; the terms [K]."""
        self.clock.global_step = step
        self.template.train()
        # the noise streams before this step: a member dropped in it keeps its own (its
        # last.ckpt then resumes at this step, as its single run's would)
        self._noise_before_step = [g.state_dict() for g in self.generators]
        if self.is_factor_vae:
            return self._factor_vae_step(images, step)
        return self._train_group(0, lambda model, x: model.step(x, "train"), _loss, step, images)

    def _factor_vae_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        # FactorVAE.training_step, member-wise: VAE step, then the discriminator on the latents
        # of the same forward pass (and, for discriminator_batch=split, the updated encoder)
        def vae(model: nn.Module, x: torch.Tensor) -> Any:
            x_vae, x_other = model.split_batch(x)
            terms, z = model.vae_terms(x_vae)
            return terms, z

        terms, z = self._train_group(0, vae, lambda out: out[0]["loss"], step, images)

        def disc(model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> Any:
            _, x_other = model.split_batch(x)
            return model.discriminator_terms(*model.discriminator_inputs(z, x_other))

        d_loss = lambda out: out["d_loss"]  # noqa: E731
        d_terms = self._train_group(1, disc, d_loss, step, images, z, guard=False)
        return {**terms, **d_terms}

    def _train_group(
        self,
        group: int,
        fn: Callable[..., Any],
        loss_of: Callable[[Any], torch.Tensor],
        step: int,
        *batched: torch.Tensor,
        guard: bool = True,
    ) -> Any:
        """``fn(model, *member_args)`` for every member, then one optimizer step of parameter
        group ``group`` on each member's ``loss_of(output)``; the outputs, stacked and detached.

        Members share no arithmetic (vmap slices, elementwise Adam, per-member clipping), so a
        dropped member's NaN stays in its own slice; its exported weights and optimizer state are
        the snapshot taken when it was dropped (``_frozen``)."""
        leaves = [self.params[n] for n in self.groups[group]]
        if self.vectorize == "vmap":
            outputs = self._run(fn, *batched)
            if guard:
                self._drop_nonfinite(loss_of(outputs), step)
            grads = torch.autograd.grad(loss_of(outputs).sum(), leaves, allow_unused=True)
        else:
            outputs, grads = self._loop_with_grads(group, fn, loss_of, *batched)
            if guard:
                self._drop_nonfinite(loss_of(outputs), step)
        for leaf, grad in zip(leaves, grads, strict=True):
            leaf.grad = grad
        self._clip([leaf for leaf in leaves if leaf.grad is not None])
        with torch.no_grad():
            self.optimizers[group].step()
        self.optimizers[group].zero_grad(set_to_none=True)
        return torch.utils._pytree.tree_map(_detach, outputs)

    def _loop_with_grads(
        self,
        group: int,
        fn: Callable[..., Any],
        loss_of: Callable[[Any], torch.Tensor],
        *batched: torch.Tensor,
    ) -> tuple[Any, list[torch.Tensor | None]]:
        """Member by member: forward, then that member's backward at once (its activations are
        freed before the next member's forward: one member's working set, as a single run's);
        the outputs stacked [K, ...] and the gradients of group ``group``'s stacks."""
        names = self.groups[group]
        trained = set(names)
        outputs, member_grads = [], []
        for k in range(self.num):
            p = {}
            for name, stack in self.params.items():
                piece = stack[k].detach()
                p[name] = piece.requires_grad_() if name in trained else piece
            out = self._call_member(k, fn, p, batched)
            leaves = [p[name] for name in names]
            member_grads.append(torch.autograd.grad(loss_of(out), leaves, allow_unused=True))
            outputs.append(torch.utils._pytree.tree_map(_detach, out))
        grads: list[torch.Tensor | None] = []
        for i, name in enumerate(names):
            per_member = [g[i] for g in member_grads]
            if all(g is None for g in per_member):
                grads.append(None)
                continue
            zeros = torch.zeros_like(self.params[name][0])
            grads.append(torch.stack([zeros if g is None else g for g in per_member]))
        return torch.utils._pytree.tree_map(_stack, *outputs), grads

    def _clip(self, leaves: list[torch.Tensor]) -> None:
        """Lightning's gradient clipping, per member: by value (elementwise, so per member
        already) or by the 2-norm of that member's gradients over all its parameters."""
        if not self.clip_val or not leaves:
            return
        if self.clip_algorithm == "value":
            for leaf in leaves:
                leaf.grad.clamp_(-self.clip_val, self.clip_val)
            return
        norms = torch.stack(
            [torch.linalg.vector_norm(leaf.grad.flatten(1), 2, dim=1) for leaf in leaves]
        )
        total = torch.linalg.vector_norm(norms, 2, dim=0)  # [K]
        coef = torch.clamp(self.clip_val / (total + 1e-6), max=1.0)
        for leaf in leaves:
            leaf.grad.mul_(_view(coef, leaf.grad))

    # --- the NaN guard ------------------------------------------------------------------------
    def _drop_nonfinite(self, losses: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(losses.detach()).cpu()
        newly = self.alive & ~finite
        if not bool(newly.any()):
            return
        for k in newly.nonzero().flatten().tolist():
            self.dropped[k] = {"step": step, "loss": float(losses[k].detach())}
            self._frozen[k] = {
                "params": {n: t[k].detach().clone() for n, t in self.params.items()},
                "optim": [self._member_optimizer_state(i, k) for i in range(len(self.optimizers))],
                "noise": self._noise_before_step[k],
                "schedulers": [copy.deepcopy(s.state_dict()) for s in self.schedulers],
            }
        self.alive &= finite

    # --- per-member views ---------------------------------------------------------------------
    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's ``state_dict``, keyed and laid out as its single run's."""
        frozen = self._frozen.get(k)
        model = self.models[k]
        source = {
            **{n: t[k] for n, t in self.params.items()},
            **{n: t[k] for n, t in self.buffers.items()},
        }
        if frozen is not None:
            source.update(frozen["params"])
        return {name: source[name].detach().cpu().clone() for name in model.state_dict()}

    def _member_optimizer_state(self, group: int, k: int) -> dict[str, Any]:
        state = self.optimizers[group].state_dict()
        member_state = {}
        for index, entry in state["state"].items():
            member_state[index] = {
                key: value[k].detach().cpu().clone()
                if torch.is_tensor(value) and value.dim() > 0
                else (value.detach().cpu().clone() if torch.is_tensor(value) else value)
                for key, value in entry.items()
            }
        return {"state": member_state, "param_groups": copy.deepcopy(state["param_groups"])}

    def member_optimizer_states(self, k: int) -> list[dict[str, Any]]:
        frozen = self._frozen.get(k)
        if frozen is not None:
            return frozen["optim"]
        return [self._member_optimizer_state(i, k) for i in range(len(self.optimizers))]

    def member_scheduler_states(self, k: int) -> list[dict[str, Any]]:
        """Member k's ``lr_schedulers`` entry of ``last.ckpt`` (the single-run layout: one
        ``state_dict`` per scheduler); a dropped member's as it was when it stopped."""
        frozen = self._frozen.get(k)
        if frozen is not None:
            return copy.deepcopy(frozen.get("schedulers", []))
        return [copy.deepcopy(s.state_dict()) for s in self.schedulers]

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, stage: str) -> dict[str, torch.Tensor]:
        """The model's ``step(x, stage)`` terms per member [K] (eval mode, no update). Its draws
        never shift training: outside :meth:`side_streams` the streams are restored at once."""
        with contextlib.ExitStack() as stack:
            if not self._side_depth:
                stack.enter_context(self.side_streams())
            self.template.eval()
            try:
                return self._run(lambda model, x: model.step(x, stage), images)
            finally:
                self.template.train()

    @contextlib.contextmanager
    def side_streams(self) -> Iterator[None]:
        """Between two training steps (validation, callbacks): draws inside continue each
        member's training stream, one after the other, as a single run's continue its global
        RNG; on leaving the outermost block the streams are put back, as ``TrainingRandomness``
        puts the single run's back at the next training batch."""
        outermost = self._side_depth == 0
        streams = [g.state_dict() for g in self.generators] if outermost else None
        self._side_depth += 1
        try:
            yield
        finally:
            self._side_depth -= 1
            if streams is not None:
                for generator, state in zip(self.generators, streams, strict=True):
                    generator.load_state_dict(state)

    @contextlib.contextmanager
    def member_as_global_rng(self, k: int) -> Iterator[None]:
        """Member k's stream as torch's global RNG (CPU and the run's accelerator), for a
        callback run on member k's module: its draws continue that stream, as they continue the
        single run's; the global RNG is put back afterwards."""
        generators = self.generators[k]
        devices = [_CPU] + ([self.device] if self.device.type != "cpu" else [])
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            for device in devices:
                state = generators.for_device(device).get_state()
                _default_generator(device).set_state(state)
            try:
                yield
            finally:
                for device in devices:
                    generators.for_device(device).set_state(_default_generator(device).get_state())

    def draw_loader_seed(self) -> None:
        """What creating a ``DataLoader`` iterator takes from the global CPU stream (its
        ``_base_seed``), taken from each member's CPU stream."""
        for generator in self.generators:
            torch.empty((), dtype=torch.int64).random_(generator=generator.for_device(_CPU))

    # --- the ensemble checkpoint: one entry per member, so that any split of the members over
    # processes (trainer=ddp) saves and resumes the same file ------------------------------------
    def member_state(self, k: int) -> dict[str, Any]:
        """Everything member k's training needs to go on: its live weights and optimizer state
        (a dropped member's frozen copy too), its noise streams, alive/dropped."""
        return {
            "params": {n: t[k].detach().cpu().clone() for n, t in self.params.items()},
            "buffers": {n: t[k].detach().cpu().clone() for n, t in self.buffers.items()},
            "optimizers": [self._member_optimizer_state(i, k) for i in range(len(self.optimizers))],
            "schedulers": [s.state_dict() for s in self.schedulers],  # one lr for all members
            "generators": self.generators[k].state_dict(),
            "alive": bool(self.alive[k]),
            "dropped": self.dropped.get(k),
            "frozen": self._frozen.get(k),
        }

    def load_member_states(self, states: list[dict[str, Any]]) -> None:
        """Restore every member from :meth:`member_state` entries (in member order)."""
        if len(states) != self.num:
            raise LatentzooError(f"ensemble: {len(states)} saved members for {self.num}")
        with torch.no_grad():
            for name, stack in self.params.items():
                stack.copy_(torch.stack([s["params"][name] for s in states]))
            for name, stack in self.buffers.items():
                stack.copy_(torch.stack([s["buffers"][name] for s in states]))
        for i, opt in enumerate(self.optimizers):
            saved = [s["optimizers"][i] for s in states]
            stacked = {}
            for index, first in saved[0]["state"].items():
                stacked[index] = {
                    key: torch.stack([m["state"][index][key] for m in saved]).to(self.device)
                    if torch.is_tensor(value) and value.dim() > 0
                    else value  # Adam's step count: one for all members (they step together)
                    for key, value in first.items()
                }
            opt.load_state_dict({"state": stacked, "param_groups": saved[0]["param_groups"]})
        schedulers = states[0].get("schedulers", [])
        if len(schedulers) != len(self.schedulers):
            raise LatentzooError(
                f"the ensemble checkpoint holds {len(schedulers)} lr scheduler(s) but this run "
                f"has {len(self.schedulers)}: resume with the same model.scheduler"
            )
        for scheduler, saved_scheduler in zip(self.schedulers, schedulers, strict=True):
            scheduler.load_state_dict(saved_scheduler)
        for generator, state in zip(self.generators, states, strict=True):
            generator.load_state_dict(state["generators"])
        self.alive = torch.tensor([s["alive"] for s in states], dtype=torch.bool)
        self.dropped = {k: s["dropped"] for k, s in enumerate(states) if s["dropped"]}
        self._frozen = {k: s["frozen"] for k, s in enumerate(states) if s["frozen"]}
