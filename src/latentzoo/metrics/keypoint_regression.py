"""MAFL landmark regression from unsupervised keypoints (DLP / DVE protocol, dlp.md §6).

Fit a linear map **without intercept and without regularisation** (the original's Ridge with
α = 0) from the flattened keypoint means of the MAFL training images to their 5 landmarks, and
report on the test images the mean L2 landmark error divided by the inter-ocular distance (the
eyes are the first two landmarks), in %. Landmarks are (x, y) and keypoints (row, col): the
swap does not change a linear fit, but pass landmarks as (x, y) pixel coordinates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from latentzoo.utils.errors import LatentzooError


def landmark_regression_error(
    feats_train: np.ndarray, lm_train: np.ndarray, feats_test: np.ndarray, lm_test: np.ndarray
) -> float:
    """feats [N, F]; landmarks [N, L, 2] -> mean inter-ocular-normalised error in %."""
    a = np.asarray(feats_train, dtype=np.float64)
    y = np.asarray(lm_train, dtype=np.float64).reshape(len(a), -1)
    w, *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = (np.asarray(feats_test, dtype=np.float64) @ w).reshape(lm_test.shape)
    err = np.linalg.norm(pred - lm_test, axis=-1).mean(-1)  # [N]
    iod = np.linalg.norm(lm_test[:, 0] - lm_test[:, 1], axis=-1)
    return float(100 * (err / iod).mean())


def confident_keypoints(confidence: np.ndarray, n: int, most: bool) -> np.ndarray:
    """Indices of the ``n`` keypoints with the highest (``most``) or lowest mean confidence
    (-Σ log σ²) over the images: confidence [N, K] -> sorted [n]."""
    order = np.argsort(confidence.mean(0))
    return np.sort(order[-n:] if most else order[:n])


class KeypointRegression:
    """``metrics=keypoint_regression``: needs a datamodule with
    ``landmark_dataloader(split) -> (images, landmarks [B, 5, 2])`` for "train" and "test"."""

    requires = ("keypoints",)

    def __init__(self, top_n: int = 10) -> None:
        self.top_n = top_n

    @torch.no_grad()
    def _encode(self, model: Any, loader: Any) -> tuple[np.ndarray, ...]:
        mus, confs, lms = [], [], []
        for images, landmarks in loader:
            mu, conf = model.keypoints(images.to(model.device))
            mus.append(mu.cpu().numpy())
            confs.append(conf.cpu().numpy())
            lms.append(landmarks.numpy())
        return np.concatenate(mus), np.concatenate(confs), np.concatenate(lms)

    def __call__(self, model: Any, datamodule: Any) -> dict[str, float]:
        if not hasattr(datamodule, "landmark_dataloader"):
            raise LatentzooError(
                f"metric 'keypoint_regression' needs landmark data (data=celeba_mafl); "
                f"{getattr(datamodule, 'name', type(datamodule).__name__)} has none"
            )
        model.eval()
        mu_tr, conf_tr, lm_tr = self._encode(model, datamodule.landmark_dataloader("train"))
        mu_te, _, lm_te = self._encode(model, datamodule.landmark_dataloader("test"))
        out = {
            "error": landmark_regression_error(
                mu_tr.reshape(len(mu_tr), -1), lm_tr, mu_te.reshape(len(mu_te), -1), lm_te
            )
        }
        n = min(self.top_n, mu_tr.shape[1])
        for tag, most in (("top", True), ("bottom", False)):
            keep = confident_keypoints(conf_tr, n, most)
            tr, te = mu_tr[:, keep], mu_te[:, keep]
            out[f"error_{tag}{n}"] = landmark_regression_error(
                tr.reshape(len(tr), -1), lm_tr, te.reshape(len(te), -1), lm_te
            )
        return out
