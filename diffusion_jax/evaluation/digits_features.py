"""An offline feature extractor for the 8x8 digits, so a Frechet distance (FD) can be measured
without Inception weights: a small MLP classifier fitted (seeded) on the digits train split;
its hidden layer gives the features, its prediction the class of a sample."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def digits_classifier():
    from sklearn.neural_network import MLPClassifier

    from diffusion_jax.data.sources import load_digits

    train = load_digits("train")
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0)
    clf.fit(train.model_range().reshape(len(train.images), -1), train.labels)
    return clf


def digits_features(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8, 1] in [-1, 1] -> [N, 64] hidden ReLU features of the digits classifier."""
    clf = digits_classifier()
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def digits_predict(images: np.ndarray):
    """(class [N], confidence [N]) of the digits classifier."""
    clf = digits_classifier()
    proba = clf.predict_proba(np.asarray(images, np.float64).reshape(len(images), -1))
    return proba.argmax(1), proba.max(1)
