"""Every process x sampler x prediction on Gaussian data with the exact model (the predictions
besides each process's own, which tests/test_process_samplers.py runs in the quick tier): the chain
equals a float64 NumPy implementation of the same algorithm, and its moments the algorithm's exact
ones, which approach N(mu, s^2) as the steps grow."""
import pytest

from diffusion_jax.samplers.process import METHODS
from tests.test_process_samplers import NATURAL, check_gaussian_chain

CASES = [(name, method, prediction) for name in NATURAL for method in sorted(METHODS)
         for prediction in ("eps", "x0", "v", "velocity") if prediction != NATURAL[name]]


@pytest.mark.parametrize("name,method,prediction", CASES)
def test_gaussian_data_is_sampled_as_the_float64_algorithm_does_for_every_prediction(name, method, prediction):
    check_gaussian_chain(name, method, prediction)
