"""The CPU mini-reproduction on one task type, pick_and_place_simple: the tiny teacher's best setting.

The whole pipeline and every method of docs/method.md's table (about 2 hours on 2 cores, docs/reproducing.md):

  python -m sage_opd_jax.main --config=configs/alfworld_cpu_pick.py --workdir=workdirs/alfworld_cpu_pick

The models, decoding and budgets are alfworld_cpu.py's; only the task types, the seed, the
teacher's renumbered copies, the student's warm start and the teacher's DAgger rounds differ.
Results: docs/results.md (its CSV and plots: docs/results/alfworld_cpu_pick/).
"""

import ml_collections

from configs import alfworld_cpu


def get_config(method: str = "sage_opd") -> ml_collections.ConfigDict:
  config = alfworld_cpu.get_config(method)
  # With both task types the SFT teacher won 0.40-0.46 of valid_seen; on this one alone it won 0.429-0.514
  # over reruns.
  config.env.task_types = ("pick_and_place_simple",)
  # The teacher's demos get one copy each with the room's receptacles renumbered. With them the teacher
  # won 17 of 35 valid_seen games at seed 0 and 19 at seed 1: seed 1 (0.543) is the teacher over 0.50 that
  # every method runs under (given the seed, a rerun collects the same demos and repeats the teacher's
  # updates bitwise). `--config.seed=0 --config.sft.renumbered_copies=0` is the recipe without them
  # (docs/results/pick_seed0/).
  config.seed = 1
  config.sft.renumbered_copies = 1
  # sft.thoughts stays "subgoal": naming the take ("subgoal_take") won its teacher 0.371 (docs/results/pick_take/).
  # eval.num_episodes stays 48: every game of the task type, valid_seen 35 and valid_unseen 24.
  config.pipeline.student_steps = 500  # Every demo of 790 train games: 0.200 of valid_seen at 500 updates (seed 0).
  config.pipeline.dagger_rounds = 0
  # The full method and its ablations first, so that a run stopped early still has the ablation grid.
  config.pipeline.methods = ("sage_opd", "sage_opd_no_intervention", "sage_opd_no_confidence", "sage_opd_no_norm",
                             "opd", "sft")
  config.pipeline.results_dir = "docs/results/alfworld_cpu_pick"
  return config
