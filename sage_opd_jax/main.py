r"""The command line: one config, one workdir, one stage.

  python -m sage_opd_jax.main --config=configs/alfworld_cpu.py:sage_opd \
      --config.train.num_steps=100 --workdir=workdirs/sage_opd

`config.stage` picks what runs: pipeline (every stage below, resumable) | collect_demos |
sft | distill | evaluate | export.
The config is validated (`sage_opd_jax.config.validate`) before anything is built or
compiled; a workdir that already holds checkpoints resumes from the latest one.

Several processes (hosts, or one process per GPU) run one job with one mesh over all their
devices: start the same command in each, with the same --workdir on a shared filesystem, and

  --coordinator_address=HOST:PORT  (process 0's host; or $JAX_COORDINATOR_ADDRESS)
  --num_processes=P                (or $JAX_NUM_PROCESSES)
  --process_id=I                   (0..P-1; or $JAX_PROCESS_ID)

Under SLURM (srun, one task per host or GPU) and on a Cloud TPU pod slice, leave them unset:
`jax.distributed.initialize` reads the cluster. The sft, distill, evaluate and export stages run
on several processes (docs/reproducing.md); pipeline and collect_demos run in one.
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0's coordinator in a multi-process run (default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ["JAX_NUM_PROCESSES"]) if os.environ.get("JAX_NUM_PROCESSES") else None,
    "Processes of the run (default $JAX_NUM_PROCESSES; unset: one, or what SLURM or a TPU pod says).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ["JAX_PROCESS_ID"]) if os.environ.get("JAX_PROCESS_ID") else None,
    "This process's index, 0..num_processes-1 (default $JAX_PROCESS_ID).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds to wait for the coordinator and the other processes to join.")
flags.mark_flags_as_required(["config", "workdir"])


def _launched_by_cluster() -> bool:
  """Whether SLURM or a Cloud TPU pod started several processes (JAX reads which from its environment)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or len([h for h in hosts.split(",") if h]) > 1


def _maybe_init_distributed() -> None:
  """Joins JAX's multi-host runtime when the flags or the cluster say there are several processes.

  A single process skips it. An unreachable coordinator fails with its address after
  --distributed_timeout_s instead of hanging (`multihost.initialize`).
  """
  explicit = _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1
  if not explicit and not _launched_by_cluster():
    return
  if explicit and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None or not _COORDINATOR.value):
    raise app.UsageError("A multi-process run needs --coordinator_address, --num_processes and --process_id "
                         "(or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID) together, "
                         f"got {_COORDINATOR.value!r}, {_NUM_PROCESSES.value!r}, {_PROCESS_ID.value!r}.")
  if explicit and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    raise app.UsageError(f"--process_id={_PROCESS_ID.value} is outside 0..{_NUM_PROCESSES.value - 1}.")
  if explicit:  # Before joining: a bad launch then fails on each process at once, not once all have joined.
    config_lib.check_processes(config_lib.validate(_CONFIG.value), _NUM_PROCESSES.value)
  from sage_opd_jax import multihost  # Imported here: flags must parse before JAX reads XLA_FLAGS.

  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED_TIMEOUT.value)


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
  import jax

  config_lib.check_processes(config, jax.process_count())
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
