"""Per-checkpoint save cost: latentzoo's AtomicCheckpointIO against Lightning's TorchCheckpointIO.

The checkpoint is the one the default run (``python train.py``: beta_vae on proc_dsprites) writes
as ``last.ckpt``: Lightning's ``dump_checkpoint`` after a few real optimizer steps (weights, Adam
moments, loop and callback state, the resolved config). Each IO saves it ``--repeats`` times,
alternately, into ``--dir`` (default: a temp folder under the run's log dir, i.e. the disk that
real checkpoints go to); the median wall time per save is reported with the file size.

AtomicCheckpointIO = the non-finite check over ``state_dict``/``ema`` + ``torch.save`` into a temp
file in the same folder + flush + fsync + ``os.replace`` + folder fsync. TorchCheckpointIO =
``torch.save`` into memory + fsspec transaction (temp file, then move). The fsync is most of the
difference on a real disk: it is what makes the file survive a power cut.

Usage::

    python benchmarks/bench_checkpoint_save.py [--repeats 20] [--steps 3] [--dir DIR]
        [--out benchmarks/results/checkpoint_save_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import open_dict

from latentzoo.paths import config_dir
from latentzoo.utils.atomic import TEMP_SUFFIX
from latentzoo.utils.checkpoint import ConfigInCheckpoint
from latentzoo.utils.checkpoint_io import AtomicCheckpointIO, nonfinite_entries

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "checkpoint_save_cpu.json"


def default_run_checkpoint(steps: int, out_dir: Path) -> dict:
    """The default run's checkpoint after ``steps`` optimizer steps on the CPU."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.accelerator=cpu"], return_hydra_config=True)
    with open_dict(cfg):  # what a CLI run's Hydra fills in, so the saved config resolves
        cfg.paths.output_dir = cfg.paths.log_dir = str(out_dir)
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = cfg.hydra.job.id = 0
    HydraConfig().set_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ConfigInCheckpoint(cfg)],
    )
    trainer.fit(model, datamodule=datamodule)
    return trainer._checkpoint_connector.dump_checkpoint()


def time_saves(io, checkpoint: dict, path: Path) -> float:
    start = time.perf_counter()
    io.save_checkpoint(checkpoint, path)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=ROOT / "logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    checkpoint = default_run_checkpoint(args.steps, folder / "run")
    ios = {"atomic": AtomicCheckpointIO(), "lightning": TorchCheckpointIO()}
    times: dict[str, list[float]] = {name: [] for name in ios}
    sizes: dict[str, float] = {}
    try:
        for name, io in ios.items():  # warm-up
            time_saves(io, checkpoint, folder / f"{name}.ckpt")
        for _ in range(args.repeats):
            for name, io in ios.items():
                times[name].append(time_saves(io, checkpoint, folder / f"{name}.ckpt"))
        for name in ios:
            sizes[name] = (folder / f"{name}.ckpt").stat().st_size / 2**20
            loaded = torch.load(folder / f"{name}.ckpt", weights_only=False)
            assert loaded["global_step"] == checkpoint["global_step"]
        check = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            nonfinite_entries(checkpoint)
            check.append((time.perf_counter() - start) * 1e3)
        assert not list(folder.glob(f".*{TEMP_SUFFIX}")), "temp files left behind"
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "benchmark": "checkpoint_save",
        "command": " ".join(["python", *sys.argv]),
        "checkpoint": {
            "run": "python train.py (beta_vae on proc_dsprites), last.ckpt",
            "global_step": checkpoint["global_step"],
            "parameters": sum(t.numel() for t in checkpoint["state_dict"].values()),
            "size_mb": {name: round(size, 3) for name, size in sizes.items()},
        },
        "repeats": args.repeats,
        "save_ms_median": {name: round(value, 2) for name, value in median.items()},
        "save_ms_all": {name: [round(v, 2) for v in values] for name, values in times.items()},
        "nonfinite_check_ms_median": round(statistics.median(check), 3),
        "atomic_minus_lightning_ms": round(median["atomic"] - median["lightning"], 2),
        "machine": {
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg": list(os.getloadavg()),
            "save_dir": str(args.dir),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("save_ms_median", "checkpoint")}, indent=2))


if __name__ == "__main__":
    main()
