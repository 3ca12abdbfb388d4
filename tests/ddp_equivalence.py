"""One optimizer step of a method on a fixed global batch, on 1 process or on 2 DDP processes
(each taking its half), with the model's randomness fixed; rank 0 saves the updated weights.

    python tests/ddp_equivalence.py <method> <devices> <out.pt>

Run by tests/test_ddp.py: the two results must agree, which holds only if DDP averages the
gradients of the two halves exactly once per optimizer (manual optimisation included).
Fixed randomness: the random draws the models use return constants (noise 0, uniforms 0.5), so
sample i sees the same "noise" whichever rank it lands on. BatchNorm layers are replaced by
identities, as per-device batch statistics differ from full-batch ones by design. Plain SGD: Adam
would hide a factor of 2 in the gradients. Float64, so that rounding stays far below the tolerance.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentzoo.utils.distributed import instantiate_datamodule  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

GLOBAL_BATCH = 8
SMALL_FACTORS = ["data.dataset.size=small", "data.val_size=32", "data.test_size=32"]
METHODS = {
    "beta_vae": SMALL_FACTORS,
    "factor_vae": ["model=factor_vae", *SMALL_FACTORS],
    "soft_intro_vae": [
        "experiment=soft_intro_vae_proc_cifar",
        "data.num_train=64",
        "data.val_size=16",
    ],
    "latent_flow": ["experiment=latent_flow_proc_dsprites", "data.k_sampling=per_batch"],
    "latent_fm": ["experiment=latent_fm_proc_blobs", "data.image_size=16", "model.ema_decay=0.5"],
    "kl_autoencoder": ["model=kl_autoencoder", "data=proc_blobs", "data.image_size=16"],
    "dlp": ["experiment=dlp_shapes_debug", "model.use_object_dec=false", "data.num_train=16"],
}


def fix_randomness() -> None:
    def size_of(size):
        return (
            size[0] if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size) else size
        )

    def strip(kwargs):
        kwargs.pop("generator", None)
        return kwargs

    torch.randn_like = lambda x, **kw: torch.zeros_like(x, **strip(kw))
    torch.rand_like = lambda x, **kw: torch.full_like(x, 0.5, **strip(kw))
    torch.randint_like = lambda x, low, high=None, **kw: torch.ones_like(x, **strip(kw))
    torch.randn = lambda *size, **kw: torch.zeros(*size_of(size), **strip(kw))
    torch.rand = lambda *size, **kw: torch.full(size_of(size), 0.5, **strip(kw))


def without_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)


def part(batch, rank: int, world: int):
    """This rank's contiguous share of every tensor in the batch."""
    if isinstance(batch, torch.Tensor):
        share = batch.shape[0] // world
        return batch[rank * share : (rank + 1) * share]
    if isinstance(batch, dict):
        return {key: part(value, rank, world) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(part(value, rank, world) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(part(value, rank, world) for value in batch)
    return batch


def main(method: str, devices: int, out: Path) -> None:
    batch_size = [f"data.batch_size={GLOBAL_BATCH}", "data.global_batch_size=null"]
    cfg = compose_config("train", [*METHODS[method], *batch_size])
    torch.manual_seed(0)
    datamodule = instantiate_datamodule(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model = hydra.utils.instantiate(cfg.model)
    without_batchnorm(model)
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    for factory in ("optimizer_factory", "discriminator_optimizer_factory"):
        if hasattr(model, factory):
            setattr(model, factory, sgd)
    if hasattr(model, "decoder_optimizer_factory"):
        model.decoder_optimizer_factory = sgd
    model.scheduler_factory = None
    fix_randomness()

    strategy = "auto"
    if devices > 1:
        unused = getattr(model, "ddp_find_unused_parameters", False)
        strategy = "ddp_find_unused_parameters_true" if unused else "ddp"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        precision="64-true",  # float64: rounding far below the effects compared
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    loader = DataLoader([part(batch, rank, devices)], batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    if trainer.is_global_zero:
        after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"before": before, "after": after}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
