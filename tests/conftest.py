"""Shared test set-up: 8 fake CPU devices for the sharding tests, and tiny fixtures.

A test that needs what a machine may lack (the ALFWorld games, Java) skips without it, and
fails instead when `$CI` is set (`.ci/run` sets it): CI never passes by skipping.
"""

import os
import pathlib
import shutil
import tempfile

import pytest  # Light: pytest is loaded already, and it does not import jax.

# Must happen before jax is imported anywhere: the sharded-vs-unsharded tests need a mesh
# of 8 devices, and every other test simply runs on the first of them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this pytest run's processes (the CLI tests start their
# own, and pytest-xdist's workers inherit it from the process that starts them): a program
# another test, worker or subprocess already compiled is loaded, not compiled again. Fresh per
# pytest run, so a test never runs a program an older checkout compiled.
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if not _XDIST_WORKER:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sage_opd_xla_")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # The tiny models compile in < 1 s.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session):
  """Builds the hand-written ALFWorld fixture games: game files are never tracked in git.

  Under pytest-xdist the process that starts the workers builds them once, before any worker
  runs, so no worker reads a game file another is writing.
  """
  del session
  if _XDIST_WORKER:
    return
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
  import make_alfworld_fixture

  make_alfworld_fixture.write_games()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _XDIST_WORKER:  # The cache is shared: the starting process removes it after every worker is done.
    return
  shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def missing(requirement: str) -> None:
  """Skips the calling test for lack of `requirement`, or fails it when `$CI` is set."""
  if os.environ.get("CI"):
    pytest.fail(f"{requirement} (CI is set, so a missing requirement fails rather than skips.)", pytrace=False)
  pytest.skip(requirement)


def real_alfworld_data():
  """The unpacked ALFWorld games (`$ALFWORLD_DATA/json_2.1.1`); `missing` says how to get them.

  Not a skipif on the variable alone: importing alfworld sets it to ~/.cache/alfworld.
  """
  data = os.environ.get("ALFWORLD_DATA", "")
  if not (pathlib.Path(data) / "json_2.1.1" / "valid_unseen").is_dir():
    missing("ALFWorld games not found: set ALFWORLD_DATA to the folder holding json_2.1.1/ "
            '(here: export ALFWORLD_DATA="$(../shared/alfworld/unpack)").')
  return pathlib.Path(data)


@pytest.fixture(scope="session")
def java():
  """ScienceWorld's engine runs in a JVM. Session-scoped, so it is checked before any
  module-scoped fixture starts the engine."""
  from sage_opd_jax.envs import scienceworld  # Imported when used: this module runs before jax is set up.

  if not scienceworld.java_available():
    missing("ScienceWorld needs Java: no `java` on PATH (apt-get install default-jre-headless).")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory):
  """Qwen3's real tokenizer (`tokenization.build_qwen3_tokenizer`), built once per session (~10 s)."""
  from sage_opd_jax import tokenization  # Imported when used: this module runs before jax is set up.

  return tokenization.build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3") / "tokenizer")


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_tokenizer_dir):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
