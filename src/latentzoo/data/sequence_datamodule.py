"""DataModule of transformation sequences for latent_flow (``shared/specs/latent_flow.md`` §2, §7).

Batches are dicts ``{"frames": float32 (B, S+1, C, H, W) in [0, 1], "k": int64 (B,),
"factors": int64 (B, S+1, F)}`` from a
:class:`~latentzoo.data.datasets.sequence_datasets.SequenceDataset` source (3D Shapes,
Falcor3D, Isaac3D, proc_dsprites, MNIST, proc_digits).

Sampling. A batch sampler in the main process draws the transformation(s) k *and* the start
configurations of a batch together and hands the worker one array of sequence keys; the worker
only renders (one vectorised call per batch). So any ``num_workers`` gives the same, consistent
batches (the original wrote the next k into the dataset from the trainer, which only worked
without workers).

- ``k_sampling: per_batch`` [ORIGINAL, default]: one k for the whole batch (the weak variant
  needs it); ``per_sample``: k drawn independently per sequence.
- Training draws ``epoch_size`` sequences per epoch (default: the number of training starts),
  starts uniformly with replacement, seeded by ``(seed, epoch, rank)``. ``seed`` null (the
  configs' default) is the run seed, so a seed sweep feeds every run its own batches; what the
  sequences are made of (which procedural digits, the split of the starts) has its own fixed
  seeds in the source. Under DDP each rank
  draws its own ``ceil(batches / world_size)`` batches of the epoch (the sampler is a
  ``DistributedSampler`` subclass that Lightning leaves alone). The training loader is a
  :class:`~latentzoo.data.resumable.ResumableLoader`: its position (epoch, batches done) is saved
  in the checkpoint and a resumed run continues the epoch's draws where it stopped.
- Validation and test use fixed, k-grouped sets of sequences (``val_per_k`` / ``test_per_k``
  per transformation, ``eval_seq_len`` steps, drawn with ``eval_seed``, the same for every run),
  every batch holding one k. They start in disjoint pools of the source: validation never sees
  a test sequence (the source's ``val`` and ``eval`` splits). Image sets use the whole split
  when ``*_per_k`` is null (MNIST test: 12k per k).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from latentzoo.data.datasets.sequence_datasets import SequenceBatches, SequenceDataset
from latentzoo.data.resumable import (
    ResumableLoader,
    ResumableSampler,
    run_seed,
)

__all__ = ["EvalSequenceSampler", "SequenceDataModule", "TrainSequenceSampler"]

KSampling = Literal["per_batch", "per_sample"]


class TrainSequenceSampler(ResumableSampler):
    """Yields ``num_batches`` arrays of sequence keys per epoch (``ceil(num_batches / world)``
    per rank); k and starts drawn together from ``(seed, epoch, rank)``.

    The epoch counter advances on every pass (and ``set_epoch``, which Lightning calls, sets
    it), so epochs differ; ``resume`` (through the loader's ``load_state_dict``) makes a resumed
    run skip the batches of the epoch it had already drawn.
    """

    def __init__(
        self,
        source: SequenceDataset,
        steps: int,
        batch_size: int,
        num_batches: int,
        k_sampling: KSampling = "per_batch",
        seed: int = 0,
    ) -> None:
        if k_sampling not in ("per_batch", "per_sample"):
            raise ValueError(f"k_sampling must be 'per_batch' or 'per_sample', got {k_sampling!r}")
        self.source = source
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.num_batches = int(num_batches)
        self.k_sampling = k_sampling
        self.seed = int(seed)
        super().__init__(shuffle=True)

    def __len__(self) -> int:
        return -(-self.num_batches // self.rank_and_world()[1])

    def _batches(self, epoch: int, rank: int, world: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, rank])
        n_k, b = self.source.num_transforms, self.batch_size
        for _ in range(len(self)):
            if self.k_sampling == "per_batch":
                k = np.full(b, rng.integers(n_k), dtype=np.int64)
            else:
                k = rng.integers(0, n_k, size=b, dtype=np.int64)
            starts = self.source.sample_starts("train", k, self.steps, rng)
            yield self.source.keys_of(k, starts)


class EvalSequenceSampler(Sampler[np.ndarray]):
    """Fixed batches of fixed keys; a batch never mixes transformations (keys grouped by k)."""

    def __init__(self, source: SequenceDataset, keys: np.ndarray, batch_size: int) -> None:
        k, _ = source.split_keys(keys)
        self.batches: list[np.ndarray] = []
        for kk in range(source.num_transforms):
            group = keys[k == kk]
            self.batches += [group[i : i + batch_size] for i in range(0, group.size, batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)


def _passthrough(batch: Any) -> Any:
    return batch


class SequenceDataModule(L.LightningDataModule):
    """Transformation sequences for latent_flow (see the module docstring).

    Args:
        source: the sequence source (``FactorSequences``, ``MNISTSequences``, ...).
        image_shape: [C, H, W], checked against the source.
        seq_len: flow steps S of a training sequence (S + 1 frames).
        eval_seq_len: steps of validation/test sequences (default: ``seq_len``).
        num_transforms: K, checked against the source; in the config so that models can read
            it by interpolation (``${data.num_transforms}``).
        k_sampling: ``per_batch`` (one k per batch) or ``per_sample``.
        batch_size: sequences per batch.
        epoch_size: training sequences per epoch; null: the number of training starts.
        val_per_k, test_per_k: evaluation sequences per transformation; null: the whole split
            for image sets, 10,000 for factor sets (spec §9).
        seed: seed of the training draws; null: the run seed (``seed_everything``'s).
        eval_seed: seed of the fixed validation and test sets (not the run seed, so that every
            run of a sweep is evaluated on the same sequences).
        num_workers, pin_memory: DataLoader settings.
        prefetch: training batches rendered ahead in a background thread when
            ``num_workers=0`` (data.resumable; the same batches, in the same order).
    """

    def __init__(
        self,
        source: SequenceDataset,
        image_shape: Sequence[int],
        seq_len: int,
        eval_seq_len: int | None = None,
        num_transforms: int | None = None,
        k_sampling: KSampling = "per_batch",
        batch_size: int = 128,
        epoch_size: int | None = None,
        val_per_k: int | None = 256,
        test_per_k: int | None = None,
        seed: int | None = None,
        eval_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 2,
    ) -> None:
        super().__init__()
        if tuple(image_shape) != tuple(source.image_shape):
            raise ValueError(
                f"data.image_shape={list(image_shape)} does not match the source's images "
                f"{list(source.image_shape)}"
            )
        if num_transforms is not None and int(num_transforms) != source.num_transforms:
            raise ValueError(
                f"data.num_transforms={num_transforms} does not match the source's "
                f"{source.num_transforms} transformations {list(source.transform_names)}"
            )
        if k_sampling not in ("per_batch", "per_sample"):
            raise ValueError(f"k_sampling must be 'per_batch' or 'per_sample', got {k_sampling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source = source
        self.image_shape = tuple(int(s) for s in image_shape)
        self.seq_len = int(seq_len)
        self.eval_seq_len = int(eval_seq_len) if eval_seq_len is not None else self.seq_len
        source.check_steps(self.seq_len)
        source.check_steps(self.eval_seq_len)
        self.k_sampling = k_sampling
        self.batch_size = int(batch_size)
        self.epoch_size = epoch_size
        self.val_per_k = val_per_k
        self.test_per_k = test_per_k
        self.seed = None if seed is None else int(seed)
        self.eval_seed = int(eval_seed)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch = int(prefetch)
        self._eval_keys: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ what models read
    @property
    def num_transforms(self) -> int:
        """K, the number of transformations."""
        return self.source.num_transforms

    @property
    def transform_names(self) -> list[str]:
        return list(self.source.transform_names)

    @property
    def factor_names(self) -> list[str]:
        """Names of the columns of ``batch["factors"]``."""
        return list(self.source.factor_names)

    @property
    def transform_factors(self) -> list[int]:
        """Column of ``batch["factors"]`` that transformation k changes."""
        return list(self.source.transform_factors)

    @property
    def dataset(self) -> Any:
        """The underlying ground-truth FactorDataset (factor sets only), for factor metrics."""
        return getattr(self.source, "dataset", None)

    # ------------------------------------------------------------------ loaders
    def _num_train_batches(self) -> int:
        n = self.epoch_size if self.epoch_size is not None else self.source.num_train
        return max(1, int(n) // self.batch_size)

    @property
    def sampling_seed(self) -> int:
        """Seed of the training draws: ``seed``, or the run seed when it is null."""
        return run_seed() if self.seed is None else self.seed

    def eval_keys(self, stage: Literal["val", "test"]) -> np.ndarray:
        """The fixed evaluation sequence keys of ``stage`` (grouped by k), from the source's
        validation or test pool."""
        if stage not in self._eval_keys:
            per_k, split = (self.val_per_k, "val") if stage == "val" else (self.test_per_k, "eval")
            seed = self.eval_seed if stage == "val" else self.eval_seed + 1
            self._eval_keys[stage] = self.source.eval_keys(self.eval_seq_len, per_k, seed, split)
        return self._eval_keys[stage]

    def _loader(self, sampler: Sampler, steps: int) -> DataLoader:
        resumable = isinstance(sampler, ResumableSampler)
        return (ResumableLoader if resumable else DataLoader)(
            SequenceBatches(self.source, steps),
            sampler=sampler,
            batch_size=None,  # each sampler element is already a whole batch of keys
            collate_fn=_passthrough,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **({"prefetch": self.prefetch} if resumable else {}),
        )

    def train_dataloader(self) -> DataLoader:
        sampler = TrainSequenceSampler(
            self.source,
            self.seq_len,
            self.batch_size,
            self._num_train_batches(),
            self.k_sampling,
            self.sampling_seed,
        )
        return self._loader(sampler, self.seq_len)

    def val_dataloader(self) -> DataLoader:
        keys = self.eval_keys("val")
        return self._loader(
            EvalSequenceSampler(self.source, keys, self.batch_size), self.eval_seq_len
        )

    def test_dataloader(self) -> DataLoader:
        keys = self.eval_keys("test")
        return self._loader(
            EvalSequenceSampler(self.source, keys, self.batch_size), self.eval_seq_len
        )

    def sequences(
        self, k: int, n: int, steps: int | None = None, seed: int = 0, split: str = "eval"
    ) -> dict[str, torch.Tensor]:
        """``n`` sequences of transformation ``k`` (one batch dict), drawn with ``seed``.

        For metrics and image callbacks; ``steps`` defaults to ``eval_seq_len``.
        """
        steps = self.eval_seq_len if steps is None else int(steps)
        self.source.check_steps(steps)
        ks = np.full(int(n), int(k), dtype=np.int64)
        starts = self.source.sample_starts(split, ks, steps, np.random.default_rng(seed))  # type: ignore[arg-type]
        return self.source.render(ks, starts, steps)
