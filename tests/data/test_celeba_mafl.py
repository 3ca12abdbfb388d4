"""CelebA / MAFL for DLP: file parsing, the DVE splits and geometry, the TPS warp, the batch
contract, MAFL keypoint regression, and `experiment=dlp_celeba` train -> eval on small files
written in the published formats (tests/data/dlp_data_files.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from latentzoo.callbacks.images import batch_images
from latentzoo.data import celeba_mafl
from latentzoo.data.celeba_mafl import (
    LANDMARK_COLUMNS,
    CelebAMAFLDataModule,
    align_landmarks,
    read_eval_partition,
    read_landmarks,
    read_name_list,
)
from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError
from latentzoo.data.tps import (
    TPSPairWarper,
    apply_tps,
    control_lattice,
    identity_theta,
    pixel_lattice,
    random_tps_theta,
    solve_tps_theta,
    tps_design_matrix,
    tps_kernel,
)
from latentzoo.metrics.keypoint_regression import KeypointRegression, landmark_regression_error
from tests.conftest import run_cli
from tests.data.dlp_data_files import write_celeba

# the first three rows of CelebA's list_landmarks_align_celeba.txt, in its spacing
LANDMARKS_TXT = f"""3
{" ".join(LANDMARK_COLUMNS)}
000001.jpg 69  109  106  113   77  142   73  152  108  154
000002.jpg 69  110  107  112   81  135   70  151  108  153
000003.jpg 76  112  104  106  108  128   74  156   98  158
"""


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("celeba")
    write_celeba(root)
    return root


# ----------------------------------------------------------------------------- file formats
def test_landmark_file_parses_to_x_y_pixels(tmp_path: Path) -> None:
    path = tmp_path / "list_landmarks_align_celeba.txt"
    path.write_text(LANDMARKS_TXT)
    assert " ".join(LANDMARK_COLUMNS) == (
        "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
        "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    )
    names, landmarks = read_landmarks(path)
    assert names == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert landmarks.shape == (3, 5, 2)
    np.testing.assert_array_equal(
        landmarks[0], [[69, 109], [106, 113], [77, 142], [73, 152], [108, 154]]
    )
    np.testing.assert_array_equal(landmarks[2, 4], [98, 158])  # right mouth of image 3
    # a truncated file (fewer rows than line 1 announces) is refused
    path.write_text(LANDMARKS_TXT.replace("3\n", "4\n", 1))
    with pytest.raises(DatasetFormatError, match="announces 4 images, found 3"):
        read_landmarks(path)


def test_landmarks_follow_the_dve_crop() -> None:
    """(x, y) -> ((x, y - 30) · 160 / 178 - 16): the head square, resize to 160, 16 px crop."""
    out = align_landmarks(np.array([[[69.0, 109.0], [106.0, 113.0]]]))
    np.testing.assert_allclose(out[0, 0], [69 * 160 / 178 - 16, 79 * 160 / 178 - 16], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], [106 * 160 / 178 - 16, 83 * 160 / 178 - 16], rtol=1e-6)


def test_partition_and_mafl_lists(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("000001.jpg 0\n000002.jpg 2\n000003.jpg 1\n")
    assert read_eval_partition(tmp_path / "p.txt") == {
        "000001.jpg": 0,
        "000002.jpg": 2,
        "000003.jpg": 1,
    }
    (tmp_path / "p.txt").write_text("000001.jpg 3\n")
    with pytest.raises(DatasetFormatError, match="<0|1|2>"):
        read_eval_partition(tmp_path / "p.txt")
    (tmp_path / "testing.txt").write_text("051636.jpg\n004509.jpg\n\n")
    assert read_name_list(tmp_path / "testing.txt") == ["051636.jpg", "004509.jpg"]


def test_splits_follow_the_original(celeba_root: Path) -> None:
    """train = partition 0 minus every MAFL image; val = partition 2 minus MAFL (first
    val_size); test and the landmark sets = MAFL; all in CelebA file order."""
    dm = CelebAMAFLDataModule(root=str(celeba_root), batch_size=4, val_size=3)
    dm.setup()
    training = read_name_list(celeba_root / "MAFL" / "training.txt")
    testing = read_name_list(celeba_root / "MAFL" / "testing.txt")
    mafl = set(training) | set(testing)
    train = dm.datasets["train"].names
    assert train == [f"{i:06d}.jpg" for i in range(1, 25) if f"{i:06d}.jpg" not in mafl]
    assert len(train) == 15
    assert dm.datasets["val"].names == ["000037.jpg", "000038.jpg", "000039.jpg"]
    assert dm.landmark_sets["train"].names == sorted(training)
    assert dm.landmark_sets["test"].names == dm.datasets["test"].names == sorted(testing)


def test_images_and_landmarks_line_up(celeba_root: Path) -> None:
    """The fixture draws a bright dot at every landmark: after the crop / resize / crop, the
    dots sit at the landmark coordinates (x = column, y = row) of the 128 px image."""
    dm = CelebAMAFLDataModule(root=str(celeba_root), batch_size=4)
    images, landmarks = next(iter(dm.landmark_dataloader("test", batch_size=4)))
    assert images.shape == (4, 3, 128, 128) and landmarks.shape == (4, 5, 2)
    grey = images.mean(1)
    for image, points in zip(grey, landmarks, strict=True):
        for x, y in points.tolist():
            r, c = round(y), round(x)
            assert image[r, c] > 0.9  # on the dot
            assert image[r, c - 5] < 0.5 or image[r + 5, c] < 0.5  # the dot is small


def test_missing_files_say_what_to_get(celeba_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="img_align_celeba") as error:
        CelebAMAFLDataModule(root=str(tmp_path)).setup()
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
    # a copy without the MAFL lists: their path, URL and the download switch
    copy = tmp_path / "celeba"
    copy.mkdir()
    for part in ("Img", "Anno", "Eval"):
        (copy / part).symlink_to(celeba_root / part)
    with pytest.raises(DatasetNotFoundError, match="data.download=true") as error:
        CelebAMAFLDataModule(root=str(copy)).setup()
    assert str(copy / "MAFL" / "training.txt") in str(error.value)
    assert "TCDCN-face-alignment" in str(error.value)


def test_download_fetches_the_mafl_lists_or_fails_in_one_line(
    celeba_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "celeba"
    copy.mkdir()
    for part in ("Img", "Anno", "Eval"):
        (copy / part).symlink_to(celeba_root / part)
    offline = {s: f"file://{tmp_path}/absent/{s}.txt" for s in ("training", "testing")}
    monkeypatch.setattr(celeba_mafl, "MAFL_URLS", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed") as error:
        CelebAMAFLDataModule(root=str(copy), download=True).setup()
    assert "\n" not in str(error.value)
    served = {s: f"file://{celeba_root}/MAFL/{s}.txt" for s in ("training", "testing")}
    monkeypatch.setattr(celeba_mafl, "MAFL_URLS", served)
    dm = CelebAMAFLDataModule(root=str(copy), download=True)
    dm.setup()
    assert (copy / "MAFL" / "testing.txt").read_text() == (
        celeba_root / "MAFL" / "testing.txt"
    ).read_text()
    assert len(dm.landmark_sets["test"]) == 4


# ------------------------------------------------------------------------------------ TPS
def _ramp(h: int, w: int) -> torch.Tensor:
    """A distinct value per pixel: 1000·row + col, [1, 1, h, w]."""
    rows = torch.arange(h, dtype=torch.float64).view(-1, 1)
    return (1000 * rows + torch.arange(w, dtype=torch.float64)).view(1, 1, h, w)


def test_identity_parameters_give_the_identity_image() -> None:
    image = torch.rand(2, 3, 20, 24)
    design = tps_design_matrix(pixel_lattice(20, 24), control_lattice(5))
    out = apply_tps(image, identity_theta(5, 2), design)
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)
    # all standard deviations zero -> exactly the identity parameters
    zero = random_tps_theta(3, 5, sd_all=0, sd_subset=0, trans_sd=0, scale_sd=0, rot_sd=0)
    torch.testing.assert_close(zero, identity_theta(5, 3))


def test_a_control_point_shift_moves_its_pixel() -> None:
    """An interpolating TPS with control point (col 10, row 20) sent to (13, 18) samples that
    pixel from (13, 18); the other control points stay where they are."""
    size, n = 31, 4  # control points on pixels 0, 10, 20, 30
    ctrl = control_lattice(n)
    targets = ctrl.clone()
    k = 2 * n + 1  # x = -1/3 (col 10), y = 1/3 (row 20)
    assert torch.allclose((ctrl[k] + 1) / 2 * (size - 1), torch.tensor([10.0, 20.0]))
    targets[k] += torch.tensor([3.0, -2.0]) * 2 / (size - 1)
    theta = solve_tps_theta(ctrl.double(), targets.double())
    design = tps_design_matrix(pixel_lattice(size, size).double(), ctrl.double())
    out = apply_tps(_ramp(size, size), theta.unsqueeze(0), design)[0, 0]  # float32 lattice
    assert out[20, 10].item() == pytest.approx(18 * 1000 + 13, abs=1e-2)
    assert out[10, 20].item() == pytest.approx(10 * 1000 + 20, abs=1e-2)
    assert out[30, 0].item() == pytest.approx(30 * 1000 + 0, abs=1e-2)


def test_translation_and_rotation_follow_the_original_convention() -> None:
    """theta rows: t = (tx, ty) shifts the sampling point; the affine rows multiply (x, y) as
    gx = cos·x + sin·y, gy = -sin·x + cos·y."""
    size = 21
    design = tps_design_matrix(pixel_lattice(size, size).double(), control_lattice(3).double())
    theta = identity_theta(3).double()
    theta[0, -3] = torch.tensor([2 * 2 / (size - 1), 0.0])  # +2 px in x
    out = apply_tps(_ramp(size, size), theta, design)[0, 0]
    assert out[5, 7].item() == pytest.approx(5 * 1000 + 9, abs=1e-6)
    quarter = identity_theta(3).double()  # rot = 90°: g(x, y) = (y, -x)
    quarter[0, -2:] = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    out = apply_tps(_ramp(size, size), quarter, design)[0, 0]
    # output pixel (col 15, row 10) = (x 0.5, y 0) samples (x 0, y -0.5) = (col 10, row 5)
    assert out[10, 15].item() == pytest.approx(5 * 1000 + 10, abs=1e-6)


def test_kernel_and_random_parameters_are_the_originals() -> None:
    """U(r²) = r² log(r² + 1e-5); weights N(0, 0.001²) with a random half N(0, 0.01²); rotation
    N(0, 5°²), scale 1 + N(0, 0.1²), translation N(0, 0.1²) (DVE / DLP Warper defaults)."""
    u = tps_kernel(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.3, 0.4], [0.0, 0.0]]))
    torch.testing.assert_close(u, torch.tensor([[0.25 * math.log(0.25 + 1e-5), 0.0]]))
    torch.manual_seed(0)
    theta = random_tps_theta(20000).double()
    w = theta[:, :-3]
    small = w.abs() < 0.004  # nearly all N(0, 0.001²) draws, few N(0, 0.01²) ones
    assert 0.5 < small.double().mean() < 0.7
    assert w.std() == pytest.approx(math.sqrt((0.001**2 + 0.01**2) / 2), rel=0.02)
    shift, affine = theta[:, -3], theta[:, -2:]
    assert shift.std(0).tolist() == pytest.approx([0.1, 0.1], rel=0.03)
    scale = affine[:, 0].norm(dim=-1)  # rows (cos, -sin)·s
    rot = torch.atan2(affine[:, 1, 0], affine[:, 0, 0])  # (sin, cos) row: s·sin, s·cos
    assert (scale - 1).std().item() == pytest.approx(0.1, rel=0.03)
    assert math.degrees(rot.std().item()) == pytest.approx(5.0, rel=0.03)
    torch.testing.assert_close(affine[:, 0, 0], affine[:, 1, 1])  # s·cos on the diagonal
    torch.testing.assert_close(affine[:, 0, 1], -affine[:, 1, 0])


def test_pair_warper_mild_then_full() -> None:
    """The posterior image is the crop of a mild warp (0.1 x the parameters), the prior image
    a further full warp of it; with all deviations zero both are the crop of the input."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 40), indexing="ij")
    image = torch.stack([xx, yy, xx * yy]) * 255
    still = TPSPairWarper(40, 4, sd_all=0, sd_subset=0, trans_sd=0, scale_sd=0, rot_sd=0)
    x, x_prior = still(image)
    torch.testing.assert_close(x, image[:, 4:-4, 4:-4], atol=1e-3, rtol=0)
    torch.testing.assert_close(x_prior, x, atol=1e-3, rtol=0)
    mild_diffs, full_diffs = [], []
    warper = TPSPairWarper(40, 4)  # the original's parameters
    for _ in range(20):
        x, x_prior = warper(image)
        mild_diffs.append((x - image[:, 4:-4, 4:-4]).abs().mean())
        full_diffs.append((x_prior - x).abs().mean())
    assert x.shape == x_prior.shape == (3, 32, 32)
    assert torch.stack(full_diffs).mean() > 4 * torch.stack(mild_diffs).mean() > 0


def test_pair_warper_composes_the_two_warps_in_order() -> None:
    """image = crop(warp_1(x)) with the parameters x 0.1; prior_image = crop(warp_2(warp_1(x)))
    with the full ones, drawn in that order from the generator."""
    image = torch.rand(3, 24, 24) * 255
    warper = TPSPairWarper(24, 2, n_ctrl=4)
    x, x_prior = warper(image, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    mild = dict(sd_all=1e-4, sd_subset=1e-3, trans_sd=0.01, scale_sd=0.01, rot_sd=0.5)
    theta_1 = random_tps_theta(1, 4, **mild, generator=g)
    theta_2 = random_tps_theta(1, 4, generator=g)
    design = tps_design_matrix(pixel_lattice(24, 24), control_lattice(4))
    warped_1 = apply_tps(image[None], theta_1, design)
    warped_2 = apply_tps(warped_1, theta_2, design)
    torch.testing.assert_close(x, warped_1[0, :, 2:-2, 2:-2])
    torch.testing.assert_close(x_prior, warped_2[0, :, 2:-2, 2:-2])


# ------------------------------------------------------------------------- batch contract
def test_train_batches_are_pairs_and_the_rest_are_plain(
    celeba_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    dm = CelebAMAFLDataModule(root=str(celeba_root), batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "prior_image"}
    for key in batch:
        assert batch[key].shape == (4, 3, 128, 128) and batch[key].dtype == torch.float32
        assert batch[key].min() >= 0 and batch[key].max() <= 1
    assert batch_images(batch) is batch["image"]
    assert (batch["image"] - batch["prior_image"]).abs().mean() > 0.005  # warped apart
    again = next(iter(CelebAMAFLDataModule(root=str(celeba_root), batch_size=4).train_dataloader()))
    torch.testing.assert_close(again, batch)  # the run seed fixes order and warps
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 128, 128) and labels.tolist() == [0, 0, 0, 0]
    # val images are the un-warped crop: equal to the landmark loader's pixels for a MAFL image
    test_images, _ = next(iter(dm.test_dataloader()))
    lm_images, _ = next(iter(dm.landmark_dataloader("test", batch_size=4)))
    torch.testing.assert_close(test_images, lm_images)
    plain = CelebAMAFLDataModule(root=str(celeba_root), batch_size=4, prior_pairs=False)
    images, labels = next(iter(plain.train_dataloader()))
    assert images.shape == (4, 3, 128, 128) and labels.shape == (4,)


def test_landmark_loader_rejects_other_splits(celeba_root: Path) -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        CelebAMAFLDataModule(root=str(celeba_root)).landmark_dataloader("val")


# ------------------------------------------------------------------- keypoint regression
def test_regression_error_matches_a_hand_computed_value() -> None:
    """Train: features e1 -> landmarks A, e2 -> 0, so W = [A; 0]. Test image 1: feature 0.5·e1
    predicts A / 2 for truth A: per-point errors |A_l| / 2 = 0, 5, 4, 5, 2 (mean 3.2) over its
    inter-ocular distance 10 = 32 %. Test image 2: feature 2·e1 predicts 2A exactly: 0 %.
    The error is the mean of the per-image ratios: 16 %."""
    a = np.array([[0, 0], [10, 0], [0, 8], [6, 8], [0, 4]], dtype=float)
    feats_train = np.eye(2)
    lm_train = np.stack([a, np.zeros_like(a)])
    feats_test, lm_test = np.array([[0.5, 0.0], [2.0, 0.0]]), np.stack([a, 2 * a])
    assert landmark_regression_error(feats_train, lm_train, feats_test[:1], lm_test[:1]) == (
        pytest.approx(32.0)
    )
    error = landmark_regression_error(feats_train, lm_train, feats_test, lm_test)
    assert error == pytest.approx(16.0)


class _LinearKeypoints(torch.nn.Module):
    """keypoints(x) = (row, col) in [-1, 1] of the landmarks hidden in the image's first row."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.noise = noise
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def keypoints(self, x: torch.Tensor):
        lm = x[:, 0, 0, :10].reshape(-1, 5, 2) / 64  # linear: the fit has no intercept
        mu = lm.flip(-1) + self.noise * torch.randn_like(lm)  # (x, y) -> (row, col)
        return mu, -torch.arange(5.0).expand(len(x), 5)


class _Landmarks:
    name = "fake"

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.sets = {}
        for split, n in (("train", 40), ("test", 10)):
            lm = torch.tensor(rng.uniform(20, 100, (n, 5, 2)), dtype=torch.float32)
            images = torch.zeros(n, 3, 8, 16)
            images[:, 0, 0, :10] = lm.reshape(n, 10)
            self.sets[split] = list(zip(images.split(5), lm.split(5), strict=True))

    def landmark_dataloader(self, split: str):
        return self.sets[split]


def test_keypoint_regression_is_zero_for_a_linear_map_of_the_landmarks() -> None:
    metric = KeypointRegression(top_n=3)
    exact = metric(_LinearKeypoints(), _Landmarks())
    assert exact["error"] == pytest.approx(0, abs=1e-4)
    assert set(exact) == {"error", "error_top3", "error_bottom3"}
    torch.manual_seed(0)
    assert metric(_LinearKeypoints(noise=0.05), _Landmarks())["error"] > 1


# --------------------------------------------------------------------------- end to end
TINY_DLP = [
    "model.n_kp=4",
    "model.n_kp_prior=6",
    "model.enc_channels=[8,16,16,16]",
    "model.prior_channels=[8,8,8]",
    "model.dec_channels=[16,8,8]",
    "model.rec_loss=mse",  # vgg downloads ImageNet weights
]
TINY_TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "extras.print_config=false",
]


def model_reads_prior_pairs() -> bool:
    """Whether DLP's step() takes the ``{"image", "prior_image"}`` batches (dlp.py, issue 17)."""
    from latentzoo.models.dlp import DeepLatentParticles

    model = DeepLatentParticles(
        image_shape=[3, 32, 32],
        n_kp=2,
        n_kp_prior=2,
        patch_size=8,
        enc_channels=[4, 4, 4],
        prior_channels=[4, 4, 4],
        dec_channels=[4, 4],
        learned_feature_dim=2,
    )
    batch = {"image": torch.rand(2, 3, 32, 32), "prior_image": torch.rand(2, 3, 32, 32)}
    try:
        model.step(batch, "train")
    except (AttributeError, TypeError, KeyError, IndexError):
        return False
    return True


@pytest.mark.slow
def test_dlp_celeba_trains_and_reports_the_mafl_error(celeba_root: Path, tmp_path: Path) -> None:
    """train.py experiment=dlp_celeba on the small CelebA/MAFL tree, then eval.py
    metrics=keypoint_regression on its checkpoint gives a finite MAFL error (in %)."""
    pairs = model_reads_prior_pairs()  # until dlp.py reads prior_image: plain batches
    run = tmp_path / "train"
    result = run_cli(
        "train.py",
        "experiment=dlp_celeba",
        f"data.root={celeba_root}",
        "data.global_batch_size=4",
        "data.num_workers=0",
        "data.pin_memory=false",
        f"data.prior_pairs={str(pairs).lower()}",
        *TINY_DLP,
        *TINY_TRAINER,
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    result = run_cli(
        "eval.py",
        f"ckpt_path={ckpt}",
        "metrics=keypoint_regression",
        "trainer.accelerator=cpu",
        "extras.print_config=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    error = metrics["keypoint_regression/error"]
    assert np.isfinite(error) and 0 < error < 1000
    assert {"keypoint_regression/error_top4", "keypoint_regression/error_bottom4"} <= set(metrics)
