"""An offline feature extractor for the 8x8 digits, so a Frechet distance (FD) can be measured
without Inception weights: a small MLP classifier fitted (seeded) on the digits train split;
its hidden layer gives the features, its prediction the class of a sample.

The fit takes ~6 s on a CPU core, so its weights are kept in the user's cache directory
(`user_cache.user_cache_dir()`), keyed by the fit's settings and scikit-learn's version: every
later process (an evaluation, the batch job's FID) reads them back, and needs no scikit-learn.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
from typing import NamedTuple

import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.files import write_atomically

log = logging.getLogger(__name__)

FIT = {"hidden_layer_sizes": (64,), "max_iter": 600, "random_state": 0}


class DigitsClassifier(NamedTuple):
    """A one-hidden-layer MLP: features relu(x w0 + b0) [N, 64], class probabilities
    softmax(features w1 + b1) [N, 10]; x is [N, 64], an image flattened, in [-1, 1]."""

    w0: np.ndarray
    b0: np.ndarray
    w1: np.ndarray
    b1: np.ndarray


def from_sklearn(clf) -> DigitsClassifier:
    """The weights of a fitted scikit-learn MLPClassifier (one hidden ReLU layer, softmax out)."""
    if len(clf.coefs_) != 2 or clf.activation != "relu" or clf.out_activation_ != "softmax":
        raise UsageError("expected a one-hidden-layer ReLU MLPClassifier with more than two classes")
    return DigitsClassifier(*(np.asarray(a, np.float64) for a in
                              (clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1], clf.intercepts_[1])))


def fit_digits_classifier() -> DigitsClassifier:
    from sklearn.neural_network import MLPClassifier

    from diffusion_jax.data.sources import load_digits

    train = load_digits("train")
    clf = MLPClassifier(**FIT)
    clf.fit(train.model_range().reshape(len(train.images), -1), train.labels)
    return from_sklearn(clf)


def cache_path():
    """Where the fitted weights are kept: named by a digest of the fit's settings and
    scikit-learn's version (another version may fit other weights)."""
    from importlib.metadata import version

    from diffusion_jax.user_cache import user_cache_dir

    key = hashlib.sha256(repr((sorted(FIT.items()), version("scikit-learn"))).encode()).hexdigest()[:16]
    return user_cache_dir() / f"digits_classifier_{key}.npz"


@functools.lru_cache(maxsize=1)
def digits_classifier() -> DigitsClassifier:
    """The classifier from the cache, else fitted and written there (atomically; a file that
    cannot be read is fitted again, a directory that cannot be written only logs)."""
    path = cache_path()
    try:
        with np.load(path) as f:
            return DigitsClassifier(*(f[name] for name in DigitsClassifier._fields))
    except (OSError, KeyError, ValueError):
        pass
    clf = fit_digits_classifier()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **clf._asdict())
        write_atomically(path, buffer.getvalue())
    except OSError as e:
        log.debug("digits classifier not cached at %s: %s", path, e)
    return clf


def _hidden(clf: DigitsClassifier, images) -> np.ndarray:
    images = np.asarray(images, np.float64)
    if images.shape[1:] != (8, 8, 1):
        raise UsageError(f"the digits features take 8x8x1 images (the digits data set's), got images of shape "
                         f"{'x'.join(map(str, images.shape[1:]))}: use --features inception for other images")
    x = images.reshape(len(images), -1)
    return np.maximum(x @ clf.w0 + clf.b0, 0.0)


def digits_features(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8, 1] in [-1, 1] -> [N, 64] hidden ReLU features of the digits classifier."""
    return _hidden(digits_classifier(), images)


def class_probabilities(clf: DigitsClassifier, images) -> np.ndarray:
    """[N, 8, 8, 1] in [-1, 1] -> [N, 10] softmax probabilities (scikit-learn's predict_proba)."""
    logits = _hidden(clf, images) @ clf.w1 + clf.b1
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def digits_predict(images: np.ndarray):
    """(class [N], confidence [N]) of the digits classifier."""
    proba = class_probabilities(digits_classifier(), images)
    return proba.argmax(1), proba.max(1)
