"""The offline quickstart: a shortened pipeline of about 18 CPU-minutes (2 cores).

  export ALFWORLD_DATA="$(../shared/alfworld/unpack)"
  python -m sage_opd_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

It builds the tokenizer, collects expert demonstrations of 200 games, trains a tiny teacher and
student, runs OPD and SAGE-OPD for a few updates, evaluates them, prints a results table (the
student start, the teacher and each method), and leaves TensorBoard logs
(`tensorboard --logdir workdirs/quickstart`) and plots in the workdir.

The student plays only admissible actions and the teacher wins some seen games (2 of 8) before OPD and SAGE-OPD run.
It shows the whole mechanism running; with 8 games per split and 6 updates it cannot rank the methods.
"""

import ml_collections

from configs import alfworld_cpu
from configs import base


def get_config() -> ml_collections.ConfigDict:
  # Constrained decoding with a 12-token thought budget, as there: a response that never closes its
  # thought still ends in an admissible action.
  config = alfworld_cpu.get_config()
  config.env.task_types = ("pick_and_place_simple",)  # The task type a tiny teacher learns first.
  # 72% of the expert's pick-and-place demos take 10 turns or fewer, 82% 15 or fewer (median 6); at 10 the
  # teacher won none of 16 eval games.
  config.env.max_turns = 15
  config.student.model = base.tiny_model(max_position_embeddings=1024)  # D = 64, 2 layers.
  config.teacher.model = base.tiny_model(hidden_size=128, intermediate_size=384,
                                         max_position_embeddings=1024)  # D = 128, 2 layers.
  config.demos.limit = 200  # Train games the expert plays: the teacher's demos (about a third of CPU time).
  # The teacher's SFT data: every demo and 120 judge examples, so that acting gets most of its updates.
  config.sft.max_judge_examples = 120
  config.train.batch_episodes = 4  # Episodes per update, SFT and distillation, and per eval batch.
  config.train.max_seq_len = 1024  # A 15-turn transcript fits.
  config.train.eval_every = 6  # One eval, after the last distillation update.
  config.train.ckpt_every = 6  # One checkpoint, at the end.
  config.eval.num_episodes = 8  # Games per split per eval (a fixed subset; the same for every row).
  config.pipeline = alfworld_cpu.pipeline_config(
      # At 800 teacher updates (10 turns) it won none of 16 games; at 1,600 it won 2 of 8 seen ones.
      teacher_steps=1600, student_steps=60, student_demos=32, distill_steps=6,
      methods=("opd", "sage_opd"), seeds=(0,), heldout_games=4,
  )
  return config
