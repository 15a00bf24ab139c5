"""The FID Inception port: builds, gives 2048 pool3 features on 299x299 inputs, loads a weights
file in the documented .npz format (a synthetic one with the right tree), and a missing or
mismatched file is a clear error."""
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from diffusion_jax.evaluation.inception import (inception_features, load_inception, save_weights,
                                                variable_shapes)
from diffusion_jax.models import count_params


pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("inception")]  # the full tier; one weights file

def synthetic_weights(seed=0):
    """He-initialised kernels and identity batch norms, written with NumPy (no jit init)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten_dict(variable_shapes()).items():
        if path[-1] == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            out[path] = rng.standard_normal(leaf.shape).astype(np.float32) * np.sqrt(2.0 / fan_in)
        elif path[-1] in ("scale", "var"):
            out[path] = np.ones(leaf.shape, np.float32)
        else:
            out[path] = np.zeros(leaf.shape, np.float32)
    return unflatten_dict(out)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """`synthetic_weights` written by `save_weights` (87 MB: once for the module's tests)."""
    return save_weights(synthetic_weights(), tmp_path_factory.mktemp("inception") / "inception_fid.npz")


def test_inception_features_from_a_weights_file(weights_file):
    shapes = variable_shapes()
    # torchvision's Inception-v3 without the auxiliary head and fc: 21.8M parameters.
    assert count_params(shapes["params"]) == 21_785_568
    variables = load_inception(weights_file)
    rng = np.random.default_rng(1)
    small = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    features = inception_features(variables, small)
    assert features.shape == (2, 2048) and np.isfinite(features).all() and features.std() > 0
    assert not np.allclose(features[0], features[1])
    # Grey images are repeated to RGB; a 299x299 batch needs no resize.
    grey = inception_features(variables, rng.uniform(-1, 1, (1, 299, 299, 1)).astype(np.float32))
    assert grey.shape == (1, 2048)


def test_missing_and_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert"):
        load_inception(tmp_path / "nowhere.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"params/Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 32), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        load_inception(bad)


def test_fid_stats_command_and_fid_of_a_set_against_itself(tmp_path, weights_file):
    from diffusion_jax import cli
    from diffusion_jax.data import load_digits
    from diffusion_jax.evaluation import feature_statistics, frechet_distance, load_statistics
    weights = weights_file
    stats = tmp_path / "digits_inception.npz"
    cli.main(["fid-stats", "--dataset", "digits", "--split", "train", "--image_size", "8", "--channels", "1",
              "--features", "inception", "--inception_weights", str(weights), "--max_images", "6",
              "--out", str(stats)])
    mu, sigma = load_statistics(stats)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    images = load_digits("train").model_range(slice(0, 6))
    features = inception_features(load_inception(weights), images)
    np.testing.assert_allclose(features.mean(0), mu, rtol=1e-5, atol=1e-7)  # the same pipeline
    same = frechet_distance(*feature_statistics(features), mu, sigma)
    # 6 images in 2048 dimensions: singular covariances, regularised by eps = 1e-6 on the diagonal.
    assert abs(same) < 0.01 < float(np.trace(sigma)), (same, np.trace(sigma))
