"""Test set-up, before JAX starts: 8 virtual CPU devices for the sharding tests, and a
persistent compilation cache shared by the tests and the processes they launch (identical
programs -- a resumed run, the multi-host workers -- compile once)."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
