r"""The command line: one config, one workdir, one stage.

  python -m sage_opd_jax.main --config=configs/alfworld_cpu.py:sage_opd \
      --config.train.num_steps=100 --workdir=workdirs/sage_opd

`config.stage` picks what runs: pipeline (every stage below, resumable) | collect_demos |
sft | distill | evaluate | export.
The config is validated (`sage_opd_jax.config.validate`) before anything is built or
compiled; a workdir that already holds checkpoints resumes from the latest one.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from sage_opd_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (and :argument).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, TensorBoard, transcripts.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_init_distributed() -> None:
  """Joins JAX's multi-host runtime when the launcher says there are several processes.

  On a TPU pod or a multi-node GPU job, `jax.distributed.initialize()` reads the
  coordinator from the environment; a single process skips it.
  """
  import jax  # Imported here: flags must parse before JAX reads XLA_FLAGS.

  if int(os.environ.get("JAX_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "1"))) > 1 or os.environ.get(
      "JAX_COORDINATOR_ADDRESS"
  ):
    jax.distributed.initialize()


# XLA:CPU keeps its compiled kernels in memory maps of their own (~100 for a 30-op toy program;
# jax.clear_caches frees them), and a pipeline stage compiles many bucketed shapes: an ALFWorld
# distill stage held ~50,000 maps after four minutes. Past the kernel's vm.max_map_count (65530
# by default) LLVM fails with "Cannot allocate memory" and the process dies.
_MIN_MAP_COUNT = 262144
_MAP_COUNT_FILE = "/proc/sys/vm/max_map_count"


def map_count_warning(max_map_count: int | None, backend: str) -> str | None:
  """The warning to log when a CPU run may exhaust the kernel's memory-map limit, else None."""
  if backend != "cpu" or max_map_count is None or max_map_count >= _MIN_MAP_COUNT:
    return None
  return (f"vm.max_map_count={max_map_count} ({_MAP_COUNT_FILE}): long CPU stages compile enough XLA kernels "
          f"to exceed it, and LLVM then fails with 'Cannot allocate memory'. Raise it (as root): "
          f"sysctl -w vm.max_map_count={4 * _MIN_MAP_COUNT}. A stage killed that way resumes on re-running.")


def _warn_low_map_count() -> None:
  import jax

  try:
    with open(_MAP_COUNT_FILE, encoding="ascii") as f:
      limit = int(f.read())
  except (OSError, ValueError):  # Not Linux, or no procfs: nothing to check.
    limit = None
  if (message := map_count_warning(limit, jax.default_backend())) is not None:
    logging.warning(message)


def _use_compilation_cache(cache_dir: str) -> None:
  """Points JAX's persistent compilation cache at `cache_dir` ('' leaves it off).

  A resumed run, a rerun and every pipeline stage then load the programs an earlier process
  compiled (the same jitted functions at the same shapes) instead of compiling them again.
  A JAX_COMPILATION_CACHE_DIR set in the environment (as the tests set it) wins.
  """
  import jax

  if cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))


def run(config, workdir: str) -> None:
  """Runs `config.stage` in `workdir`; the CLI and the experiment pipelines both call this."""
  config_lib.validate(config)
  _use_compilation_cache(config.compilation_cache_dir)
  os.makedirs(workdir, exist_ok=True)
  stage = config.stage
  if stage == "pipeline":
    from sage_opd_jax import pipeline

    pipeline.run(config, workdir)
  elif stage == "collect_demos":
    from sage_opd_jax import pipeline

    pipeline.collect_stage(config, workdir)
  elif stage in ("sft", "distill"):
    from sage_opd_jax import train

    train.train(config, workdir)
  elif stage == "evaluate":
    from sage_opd_jax import train

    train.evaluate_stage(config, workdir)
  elif stage == "export":
    from sage_opd_jax import train

    train.export_stage(config, workdir)
  else:  # validate() already rejects it; kept so a new stage cannot be silently ignored.
    raise ValueError(f"config.stage={stage!r} has no runner.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")
  # Libraries that log through absl (orbax prints every option it was built with) stay
  # at warnings; the stages' own progress logs at info.
  logging.getLogger("absl").setLevel(logging.WARNING)
  _maybe_init_distributed()
  _warn_low_map_count()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
