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


def run(config, workdir: str) -> None:
  """Runs `config.stage` in `workdir`; the CLI and the experiment pipelines both call this."""
  config_lib.validate(config)
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
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
