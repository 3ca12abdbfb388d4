"""CLEVRER and Traffic in the formats the original DLP reads (one uint8 frames array), the
frame-folder -> array preparation, and `experiment=dlp_clevrer` / `dlp_traffic` end to end on
small generated files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError
from latentzoo.data.dlp_frames import clevrer_frame_list, main, traffic_frame_list
from latentzoo.data.multishapes import CLEVRERFramesDataModule, TrafficFramesDataModule
from latentzoo.utils.distributed import instantiate_datamodule
from tests.conftest import compose_config, run_cli
from tests.data.dlp_data_files import write_frames
from tests.data.test_celeba_mafl import TINY_TRAINER


def _items(dataset) -> list[bytes]:
    return [dataset[i][0].numpy().tobytes() for i in range(len(dataset))]


def test_clevrer_one_file_split(tmp_path: Path) -> None:
    frames = write_frames(tmp_path / "f.npy", 40, size=16)
    dm = CLEVRERFramesDataModule(path=str(tmp_path / "f.npy"), image_size=16, val_fraction=0.25)
    dm.setup()
    train, val, test = (_items(dm.datasets[s]) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (27, 9, 4)  # 90 % = 36: its last 25 % is val
    assert test == [f.transpose(2, 0, 1).tobytes() for f in frames[36:]]  # in file order
    assert set(val).isdisjoint(test)


def test_clevrer_two_files_as_the_original(tmp_path: Path) -> None:
    """train = the whole train-video file; val = the first val_frames of the validation-video
    file (the original's 5000), test = the rest of it."""
    write_frames(tmp_path / "train.npy", 12, size=16, seed=1)
    held = write_frames(tmp_path / "valid.npy", 10, size=16, seed=2)
    kw = dict(path=str(tmp_path / "train.npy"), val_path=str(tmp_path / "valid.npy"), image_size=16)
    dm = CLEVRERFramesDataModule(val_frames=6, **kw)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [12, 6, 4]
    assert _items(dm.datasets["val"]) == [f.transpose(2, 0, 1).tobytes() for f in held[:6]]
    with pytest.raises(DatasetFormatError, match="lower data.val_frames"):
        CLEVRERFramesDataModule(val_frames=10, **kw).setup()


def test_frames_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="img128np_fs3.npy") as error:
        TrafficFramesDataModule(path=str(tmp_path / "img128np_fs3.npy"), prepare="p").setup()
    assert "\n" not in str(error.value) and "Traffic frames" in str(error.value)
    np.save(tmp_path / "f.npy", np.zeros((4, 16, 16, 3), dtype=np.float32))
    with pytest.raises(DatasetFormatError, match="uint8"):
        CLEVRERFramesDataModule(path=str(tmp_path / "f.npy"), image_size=16).setup()
    np.save(tmp_path / "f.npy", np.zeros((4, 3, 16, 16), dtype=np.uint8))  # channels first
    with pytest.raises(DatasetFormatError, match=r"\[N, 16, 16, 3\]"):
        CLEVRERFramesDataModule(path=str(tmp_path / "f.npy"), image_size=16).setup()


def test_traffic_config_reads_the_original_file(tmp_path: Path) -> None:
    overrides = ["data.num_workers=0", "data.pin_memory=false", f"paths.data_dir={tmp_path}"]
    cfg = compose_config("train", ["experiment=dlp_traffic", *overrides])
    assert cfg.data.path == str(tmp_path / "traffic" / "img128np_fs3.npy")
    write_frames(Path(cfg.data.path), 20)
    dm = instantiate_datamodule(cfg.data)
    images, labels = next(iter(dm.val_dataloader()))
    assert dm.name == "traffic" and images.shape[1:] == (3, 128, 128)
    assert images.dtype == torch.float32 and float(images.max()) <= 1


def _png(path: Path, colour: tuple[int, int, int], size=(32, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_clevrer_preparation_keeps_every_third_frame_after_26(tmp_path: Path) -> None:
    """Per video (sorted), frames numbered above 26, every 3rd: 27, 30, ..., 39 of 1..40."""
    for video in (0, 1):
        for frame in range(1, 41):
            _png(tmp_path / "frames" / f"video_{video:05d}" / f"{frame:03d}.png", (video, frame, 0))
    paths = clevrer_frame_list(tmp_path / "frames")
    assert [(p.parent.name[-1], int(p.stem)) for p in paths] == [
        (v, f) for v in "01" for f in (27, 30, 33, 36, 39)
    ]
    main(["clevrer", str(tmp_path / "frames"), str(tmp_path / "out.npy"), "--size", "16"])
    array = np.load(tmp_path / "out.npy")
    assert array.shape == (10, 16, 16, 3) and array.dtype == np.uint8
    assert array[:, 0, 0, :2].tolist() == [[v, f] for v in (0, 1) for f in (27, 30, 33, 36, 39)]


def test_traffic_preparation_crops_the_original_box(tmp_path: Path) -> None:
    """Frames in index order (2 before 10), every 3rd, cropped to (60, 0, 480, 420): a 640 x 480
    frame whose first 60 columns and last 60 rows are red comes out all blue."""
    for index in range(12):
        pixels = np.zeros((480, 640, 3), dtype=np.uint8)
        pixels[:, :, 2] = 200
        pixels[:, :60] = pixels[420:] = (255, 0, 0)
        pixels[100, 100] = (0, index, 200)  # a marker of the frame index
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
    assert [int(p.stem) for p in traffic_frame_list(tmp_path)] == [0, 3, 6, 9]
    main(["traffic", str(tmp_path), str(tmp_path / "out" / "img128np_fs3.npy")])
    array = np.load(tmp_path / "out" / "img128np_fs3.npy")
    assert array.shape == (4, 128, 128, 3)
    assert array[..., 0].max() < 30 and array[..., 2].min() > 170


TINY_OBJECT_DLP = [
    "model.n_kp=3",
    "model.n_kp_prior=4",
    "model.learned_feature_dim=2",
    "model.enc_channels=[8,8,16,16]",
    "model.prior_channels=[8,8,8]",
    "model.dec_channels=[8,8,8]",
    "model.rec_loss=mse",  # vgg downloads ImageNet weights
    "model.warmup_epoch=0",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,file",
    [
        ("dlp_clevrer", "clevrer/clevrer_frames_128.npy"),
        ("dlp_traffic", "traffic/img128np_fs3.npy"),
    ],
)
def test_object_experiments_train_on_the_original_format(
    experiment: str, file: str, tmp_path: Path
) -> None:
    write_frames(tmp_path / "data" / file, 48)
    run = tmp_path / "run"
    result = run_cli(
        "train.py",
        f"experiment={experiment}",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.global_batch_size=4",
        "data.num_workers=0",
        "data.pin_memory=false",
        *TINY_OBJECT_DLP,
        *TINY_TRAINER,
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert np.isfinite(record["metrics"]["test/loss"])
