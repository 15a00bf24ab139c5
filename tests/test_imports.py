"""The core imports with jax/flax/optax alone: TensorFlow (and torch and diffusers, which the
interop tests compare against) are blocked in a fresh interpreter."""
import subprocess
import sys

CORE = ["diffusion_jax", "diffusion_jax.schedules", "diffusion_jax.diffusion",
        "diffusion_jax.likelihood", "diffusion_jax.samplers", "diffusion_jax.models",
        "diffusion_jax.models.vae", "diffusion_jax.interop", "diffusion_jax.latents"]


def test_core_imports_without_tensorflow():
    code = ("import sys\n"
            "sys.modules['tensorflow'] = None\nsys.modules['tensorflow_datasets'] = None\n"
            "sys.modules['torch'] = None\nsys.modules['diffusers'] = None\n"
            + "".join(f"import {m}\n" for m in CORE)
            + "assert 'tensorflow' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
