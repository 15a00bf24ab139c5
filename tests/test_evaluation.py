"""Evaluation: metric formulas against NumPy/scikit-learn, the Frechet distance against an
eigenvalue reference, and evaluate / sample / train through the CLI on a real digits run that
must have learned (held-out noise MSE far below its initial value)."""
import json

import jax
import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from diffusion_jax.evaluation import (feature_statistics, frechet_distance, load_statistics,
                                      prediction_metrics, regression_metrics, save_statistics)
import diffusion_jax as dj
from diffusion_jax.evaluation.metrics import evaluation_inputs, time_buckets


pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    true = rng.standard_normal((50, 4, 4, 1))
    pred = 0.7 * true + 0.3 * rng.standard_normal(true.shape)
    m = regression_metrics(pred, true)
    t, p = true.ravel(), pred.ravel()
    assert m["mse"] == pytest.approx(mean_squared_error(t, p), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(t, p)), rel=1e-12)
    assert m["mae"] == pytest.approx(mean_absolute_error(t, p), rel=1e-12)
    assert m["r2"] == pytest.approx(r2_score(t, p), rel=1e-12)


def test_time_buckets_cover_every_t_once():
    T, buckets = 1000, 10
    b = time_buckets(np.arange(T), buckets)
    assert np.bincount(b, minlength=buckets).tolist() == [100] * 10
    assert np.all(np.diff(b) >= 0)  # contiguous ranges
    process = dj.as_process(dj.make_schedule("linear", T))
    _, t, _ = evaluation_inputs(process, np.zeros((7, 2, 2, 1)), 500, seed=0)
    assert np.bincount(time_buckets(t, buckets)).tolist() == [50] * 10
    assert np.bincount(t // 100).tolist() == [50] * 10  # the equal counts are equal ranges of [0, T)
    # Seeded: the same inputs every time.
    a, b_ = (evaluation_inputs(process, np.ones((3, 2, 2, 1)), 20, 5) for _ in range(2))
    for x, y in zip(a, b_):
        np.testing.assert_array_equal(x, y)


def _reference_fd(mu1, s1, mu2, s2):
    """Tr sqrt(S1 S2) from the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_against_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 16))
    b = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)) * 0.5 + 0.3
    sa, sb = feature_statistics(a), feature_statistics(b)
    assert frechet_distance(*sa, *sb) == pytest.approx(_reference_fd(*sa, *sb), rel=1e-6)
    assert abs(frechet_distance(*sa, *sa)) < 1e-6
    # Near-singular: fewer samples than features.
    c, d = rng.standard_normal((10, 32)), rng.standard_normal((12, 32))
    sc, sd = feature_statistics(c), feature_statistics(d)
    assert frechet_distance(*sc, *sd) == pytest.approx(_reference_fd(*sc, *sd), rel=1e-3)
    assert abs(frechet_distance(*sc, *sc)) < 1e-3
    # Well-conditioned: the same as scipy's matrix square root (pytorch-fid's formula).
    from scipy import linalg
    covmean = linalg.sqrtm(sa[1] @ sb[1]).real
    by_sqrtm = float(((sa[0] - sb[0]) ** 2).sum() + np.trace(sa[1]) + np.trace(sb[1]) - 2 * np.trace(covmean))
    assert frechet_distance(*sa, *sb) == pytest.approx(by_sqrtm, rel=1e-9)


def test_statistics_files(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = save_statistics(tmp_path / "ref.npz", mu, sigma)
    got_mu, got_sigma = load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu) and np.testing.assert_array_equal(got_sigma, sigma)
    with pytest.raises(FileNotFoundError, match="fid-stats"):
        load_statistics(tmp_path / "missing.npz")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits_unet experiment, shortened: 60 steps at batch 64, through the CLI (held-out noise
    MSE 0.24, R^2 0.76)."""
    from diffusion_jax import cli
    workdir = tmp_path_factory.mktemp("digits")
    cli.main(["train", "--config", "experiments/digits_unet.py", "--workdir", str(workdir),
              "--config.train.steps=60", "--config.data.batch_size=64", "--config.optim.warmup_steps=30",
              "--config.train.progress=False", "--config.train.num_sample_images=0",
              "--config.sample.method=ddim", "--config.sample.steps=20", "--config.eval.num_examples=300",
              "--config.eval.num_samples=32", "--config.eval.bpd_examples=4"])
    return workdir


def test_the_digits_classifier_is_scikit_learns_and_is_kept_in_the_user_cache(tmp_path, monkeypatch):
    """The classifier's features and probabilities are scikit-learn's (a small MLP fitted here,
    converted); the fitted weights are written to the user's cache directory, read back by the
    next process instead of fitting again, and fitted again when the file is unreadable."""
    from sklearn.neural_network import MLPClassifier

    from diffusion_jax.data.sources import load_digits
    from diffusion_jax.evaluation import digits_features as df

    train = load_digits("train")
    x = train.model_range()[:300]
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=30, random_state=0)
    clf.fit(x.reshape(300, -1), train.labels[:300])
    small = df.from_sklearn(clf)
    # scikit-learn computes in the float32 of its inputs and weights, ours in float64
    np.testing.assert_allclose(df.class_probabilities(small, x), clf.predict_proba(x.reshape(300, -1)),
                               rtol=1e-5, atol=1e-7)

    fits = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(df, "fit_digits_classifier", lambda: fits.append(1) or small)
    try:
        df.digits_classifier.cache_clear()
        df.digits_features(x)
        path = df.cache_path()
        assert len(fits) == 1 and path.parent == tmp_path / "diffusion_jax" and path.exists()
        df.digits_classifier.cache_clear()  # a new process
        loaded = df.digits_classifier()
        assert len(fits) == 1
        for a, b in zip(loaded, small):
            np.testing.assert_array_equal(a, b)
        path.write_bytes(b"not an npz")
        df.digits_classifier.cache_clear()
        df.digits_classifier()
        assert len(fits) == 2
    finally:
        df.digits_classifier.cache_clear()


@pytest.mark.xdist_group("digits_run")
def test_digits_run_learns_and_evaluate_writes_the_report(digits_run):
    from diffusion_jax.runs import load_run
    from diffusion_jax.data import load_digits

    run = load_run(digits_run)
    held_out = load_digits("validation").model_range()
    zero_params = jax.tree_util.tree_map(np.zeros_like, run.ema_params)
    denoise = lambda p: (lambda x, t: run.model.apply({"params": p}, x, t))
    initial = prediction_metrics(denoise(zero_params), run.schedule, held_out, num_examples=300)
    from diffusion_jax import cli
    cli.main(["evaluate", "--workdir", str(digits_run)])  # the README's command
    m1 = json.loads((digits_run / "eval" / "metrics.json").read_text())
    assert initial["noise_mse"] == pytest.approx(1.0, abs=0.05)  # zero output: E[eps^2] = 1
    assert m1["noise_mse"] < 0.35 * initial["noise_mse"] and m1["noise_r2"] > 0.6, m1["noise_mse"]
    out = digits_run / "eval"
    for name in ("metrics.json", "samples.png", "reverse_process.png", "per_timestep.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("noise_mse", "noise_rmse", "noise_mae", "noise_r2", "per_timestep", "bpd", "digits_fd"):
        assert key in saved
    assert len(saved["per_timestep"]) == 10 and sum(r["count"] for r in saved["per_timestep"]) == 300
    assert 0 < saved["bpd"]["total_bpd"] < 8 and np.isfinite(saved["digits_fd"])
    # the ODE likelihood of the DDPM model in continuous time, beside the bound (4 images: loose)
    assert "continuous time" in saved["bpd_ode"]["likelihood"] and 0 < saved["bpd_ode"]["total_bpd"] < 10
    report = (out / "report.md").read_text()
    assert "Noise prediction" in report and "variational bound" in report and "probability-flow ODE" in report
    # seeded: the report's noise metrics are those of the EMA parameters on the run's evaluation set
    again = prediction_metrics(denoise(run.ema_params), run.schedule, held_out, num_examples=300,
                                     seed=run.config.eval.seed)
    assert again["noise_mse"] == m1["noise_mse"] and again["per_timestep"] == m1["per_timestep"]


@pytest.mark.xdist_group("digits_run")
def test_sample_command_writes_npz_and_png(digits_run, tmp_path):
    from diffusion_jax import cli
    out = tmp_path / "samples.npz"
    cli.main(["sample", "--workdir", str(digits_run), "--num_samples", "10", "--method", "dpm++_2m",
              "--steps", "10", "--option", "sigmas=karras", "--seed", "3", "--out", str(out)])  # README
    samples = np.load(out)["samples"]
    assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.float32
    assert -1.0 <= samples.min() and samples.max() <= 1.0 and samples.std() > 0.1
    assert (tmp_path / "samples.png").exists()
    stats = tmp_path / "digits_stats.npz"
    cli.main(["fid-stats", "--dataset", "digits", "--split", "train", "--features", "digits",
              "--image_size", "8", "--channels", "1", "--out", str(stats)])
    mu, sigma = load_statistics(stats)
    assert mu.shape == (64,) and sigma.shape == (64, 64)
