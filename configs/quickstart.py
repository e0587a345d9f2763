"""The offline quickstart: a shortened pipeline that finishes in about 15 minutes on 2 cores.

  export ALFWORLD_DATA="$(../shared/alfworld/unpack)"
  python -m sage_opd_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

It builds the tokenizer, collects a few expert demonstrations, trains a tiny teacher and
student, runs OPD and SAGE-OPD for a few updates, evaluates them, prints a results table,
and leaves TensorBoard logs (`tensorboard --logdir workdirs/quickstart`) and plots in the
workdir. The numbers are a smoke test of the whole path, not a result.
"""

import ml_collections

from configs import alfworld_cpu
from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = alfworld_cpu.get_config()
  config.env.task_types = ("pick_and_place_simple",)
  config.env.max_turns = 10
  config.student.model = base.tiny_model(max_position_embeddings=1024)
  config.teacher.model = base.tiny_model(hidden_size=128, intermediate_size=384, max_position_embeddings=1024)
  config.demos.limit = 120
  config.train.batch_episodes = 4
  config.train.max_seq_len = 768
  config.train.eval_every = 4
  config.train.ckpt_every = 4
  config.eval.num_episodes = 4
  config.pipeline = alfworld_cpu.pipeline_config(
      teacher_steps=400, student_steps=60, student_demos=32, distill_steps=6,
      methods=("opd", "sage_opd"), seeds=(0,), heldout_games=4,
  )
  return config
