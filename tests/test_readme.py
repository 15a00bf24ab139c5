"""The README's functional-API example runs as written."""
import pathlib
import re

import numpy as np

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
