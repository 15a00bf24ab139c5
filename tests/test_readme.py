"""The README's functional-API example runs as written."""
import pathlib
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    params, opt_state, loss = namespace["train_step"](namespace["params"], namespace["opt_state"],
                                                      namespace["x0"], namespace["jax"].random.key(3))
    assert np.isfinite(float(loss))
    assert namespace["images"].shape == (64, 8, 8, 1)
    # "new params, key or eta: no recompilation": the trained parameters are sampled by the same program
    again = namespace["sampler"](params, namespace["jax"].random.key(4), 0.5)
    assert namespace["sampler"]._cache_size() == 1 and np.abs(np.asarray(again) - namespace["images"]).max() > 0


def test_readme_flow_matching_example_runs():
    """The ten-line flow-matching example of "Processes and objectives": at initialisation the U-Net
    outputs 0 (its last convolution starts at zero), so with x0 = 0 the velocity loss is
    E[(eps - x0)^2] = 1 up to Monte Carlo error; its gradient reaches that convolution; the Euler
    chain returns images of the shape asked for."""
    import jax

    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if 'make_process("flow"' in b]
    assert len(blocks) == 1
    assert len([line for line in blocks[0].splitlines() if line.strip()]) <= 13  # ten lines and the imports
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    loss = float(jax.jit(namespace["loss_fn"])(namespace["params"], jax.random.key(5)))
    assert abs(loss - 1.0) < 4 * np.sqrt(2.0 / (64 * 8 * 8)), loss
    norms = [float(np.abs(g).sum()) for g in jax.tree_util.tree_leaves(namespace["grads"])]
    assert all(np.isfinite(norms)) and max(norms) > 0
    assert namespace["images"].shape == (64, 8, 8, 1) and np.all(np.isfinite(namespace["images"]))
