"""Shared test set-up: 8 fake CPU devices for the sharding tests, and tiny fixtures."""

import os

# Must happen before jax is imported anywhere: the sharded-vs-unsharded tests need a mesh
# of 8 devices, and every other test simply runs on the first of them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
