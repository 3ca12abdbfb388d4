"""Time the disentanglement metric cores at disentanglement_lib sample sizes and check them.

Data: the dSprites factor grid used by dlib (shape 3, scale 6, orientation 40, posX 32, posY 32),
factors drawn uniformly with a seeded RNG; 10-d float32 codes = a noisy linear mix of the scaled
factors (each factor mostly in one code, some leakage) plus 5 nuisance codes. Train 10,000 and
test 5,000 points (``metrics.md`` §9 "dlib" preset; MIG and the unsupervised scores use the
train set only).

Each metric is compared with a straightforward reference written the dlib way (Python loops
over sklearn ``mutual_info_score``, ``np.histogram`` + ``np.digitize``, ``scipy.linalg.sqrtm``,
``MultiLabelBinarizer``); DCI's reference is sklearn's ``GradientBoostingClassifier`` (the
canonical estimator, minutes on 2 cores), next to the numba estimator ``estimator="fast"``
(``dci_fast``, in the timed suite).
Timings are wall-clock seconds after one warm-up call on small data (numba / joblib start-up is
reported separately). The machine's load average is recorded, since timings on a shared machine
move with it.

Usage::

    python benchmarks/bench_disentanglement_metrics.py [--out PATH] [--skip-gbt] [--reuse-gbt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.linalg
import scipy.stats
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score, roc_auc_score
from sklearn.preprocessing import MultiLabelBinarizer
from sklearn.svm import LinearSVC

from latentzoo.metrics.disentanglement import (
    dci,
    importance_matrix,
    mig,
    modularity_explicitness,
    sap,
    unsupervised,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "disentanglement_metrics.json"
FACTOR_SIZES = (3, 6, 40, 32, 32)  # dlib dsprites_full without colour


def make_data(
    seed: int, num_train: int, num_test: int, num_codes: int = 10, noise: float = 0.05
) -> tuple[np.ndarray, ...]:
    """Factors (N, 5) and float32 codes (N, num_codes): noisy linear mix + nuisance codes."""
    rng = np.random.default_rng(seed)
    k = len(FACTOR_SIZES)
    mix = np.zeros((k, num_codes))
    mix[np.arange(k), rng.permutation(num_codes)[:k]] = rng.uniform(0.5, 2.0, k)
    mix += (rng.random((k, num_codes)) < 0.3) * 0.2 * rng.standard_normal((k, num_codes))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        factors = np.stack([rng.integers(0, s, n) for s in FACTOR_SIZES], axis=1)
        z = factors / (np.asarray(FACTOR_SIZES) - 1.0)
        codes = z @ mix + noise * rng.standard_normal((n, num_codes))
        return codes.astype(np.float32), factors

    c_tr, f_tr = draw(num_train)
    c_te, f_te = draw(num_test)
    return c_tr, f_tr, c_te, f_te


# ------------------------------------------------------------------ straightforward references


def _ref_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    out = np.zeros_like(codes)
    for i in range(codes.shape[1]):
        out[:, i] = np.digitize(codes[:, i], np.histogram(codes[:, i], num_bins)[1][:-1])
    return out


def _ref_mi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = np.zeros((a.shape[1], b.shape[1]))
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            m[i, j] = mutual_info_score(b[:, j], a[:, i])
    return m


def ref_mig(codes: np.ndarray, factors: np.ndarray) -> dict[str, float]:
    m = _ref_mi(_ref_discretize(codes), factors)
    h = np.array([mutual_info_score(factors[:, j], factors[:, j]) for j in range(factors.shape[1])])
    s = np.sort(m, axis=0)[::-1]
    return {"mig": float(np.mean((s[0] - s[1]) / h))}


def ref_sap(c_tr, f_tr, c_te, f_te) -> dict[str, float]:
    s = np.zeros((c_tr.shape[1], f_tr.shape[1]))
    for i in range(c_tr.shape[1]):
        for j in range(f_tr.shape[1]):
            clf = LinearSVC(C=0.01, class_weight="balanced", dual="auto", random_state=0)
            clf.fit(c_tr[:, i : i + 1].astype(np.float64), f_tr[:, j])
            s[i, j] = np.mean(clf.predict(c_te[:, i : i + 1].astype(np.float64)) == f_te[:, j])
    srt = np.sort(s, axis=0)
    return {"sap": float(np.mean(srt[-1] - srt[-2]))}


def ref_modularity_explicitness(c_tr, f_tr, c_te, f_te) -> dict[str, float]:
    m = _ref_mi(_ref_discretize(c_tr), f_tr)
    sq = m**2
    mx = sq.max(axis=1)
    mod = 1.0 - (sq.sum(axis=1) - mx) / (mx * (sq.shape[1] - 1.0))
    mod[mx == 0] = 0.0
    x_tr = c_tr.astype(np.float64)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    x_tr, x_te = (x_tr - mean) / std, (c_te.astype(np.float64) - mean) / std
    tr, te = [], []
    for j in range(f_tr.shape[1]):
        clf = LogisticRegression(max_iter=1000, random_state=0).fit(x_tr, f_tr[:, j])
        mlb = MultiLabelBinarizer()
        tr.append(roc_auc_score(mlb.fit_transform(f_tr[:, j, None]), clf.predict_proba(x_tr)))
        te.append(roc_auc_score(mlb.fit_transform(f_te[:, j, None]), clf.predict_proba(x_te)))
    return {
        "modularity": float(np.mean(mod)),
        "explicitness_train": float(np.mean(tr)),
        "explicitness_test": float(np.mean(te)),
    }


def ref_unsupervised(codes: np.ndarray) -> dict[str, float]:
    cov = np.cov(codes.astype(np.float64), rowvar=False)
    tc = 0.5 * (np.sum(np.log(np.diag(cov))) - np.linalg.slogdet(cov)[1])
    sqrtm = scipy.linalg.sqrtm(cov * np.diag(cov)[:, None])
    wc = float(2 * np.trace(cov) - 2 * np.real(np.trace(sqrtm)))
    disc = _ref_discretize(codes)
    mi = _ref_mi(disc, disc)
    np.fill_diagonal(mi, 0)
    n = codes.shape[1]
    return {
        "gaussian_total_correlation": float(tc),
        "gaussian_wasserstein_correlation": wc,
        "gaussian_wasserstein_correlation_norm": wc / float(np.trace(cov)),
        "mutual_info_score": float(mi.sum() / (n * n - n)),
    }


def ref_dci_scores(r: np.ndarray, acc_tr: np.ndarray, acc_te: np.ndarray) -> dict[str, float]:
    """dlib's D / C formulas with scipy.stats.entropy, on a given importance matrix."""
    d_code = 1.0 - scipy.stats.entropy(r.T + 1e-11, base=r.shape[1])
    c_fac = 1.0 - scipy.stats.entropy(r + 1e-11, base=r.shape[0])
    return {
        "disentanglement": float(np.sum(d_code * r.sum(axis=1) / r.sum())),
        "completeness": float(np.sum(c_fac * r.sum(axis=0) / r.sum())),
        "informativeness_train": float(np.mean(acc_tr)),
        "informativeness_test": float(np.mean(acc_te)),
    }


# --------------------------------------------------------------------------------- harness


def timed(fn: Callable[[], dict[str, float]]) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--num-test", type=int, default=5000)
    parser.add_argument("--skip-gbt", action="store_true", help="skip the canonical sklearn GBT")
    parser.add_argument(
        "--reuse-gbt", action="store_true", help="reuse the GBT entry of --out if configs match"
    )
    args = parser.parse_args()
    config = {
        "seed": args.seed,
        "num_train": args.num_train,
        "num_test": args.num_test,
        "factor_sizes": FACTOR_SIZES,
        "num_codes": 10,
        "noise": 0.05,
    }
    c_tr, f_tr, c_te, f_te = make_data(args.seed, args.num_train, args.num_test)
    load_before = os.getloadavg()

    # warm-up on small data: numba JIT / cache load, joblib workers, sklearn imports
    warm: dict[str, float] = {}
    small = (c_tr[:500], f_tr[:500], c_te[:200], f_te[:200])
    _, warm["dci_fast"] = timed(lambda: dci(*small, estimator="fast"))
    _, warm["sap"] = timed(lambda: sap(*small))
    _, warm["modularity"] = timed(lambda: modularity_explicitness(*small))

    ours = {
        "mig": lambda: mig(c_tr, f_tr),
        "dci_fast": lambda: dci(c_tr, f_tr, c_te, f_te, estimator="fast"),
        "sap": lambda: sap(c_tr, f_tr, c_te, f_te),
        "modularity": lambda: modularity_explicitness(c_tr, f_tr, c_te, f_te),
        "unsupervised": lambda: unsupervised(c_tr),
    }
    refs = {
        "mig": lambda: ref_mig(c_tr, f_tr),
        "sap": lambda: ref_sap(c_tr, f_tr, c_te, f_te),
        "modularity": lambda: ref_modularity_explicitness(c_tr, f_tr, c_te, f_te),
        "unsupervised": lambda: ref_unsupervised(c_tr),
    }
    results: dict[str, Any] = {}
    for name, fn in ours.items():
        value, seconds = timed(fn)
        results[name] = {"value": value, "seconds": seconds}
        if name in refs:
            ref_value, ref_seconds = timed(refs[name])
            results[name]["reference"] = ref_value
            results[name]["reference_seconds"] = ref_seconds
            results[name]["max_abs_diff"] = max(abs(value[k] - ref_value[k]) for k in value)

    previous = {}
    if args.reuse_gbt and args.out.exists():
        previous = json.loads(args.out.read_text())
    if previous.get("config") == json.loads(json.dumps(config)) and "dci_gbt" in previous.get(
        "results", {}
    ):
        results["dci_gbt"] = previous["results"]["dci_gbt"] | {"reused": True}
    elif not args.skip_gbt:
        (r, acc_tr, acc_te), seconds = timed(
            lambda: importance_matrix(c_tr, f_tr, c_te, f_te, estimator="gbt")
        )
        results["dci_gbt"] = {
            "value": ref_dci_scores(r, acc_tr, acc_te),
            "seconds": seconds,
            "importance": r.tolist(),
        }
    if "dci_gbt" in results:
        gbt = results["dci_gbt"]["value"]
        for name in ("dci_fast",):
            fast = results[name]["value"]
            results[name]["reference"] = gbt
            results[name]["max_abs_diff"] = max(abs(fast[k] - gbt[k]) for k in fast)
            results[name]["reference_seconds"] = results["dci_gbt"]["seconds"]

    suite = ("mig", "dci_fast", "sap", "modularity")
    total = sum(results[k]["seconds"] for k in suite)
    out = {
        "config": config,
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "sklearn": sklearn.__version__,
        },
        "warmup_seconds": warm,
        "results": results,
        "suite_seconds_mig_dci_sap_modularity": total,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))

    print(
        f"{'metric':<14}{'score':<26}{'ours':>10}{'reference':>11}{'|diff|':>10}"
        f"{'t ours s':>10}{'t ref s':>10}"
    )
    for name, res in results.items():
        if name == "dci_gbt":
            continue
        for key, val in res["value"].items():
            ref = res.get("reference", {}).get(key, float("nan"))
            ref_t = res.get("reference_seconds", float("nan"))
            print(
                f"{name:<14}{key:<26}{val:>10.5f}{ref:>11.5f}{abs(val - ref):>10.5f}"
                f"{res['seconds']:>10.2f}{ref_t:>10.2f}"
            )
    if "dci_gbt" in results:
        note = " (reused)" if results["dci_gbt"].get("reused") else ""
        print(
            f"DCI reference = sklearn GradientBoostingClassifier, "
            f"{results['dci_gbt']['seconds']:.1f} s{note}"
        )
    print(
        f"MIG + DCI(fast) + SAP + modularity/explicitness: {total:.2f} s "
        f"(load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"{os.cpu_count()} CPUs); warm-up {warm}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
