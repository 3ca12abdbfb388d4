"""``python eval.py metrics=[fid,nfe] trainer=ddp_sim test_loop=false``: two CPU ranks start,
shard the sampling, and report what one process reports (the batches do not depend on the
world size); only rank 0 writes metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from latentzoo.eval import evaluate
from latentzoo.utils.checkpoint import CHECKPOINT_KEY
from tests.conftest import compose_config, run_cli
from tests.metrics.test_generative import TinyGenerator


@pytest.mark.slow
def test_eval_fid_under_ddp_sim_equals_one_process(tmp_path: Path) -> None:
    data = compose_config("train", ["data=proc_blobs", "data.image_size=16"], tmp_path).data
    data = OmegaConf.to_container(data, resolve=True) | {"num_train": 64, "num_val": 8}
    model = TinyGenerator()
    with torch.no_grad():
        model.bias.fill_(0.1)
    checkpoint = {
        "state_dict": model.state_dict(),
        "global_step": 1,
        CHECKPOINT_KEY: {
            "config": {
                "model": {"_target_": "tests.metrics.test_generative.TinyGenerator"},
                "data": data,
            }
        },
    }
    torch.save(checkpoint, tmp_path / "tiny.ckpt")
    common = [
        f"ckpt_path={tmp_path / 'tiny.ckpt'}",
        "trust_checkpoint=true",  # its model class is a test module's
        "metrics=[fid,nfe]",
        "test_loop=false",
        "num_samples=70",
        "steps=3",
        "metrics.fid.batch_size=20",
        "metrics.fid.extractor=tiny",
        "metrics.fid.kid_subset_size=32",
        "metrics.fid.kid_subsets=5",
        "metrics.nfe.num_samples=6",
        f"paths.data_dir={tmp_path}",
        "extras.print_config=false",
    ]
    single, _ = evaluate(
        compose_config("eval", [*common, "trainer.accelerator=cpu"], tmp_path / "one")
    )
    run = run_cli(
        "eval.py",
        *common,
        "trainer=ddp_sim",
        "save_samples=npz",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["metrics"]
    for key in ("fid/fid", "fid/kid_mean", "fid/kid_std", "fid/nfe", "nfe/nfe"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-6), key
    assert single["fid/fid"] > 0.01 and single["nfe/nfe"] == 3
    # sharded: batches 0, 2 (40 images) on rank 0 and 1, 3 (30) on rank 1
    shards = [np.load(tmp_path / "ddp" / f"samples_rank{r}of2.npz")["arr_0"] for r in (0, 1)]
    assert [len(s) for s in shards] == [40, 30]
