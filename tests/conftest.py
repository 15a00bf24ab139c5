"""Test set-up: 8 virtual CPU devices for the sharding tests (set before JAX starts)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
