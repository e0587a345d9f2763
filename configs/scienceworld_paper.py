"""Paper scale on ScienceWorld: the ALFWorld recipe with ScienceWorld's tasks and splits.

  python -m sage_opd_jax.main --config=configs/scienceworld_paper.py:sage_opd,0.6b \\
      --config.teacher.hf_dir=/ckpt/Qwen3-8B --config.student.hf_dir=/ckpt/Qwen3-0.6B \\
      --config.tokenizer_dir=/ckpt/Qwen3-8B --workdir=/runs/scienceworld_sage_opd_0.6b

ScienceWorld runs on the JVM (`apt-get install default-jre-headless`). Train episodes draw
from the train variations; evaluation uses the dev and test variations.
"""

import ml_collections

from configs import alfworld_paper


def get_config(arg: str = "sage_opd,0.6b") -> ml_collections.ConfigDict:
  config = alfworld_paper.get_config(arg)
  config.env.name = "scienceworld"
  config.env.train_split = "train"
  config.env.eval_splits = ("dev", "test")
  config.env.max_turns = 50
  config.env.data_dir = ""  # ScienceWorld ships its tasks inside its package.
  config.env.task_types = ()
  config.demos.split = "train"
  config.eval.num_episodes = 100
  return config
