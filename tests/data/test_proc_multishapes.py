"""proc_multishapes renderer (datasets.md §11): shapes, range, determinism, non-overlap, module."""

from __future__ import annotations

import torch

from latentzoo.data.datasets.proc_multishapes import ProcMultiShapes, _draw_layout
from latentzoo.data.multishapes import ProcMultiShapesDataModule


def test_shapes_range_and_determinism() -> None:
    data = ProcMultiShapes(length=100, image_size=64, seed=3)
    images, counts = data.get_batch([0, 5, 99])
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert ((counts >= 2) & (counts <= 5)).all()
    again = ProcMultiShapes(length=100, image_size=64, seed=3).get_batch([5])[0][0]
    assert torch.equal(images[1], again)  # same (seed, index) -> same bytes
    other = ProcMultiShapes(length=100, image_size=64, seed=4).get_batch([5])[0][0]
    assert not torch.equal(images[1], other)
    assert torch.equal(data[5][0], images[1])  # single item == batched


def test_shapes_do_not_overlap_and_have_the_right_size() -> None:
    for index in range(50):
        layout = _draw_layout(0, index, 64)
        on = layout[layout[:, 0] > 0]
        assert 2 <= len(on) <= 5
        assert ((on[:, 4] >= 11) & (on[:, 4] <= 13) & (on[:, 5] >= 11) & (on[:, 5] <= 13)).all()
        for a in range(len(on)):
            for b in range(a + 1, len(on)):
                apart_r = abs(on[a, 2] - on[b, 2]) >= (on[a, 4] + on[b, 4]) / 2
                apart_c = abs(on[a, 3] - on[b, 3]) >= (on[a, 5] + on[b, 5]) / 2
                assert apart_r or apart_c
        # foreground pixels: each shape covers at least a third of its 11-13 px box
        image = ProcMultiShapes(64, 64, 0).get_batch([index])[0][0]
        assert (image.sum(0) > 0).sum() >= len(on) * 11 * 11 / 3


def test_datamodule_splits_are_disjoint_ranges() -> None:
    dm = ProcMultiShapesDataModule(num_train=16, num_val=8, num_test=8, batch_size=4)
    dm.setup()
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 64, 64)
    assert torch.equal(x[0], ProcMultiShapes(40, 64, 0).get_batch([16])[0][0])


def test_real_dlp_data_fail_clearly(tmp_path) -> None:
    import numpy as np
    import pytest

    from latentzoo.data.datasets.errors import DatasetNotFoundError
    from latentzoo.data.multishapes import CelebAMAFLDataModule, CLEVRERFramesDataModule

    with pytest.raises(DatasetNotFoundError, match="img_align_celeba"):
        CelebAMAFLDataModule(root=str(tmp_path)).setup()
    path = tmp_path / "frames.npy"
    with pytest.raises(DatasetNotFoundError, match="frames.npy"):
        CLEVRERFramesDataModule(path=str(path), source="x").setup()
    np.save(path, np.full((10, 128, 128, 3), 255, dtype=np.uint8))
    dm = CLEVRERFramesDataModule(path=str(path), batch_size=2)
    dm.setup()
    sizes = [len(dm.datasets[s]) for s in ("train", "val", "test")]
    assert sizes == [8, 1, 1]  # val: the last train-fraction frame, never a test frame
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 128, 128) and float(x.min()) == 1.0
