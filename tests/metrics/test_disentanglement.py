"""Disentanglement metrics: hand-computed cases and good / mixed / noise codes.

Good code: the factor classes scaled to [0, 1], permuted, plus 1e-3 noise and two nuisance
dimensions. Mixed code: the same with 45-degree rotations within code pairs (0, 1) and (2, 3).
Noise: independent Gaussians. Sample sizes are small so the file runs in well under a minute.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

from latentzoo.metrics.disentanglement import (
    PRESETS,
    beta_vae_score,
    completeness,
    dci,
    discrete_entropy,
    discrete_mutual_info,
    disentanglement,
    evaluate_all,
    factor_vae_score,
    histogram_discretize,
    mig,
    modularity_explicitness,
    modularity_from_mutual_info,
    preset_record,
    sample_codes_and_factors,
    sap,
    unsupervised,
)
from latentzoo.metrics.disentanglement.beta_vae import make_logistic_regression
from latentzoo.metrics.disentanglement.unsupervised import (
    gaussian_total_correlation,
    gaussian_wasserstein_correlation,
)

SIZES = (3, 4, 5, 6)


def _factors(n: int, rng: np.random.Generator, sizes=SIZES) -> np.ndarray:
    return np.stack([rng.integers(0, s, n) for s in sizes], axis=1)


def _good(factors: np.ndarray, rng: np.random.Generator, sizes=SIZES) -> np.ndarray:
    z = factors / (np.asarray(sizes) - 1.0)
    z = z + 1e-3 * rng.standard_normal(z.shape)
    nuisance = 1e-2 * rng.standard_normal((len(z), 2))
    return np.concatenate([z[:, [2, 0, 3, 1]] * [1.0, 3.0, -2.0, 0.5], nuisance], axis=1)


def _rotate_pairs(codes: np.ndarray) -> np.ndarray:
    c = codes / codes[:, :4].std(axis=0).max()  # comparable scales before mixing
    out = c.copy()
    s = np.sqrt(0.5)
    for i, j in ((0, 1), (2, 3)):
        a = c[:, i] / c[:, i].std()
        b = c[:, j] / c[:, j].std()
        out[:, i], out[:, j] = s * (a + b), s * (a - b)
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f_tr, f_te = _factors(1500, rng), _factors(600, rng)
    good_tr, good_te = _good(f_tr, rng), _good(f_te, rng)
    return {
        "f_tr": f_tr,
        "f_te": f_te,
        "good_tr": good_tr,
        "good_te": good_te,
        "mixed_tr": _rotate_pairs(good_tr),
        "mixed_te": _rotate_pairs(good_te),
        "noise_tr": rng.standard_normal((1500, 6)),
        "noise_te": rng.standard_normal((600, 6)),
    }


# ------------------------------------------------------------------ discretisation and MI


def test_histogram_discretize_by_hand() -> None:
    codes = np.array([[0.0, 5.0], [0.5, 5.0], [2.5, 5.0], [7.4, 5.0], [10.0, 5.0]])
    # column 0, 4 bins over [0, 10]: edges 0, 2.5, 5, 7.5 (the last edge, 10, is dropped) ->
    # 0 and 0.5 in bin 1, 2.5 starts bin 2, 7.4 in bin 3, the maximum 10 lands in bin 4.
    # column 1 is constant: np.histogram uses [4.5, 5.5], so 5.0 is in the middle bin 3.
    expected = np.array([[1, 3], [1, 3], [2, 3], [3, 3], [4, 3]])
    np.testing.assert_array_equal(histogram_discretize(codes, num_bins=4), expected)
    assert histogram_discretize(torch.tensor(codes), num_bins=4).dtype == np.int64


def test_discrete_mutual_info_by_hand() -> None:
    a = np.array([[0], [0], [1], [1]])
    same = np.array([[5], [5], [7], [7]])
    indep = np.array([[0], [1], [0], [1]])
    assert discrete_mutual_info(a, same)[0, 0] == pytest.approx(np.log(2), abs=1e-12)
    assert discrete_mutual_info(a, indep)[0, 0] == pytest.approx(0.0, abs=1e-12)
    # p(x, y) = [[1/2, 0], [1/4, 1/4]]: I = 1/2 log(2/1.5) + 2 * 1/4 log((1/4) / (1/2 * 3/4)).
    x = np.array([[0], [0], [1], [1]])
    y = np.array([[0], [0], [0], [1]])
    expected = 0.5 * np.log(0.5 / (0.5 * 0.75)) + 0.25 * np.log(0.25 / (0.5 * 0.75))
    expected += 0.25 * np.log(0.25 / (0.5 * 0.25))
    assert discrete_mutual_info(x, y)[0, 0] == pytest.approx(expected, abs=1e-12)
    # entropy of a fair 3-way split and of a 1/4 vs 3/4 split
    h = discrete_entropy(np.array([[0, 0], [1, 1], [2, 1], [0, 1], [1, 1], [2, 1]]))
    np.testing.assert_allclose(h, [np.log(3), -(1 / 6) * np.log(1 / 6) - (5 / 6) * np.log(5 / 6)])


def test_discrete_mutual_info_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 20, size=(500, 3)) + 1
    b = np.stack([a[:, 0] // 3, rng.integers(0, 7, 500), 10 * (a[:, 2] % 4)], axis=1)
    m = discrete_mutual_info(a, b)
    for i in range(3):
        for j in range(3):
            assert m[i, j] == pytest.approx(mutual_info_score(b[:, j], a[:, i]), abs=1e-10)


# ------------------------------------------------------------------------------------ MIG


def test_mig_good_mixed_noise(data) -> None:
    good = mig(data["good_tr"], data["f_tr"])["mig"]
    mixed = mig(data["mixed_tr"], data["f_tr"])["mig"]
    noise = mig(data["noise_tr"], data["f_tr"])["mig"]
    assert good >= 0.9
    assert mixed <= 0.1
    assert noise < 0.05


def test_mig_invariant_to_permutation_and_rescaling(data) -> None:
    codes = data["mixed_tr"] + 0.05 * np.random.default_rng(2).standard_normal((1500, 6))
    ref = mig(codes, data["f_tr"])["mig"]
    changed = codes[:, [4, 2, 0, 5, 1, 3]] * np.array([3.0, -0.2, 7.0, 1e-3, -5.0, 2.0]) + 4.0
    assert mig(changed, data["f_tr"])["mig"] == pytest.approx(ref, abs=1e-12)
    assert mig(torch.tensor(codes), torch.tensor(data["f_tr"]))["mig"] == pytest.approx(ref)


def test_mig_rejects_constant_factor(data) -> None:
    factors = data["f_tr"].copy()
    factors[:, 1] = 0
    with pytest.raises(ValueError, match="constant factor"):
        mig(data["good_tr"], factors)


# ------------------------------------------------------------------------------------ DCI


def test_dci_importance_matrix_by_hand() -> None:
    eye = np.eye(4)
    assert disentanglement(eye) == pytest.approx(1.0, abs=1e-9)
    assert completeness(eye) == pytest.approx(1.0, abs=1e-9)
    uniform = np.ones((4, 4))
    assert disentanglement(uniform) == pytest.approx(0.0, abs=1e-9)
    assert completeness(uniform) == pytest.approx(0.0, abs=1e-9)
    # one code carries two factors equally (D = 1 - H_2(1/2, 1/2) = 0 for it), the other one
    # factor: rho = (2/3, 1/3) -> D = 1/3. Completeness: each factor in one code -> C = 1.
    r = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r3 = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    h = -2 * 0.5 * np.log(0.5) / np.log(3)  # code 0 over 3 factors: entropy base 3
    assert disentanglement(r3) == pytest.approx((2 / 3) * (1 - h) + (1 / 3) * 1.0, abs=1e-9)
    assert completeness(r) == pytest.approx(1.0, abs=1e-9)


def test_dci_gbt_good_vs_mixed(data) -> None:
    n = 400
    args = (data["f_tr"][:n], data["good_te"][:200], data["f_te"][:200])
    good = dci(data["good_tr"][:n], *args)
    mixed = dci(data["mixed_tr"][:n], data["f_tr"][:n], data["mixed_te"][:200], data["f_te"][:200])
    assert good["disentanglement"] >= 0.9
    assert good["completeness"] >= 0.9
    assert good["informativeness_test"] >= 0.95
    assert good["disentanglement"] - mixed["disentanglement"] >= 0.3
    assert set(good) == {
        "disentanglement",
        "completeness",
        "informativeness_train",
        "informativeness_test",
    }


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_dci_fast_estimator_matches_gbt(data) -> None:
    n = 400
    sets = (data["mixed_tr"][:n], data["f_tr"][:n], data["mixed_te"][:200], data["f_te"][:200])
    ref = dci(*sets, estimator="gbt")
    fast = dci(*sets, estimator="fast")
    for key in ref:  # same algorithm and split candidates: only ties and rounding differ
        assert fast[key] == pytest.approx(ref[key], abs=0.01), key
    good = dci(
        data["good_tr"][:n],
        data["f_tr"][:n],
        data["good_te"][:200],
        data["f_te"][:200],
        estimator="fast",
    )
    assert good["disentanglement"] >= 0.9
    with pytest.raises(ValueError, match="unknown DCI estimator"):
        dci(*sets, estimator="xgboost")


# ------------------------------------------------------------------------------- SAP, MOD


def test_sap(data) -> None:
    good = sap(data["good_tr"], data["f_tr"], data["good_te"], data["f_te"])["sap"]
    mixed = sap(data["mixed_tr"], data["f_tr"], data["mixed_te"], data["f_te"])["sap"]
    noise = sap(data["noise_tr"], data["f_tr"], data["noise_te"], data["f_te"])["sap"]
    assert good > mixed + 0.1
    assert noise < 0.05
    cont = sap(data["good_tr"], data["f_tr"], continuous_factors=True)["sap"]
    assert cont >= 0.9


def test_modularity_explicitness(data) -> None:
    assert modularity_from_mutual_info(np.eye(3)[:, [2, 0, 1]] * 0.7) == pytest.approx(1.0)
    # a code sharing its MI equally between 2 of 3 factors: delta = 1 / 2, modularity 1/2;
    # an all-zero row scores 0.
    m = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert modularity_from_mutual_info(m) == pytest.approx(0.25)
    good = modularity_explicitness(data["good_tr"], data["f_tr"], data["good_te"], data["f_te"])
    noise = modularity_explicitness(data["noise_tr"], data["f_tr"], data["noise_te"], data["f_te"])
    # the two nuisance codes share their (small, biased) MI over all factors and pull the mean
    # down; without them the code is perfectly modular
    no_nuisance = modularity_explicitness(
        data["good_tr"][:, :4], data["f_tr"], data["good_te"][:, :4], data["f_te"]
    )
    assert no_nuisance["modularity"] >= 0.9
    assert good["modularity"] >= 0.8
    assert good["explicitness_test"] >= 0.95
    assert noise["explicitness_test"] < 0.6
    assert good["modularity"] > noise["modularity"]


# ---------------------------------------------------------------------------- unsupervised


def test_gaussian_correlations_by_hand() -> None:
    rho = 0.6
    cov = np.array([[1.0, rho], [rho, 1.0]])
    assert gaussian_total_correlation(cov) == pytest.approx(-0.5 * np.log(1 - rho**2))
    # diag(cov) = I, so tr sqrtm(cov) = sqrt(1 + rho) + sqrt(1 - rho)
    expected = 4.0 - 2.0 * (np.sqrt(1 + rho) + np.sqrt(1 - rho))
    assert gaussian_wasserstein_correlation(cov) == pytest.approx(expected)
    scaled = np.diag([2.0, 0.5]) @ cov @ np.diag([2.0, 0.5])  # TC is scale invariant
    assert gaussian_total_correlation(scaled) == pytest.approx(-0.5 * np.log(1 - rho**2))


def test_unsupervised_scores(data) -> None:
    indep = unsupervised(data["noise_tr"])
    assert abs(indep["gaussian_total_correlation"]) < 0.02
    assert indep["gaussian_wasserstein_correlation_norm"] < 0.02
    assert indep["mutual_info_score"] < 0.15
    corr = unsupervised(data["mixed_tr"])
    assert corr["mutual_info_score"] > indep["mutual_info_score"]
    assert set(indep) == {
        "gaussian_total_correlation",
        "gaussian_wasserstein_correlation",
        "gaussian_wasserstein_correlation_norm",
        "mutual_info_score",
    }


# ------------------------------------------------------------------------ sampled scores


class FakeFactors:
    """A factor grid whose 'images' are the scaled factors (1 x 1 x K pixels)."""

    def __init__(self, factor_sizes=(3, 4, 5)) -> None:
        self.factor_sizes = tuple(factor_sizes)
        self.calls = 0

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.stack([rng.integers(0, s, n) for s in self.factor_sizes], axis=1)

    def images_of(self, factors: np.ndarray) -> torch.Tensor:
        self.calls += 1
        scale = np.maximum(np.asarray(self.factor_sizes) - 1, 1)
        return torch.as_tensor(factors / scale, dtype=torch.float32)[:, None, None, :]


def encode_good(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


def encode_mixed(images: torch.Tensor) -> torch.Tensor:
    z = images.flatten(1)
    s = np.sqrt(0.5)
    return torch.stack([s * (z[:, 0] + z[:, 1]), s * (z[:, 0] - z[:, 1]), z[:, 2]], dim=1)


def encode_noise(images: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(images.sum().item() * 1000) % 2**31)
    return torch.randn(images.shape[0], 4, generator=gen)


def test_beta_vae_score() -> None:
    ds = FakeFactors()
    kw = {"batch_size": 16, "num_train": 300, "num_eval": 300}
    good = beta_vae_score(encode_good, ds, 0, **kw)
    noise = beta_vae_score(encode_noise, ds, 0, **kw)
    assert good["eval_accuracy"] >= 0.99
    assert abs(noise["eval_accuracy"] - 1 / 3) < 0.1
    # encoder batching never changes a result
    small = beta_vae_score(encode_good, ds, 0, encode_batch_size=7, **kw)
    assert small == good
    legacy = beta_vae_score(encode_good, ds, 0, classifier="legacy_ovr", **kw)
    assert legacy["eval_accuracy"] >= 0.95


def test_factor_vae_score() -> None:
    ds = FakeFactors()
    kw = {"batch_size": 16, "num_train": 300, "num_eval": 300, "num_variance_estimate": 500}
    good = factor_vae_score(encode_good, ds, 0, **kw)
    mixed = factor_vae_score(encode_mixed, ds, 0, **kw)
    noise = factor_vae_score(encode_noise, ds, 0, **kw)
    assert good["eval_accuracy"] == 1.0
    assert good["num_active_dims"] == 3
    assert mixed["eval_accuracy"] <= 0.8
    assert noise["eval_accuracy"] < 0.6
    dead = factor_vae_score(lambda x: 0.01 * encode_good(x), ds, 0, **kw)
    assert dead == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}


def test_sample_codes_and_evaluate_all() -> None:
    ds = FakeFactors((3, 1, 4, 5))  # a size-1 factor (like dSprites colour) is dropped
    codes, factors = sample_codes_and_factors(encode_good, ds, 50, 0, batch_size=16)
    assert codes.shape == (50, 4) and factors.shape == (50, 4)
    small = {
        "beta_vae": {"batch_size": 8, "num_train": 200, "num_eval": 100},
        "factor_vae": {
            "batch_size": 8,
            "num_train": 200,
            "num_eval": 100,
            "num_variance_estimate": 300,
        },
        "mig": {"num_train": 400},
        "dci": {"num_train": 300, "num_test": 150},
        "sap": {"num_train": 400, "num_test": 200},
        "modularity": {"num_train": 400, "num_test": 200},
        "unsupervised": {"num_train": 400},
    }
    ds.calls = 0
    out = evaluate_all(encode_good, ds, preset="fast", overrides=small, encode_batch_size=512)
    assert out["fast/mig/mig"] >= 0.9
    assert out["fast/factor_vae/eval_accuracy"] == 1.0
    assert out["fast/beta_vae/eval_accuracy"] >= 0.99
    assert out["fast/dci/disentanglement"] >= 0.8
    assert out["fast/factor_vae/num_active_dims"] == 3  # the constant code of colour is inactive
    assert (
        "fast/modularity/explicitness_test" in out and "fast/unsupervised/mutual_info_score" in out
    )
    assert all(isinstance(v, float) for v in out.values())
    # same seed -> the MIG train set equals the train set of SAP / modularity / DCI
    again = evaluate_all(encode_good, ds, preset="fast", overrides=small, metrics=("mig",))
    assert again["fast/mig/mig"] == out["fast/mig/mig"]
    assert set(PRESETS) >= {"default", "dlib", "fast", "clg"}
    with pytest.raises(ValueError, match="unknown preset"):
        evaluate_all(encode_good, ds, preset="nope")


def test_preset_keys_never_collide_and_are_recorded() -> None:
    ds = FakeFactors((3, 4, 5))
    sap_sizes = {"sap": {"num_train": 300, "num_test": 150}}
    canonical = evaluate_all(encode_good, ds, metrics=("sap",), overrides=sap_sizes)
    clg = evaluate_all(encode_good, ds, preset="clg", metrics=("sap",), overrides=sap_sizes)
    assert set(canonical) == {"sap/sap"}  # dlib: LinearSVC SAP under the canonical key
    assert set(clg) == {"clg/sap/sap_continuous"}  # CLG's squared-correlation SAP: its own key
    assert canonical["sap/sap"] != clg["clg/sap/sap_continuous"]
    record = preset_record("clg", 3, {"mig": {"num_train": 50}})
    assert record["preset"] == "clg" and record["seed"] == 3 and record["key_prefix"] == "clg/"
    assert record["settings"]["mig"] == {"num_train": 50, "num_bins": 20, "drop_first_factor": True}
    assert preset_record("default", 0)["settings"]["mig"]["num_train"] == 10_000


def test_clg_logistic_regression_is_unpenalised_without_deprecated_arguments() -> None:
    import warnings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # penalty=None: FutureWarning in 1.8-1.9, error in 1.10
        model = make_logistic_regression(0, "clg").fit(x, y)
    ridge = make_logistic_regression(0, "default").fit(x, y)  # C = 1
    assert np.abs(model.coef_).sum() > np.abs(ridge.coef_).sum()  # no shrinkage
