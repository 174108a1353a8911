"""Test set-up: 8 simulated CPU devices, set before jax is first imported.

Tests compile many small programs and run each a few times, so XLA's CPU
backend is told to spend little time optimising (about 3x faster compiles).
"""

import os

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def prepared_catalogue(tmp_path_factory):
  """A small synthetic catalogue run through `prepare`: (catalogue dir, data dir)."""
  from item_jax.data.prepare import prepare
  from item_jax.data.synth import synthesize
  root = tmp_path_factory.mktemp("catalogue")
  synthesize(str(root / "catalogue"), num_products=40, seed=0, image_size=48,
             num_workers=1)
  prepare(str(root / "catalogue" / "catalogue.csv"), str(root / "catalogue" / "images"),
          str(root / "prepared"), num_shards=8, vocab_size=300, num_workers=1)
  return root / "catalogue", root / "prepared"
