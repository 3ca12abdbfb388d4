"""``latentzoo-fid``: the same images give the same FID / KID / k-NN numbers as eval.py's
``metrics=fid`` (tiny extractor), whichever form the sets take (folders, .npz, saved stats)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentzoo import fid as fid_cli
from latentzoo.metrics.generative import _fid_helper_file, to_uint8
from tests.metrics.test_generative import BlobSampler, _blobs, _evaluator

ROOT = Path(__file__).resolve().parents[2]
CLI_TINY = ["--extractor", "tiny", "--num-workers", "0", "--kid-subsets", "10"]


def _write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(to_uint8(images).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def _cli(argv: list[str], tmp_path: Path, capsys) -> dict:
    out = tmp_path / "cli.json"
    assert fid_cli.main([*argv, *CLI_TINY, "--json", str(out)]) == 0
    print(capsys.readouterr().out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """eval.py's FID evaluator on a stand-in model, its samples saved as PNGs and .npz, and the
    reference split written as a PNG folder."""
    tmp = tmp_path_factory.mktemp("fid_cli")
    dm = _blobs()
    evaluator = _evaluator(
        tmp, kid_subsets=10, kid_subset_size=50, prd=True, prd_k=3, dc_k=5, save_samples="both"
    )
    values = evaluator(BlobSampler(), dm)
    reference = torch.cat([batch[0] for batch in dm.reference_dataloader("train", 32)])
    _write_pngs(reference, tmp / "reference")
    return values, tmp / "reference", tmp / "run"


def test_cli_equals_eval_on_the_same_images(eval_run, tmp_path: Path, capsys) -> None:
    values, reference, run = eval_run
    args = ["--prd", "--kid-subset-size", "50"]
    for fake in (run / "samples", run / "samples.npz"):
        got = _cli([str(reference), str(fake), *args], tmp_path, capsys)
        for key in ("fid", "precision", "recall", "density", "coverage"):
            assert got[key] == pytest.approx(values[key], rel=1e-6, abs=1e-9), key
        # KID's float32 polynomial kernel sums cancel: features that differ in the last bit
        # (the reference went through the conv in batches of 100 there, 50 here) move it ~1e-7
        for key in ("kid_mean", "kid_std"):
            assert got[key] == pytest.approx(values[key], abs=1e-6), key
    assert values["fid"] > 0.01 and 0 < values["precision"] <= 1 and values["coverage"] > 0


def test_saved_statistics_give_the_same_numbers(eval_run, tmp_path: Path, capsys) -> None:
    _, reference, run = eval_run
    stats = tmp_path / "reference.npz"
    saved = _cli([str(reference), "--save-stats", str(stats)], tmp_path, capsys)
    assert saved["count"] == 96 and json.loads(str(np.load(stats)["meta"]))["extractor"]
    fake = str(run / "samples")
    args = ["--prd", "--kid-subset-size", "50"]
    from_images = _cli([str(reference), fake, *args], tmp_path, capsys)
    from_stats = _cli([str(stats), fake, *args], tmp_path, capsys)
    for key in ("fid", "kid_mean", "precision", "recall", "density", "coverage"):
        assert from_stats[key] == pytest.approx(from_images[key], rel=1e-6, abs=1e-9), key
    # statistics on the generated side too: FID is symmetric in the two sets
    fake_stats = tmp_path / "fake.npz"
    _cli([fake, "--save-stats", str(fake_stats)], tmp_path, capsys)
    both = _cli([str(reference), str(fake_stats), "--no-kid"], tmp_path, capsys)
    assert both["fid"] == pytest.approx(from_images["fid"], rel=1e-6)
    # a foreign mu/sigma file: FID only (KID dropped with a note), --prd refused
    foreign = tmp_path / "foreign.npz"
    with np.load(stats) as data:
        np.savez(foreign, mu=data["mu"], sigma=data["sigma"])
    bare = _cli([str(foreign), fake], tmp_path, capsys)
    assert bare["fid"] == pytest.approx(from_images["fid"], rel=1e-6) and "kid_mean" not in bare
    assert fid_cli.main([str(foreign), fake, "--prd", *CLI_TINY]) == 2
    assert "holds only mu and sigma" in capsys.readouterr().err


def test_self_fid_is_zero_and_report_lines(eval_run, capsys) -> None:
    _, reference, _ = eval_run
    assert fid_cli.main([str(reference), str(reference), "--prd", *CLI_TINY]) == 0
    out = capsys.readouterr().out
    fid_line = next(line for line in out.splitlines() if line.startswith("FID"))
    assert abs(float(fid_line.split()[1])) < 1e-4
    assert "precision  1.0000   recall    1.0000 (k=3)" in out and "KID" in out


def test_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (16, 16)).save(mixed / "b.png")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    cases = {
        (str(mixed), str(mixed)): "must share a size",
        (str(tmp_path / "broken"), str(mixed)): "cannot read image",
        (str(tmp_path / "nothing"), str(mixed)): "does not exist",
        (str(mixed),): "give two sets",
    }
    for argv, message in cases.items():
        assert fid_cli.main([*argv, *CLI_TINY]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.skipif(
    _fid_helper_file() is not None
    or bool(__import__("importlib").util.find_spec("torch_fidelity")),
    reason="Inception weights may be installed",
)
def test_module_entry_without_inception_weights_fails_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _write_pngs(torch.rand(4, 3, 8, 8), folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "latentzoo.fid", str(folder), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert (
        result.stderr.startswith("error: no FID Inception weights") and "--weights" in result.stderr
    )
