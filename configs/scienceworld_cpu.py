"""The CPU mini-reproduction on ScienceWorld: tiny teacher and student trained here, every method.

Needs `java` (the engine is a JVM; `apt-get install default-jre-headless`); no data
download: the tasks ship inside the scienceworld package. Whole pipeline (gold-path
demos, tokenizer, teacher, student warm start, methods x seeds, results):

  python -m sage_opd_jax.main --config=configs/scienceworld_cpu.py --workdir=workdirs/scienceworld_cpu

A smoke run of every stage in minutes (tiny budgets; the numbers mean nothing):

  python -m sage_opd_jax.main --config=configs/scienceworld_cpu.py --workdir=/tmp/sw_cpu \\
      --config.demos.limit=40 --config.pipeline.heldout_games=6 --config.pipeline.teacher_steps=20 \\
      --config.pipeline.student_steps=10 --config.pipeline.student_demos=16 \\
      --config.pipeline.distill_steps=2 --config.pipeline.seeds='(0,)' \\
      --config.pipeline.methods='("opd","sage_opd")' --config.eval.num_episodes=4

One method on its own, from the pipeline's teacher and student (e.g. an ablation):

  python -m sage_opd_jax.main --config=configs/scienceworld_cpu.py:sage_opd_no_norm \\
      --config.stage=distill --workdir=workdirs/scienceworld_cpu/runs/sage_opd_no_norm/seed0 \\
      --config.tokenizer_dir=workdirs/scienceworld_cpu/tokenizer \\
      --config.teacher.hf_dir=workdirs/scienceworld_cpu/teacher/hf \\
      --config.student.hf_dir=workdirs/scienceworld_cpu/student_sft/hf

The task types are among ScienceWorld's shortest (gold paths of 3-10 turns, docs/benchmarks.md
"ScienceWorld gold-path expert"): 424 train, 212 dev and 214 test variations. Nothing of
this config has been run at its full budgets yet; docs/reproducing.md says what has.
"""

import ml_collections

from configs import alfworld_cpu
from configs import base

# Where a tiny teacher can succeed: find a (non-)living thing and move it to a box (gold
# path 3-10 turns), or focus on the longest/shortest-lived animal outside (5 turns).
TASK_TYPES = ("find-living-thing", "find-non-living-thing", "lifespan-longest-lived", "lifespan-shortest-lived")


def get_config(method: str = "sage_opd") -> ml_collections.ConfigDict:
  config = base.get_config()
  config.stage = "pipeline"  # Every stage, resumable (sage_opd_jax/pipeline.py).
  config.method = method  # The method of a single distill stage run from this config.

  config.env.name = "scienceworld"  # The JVM engine behind sage_opd_jax/envs/scienceworld.py.
  config.env.data_dir = ""  # ScienceWorld ships its tasks inside its package: no data folder.
  config.env.train_split = "train"  # The library's own train variations.
  config.env.eval_splits = ("dev", "test")  # ScienceWorld's held-out variations.
  config.env.task_types = TASK_TYPES  # See above.
  config.env.max_turns = 15  # Gold paths win in 3-10 turns; room for a few detours.
  config.env.history_turns = 15  # The whole history (k = the turn limit), as alfworld_cpu.
  config.env.num_workers = 2  # One JVM per worker; the box has 2 cores.
  # The engine's list of valid combinations misses phrasings it accepts (its gold paths use
  # them), so it neither defines validity nor helps a prompt; it is left out of the acting
  # prompt, and the judge prompt (config.judge.show_admissible) sees 16 actions spread over the verbs.
  config.env.show_admissible = False
  config.env.simplifications = ""  # The engine's full task (no teleport, doors start closed).
  config.env.max_admissible = 16  # Each verb's shortest action in turn (0: all, often 200-1,000).

  config.student.model = base.tiny_model(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                                         num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
  config.teacher.model = base.tiny_model(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                                         num_kv_heads=2, head_dim=64, max_position_embeddings=1024)

  config.demos.split = "train"  # Gold paths of every train variation of the task types.
  config.demos.limit = 0  # 0: all 424 of them.
  config.demos.max_turns = 30  # The gold path's turn limit (its paths here are at most ~12).
  config.demos.judge_states = 2  # States per won episode that yield Skip/Weak/Strong examples.
  config.demos.game_timeout_s = 300.0  # A game with its judge replays (~1 s per replayed state).

  config.sampling.max_new_tokens = 32  # An action is at most ~10 words ("focus on baby baby brown bear").
  config.sampling.constrained = False  # The admissible list misses accepted phrasings: free decoding.

  config.train.batch_episodes = 8  # Episodes per update.
  # A whole gold-path transcript (no admissible list) is 547 tokens at the median, 697 at
  # p90 and 725 at most (40 train demos); a room's look-around alone is up to ~270.
  config.train.max_seq_len = 1024
  config.train.eval_every = 10  # Updates between evaluations (and one at the end).
  config.train.ckpt_every = 5  # Updates between checkpoints.
  config.optim.learning_rate = 1e-4  # The distill stages' peak learning rate (SFT: pipeline's).
  config.eval.num_episodes = 32  # The first 32 tasks of dev and of test, in the seed-0 order.
  config.eval.temperatures = (0.0,)  # Greedy evaluation.

  config.pipeline = alfworld_cpu.pipeline_config(
      teacher_steps=2000,  # Teacher SFT updates on the gold paths and judge examples.
      student_steps=200,  # The student's warm start.
      student_demos=100,  # Its slice of the demonstrations.
      distill_steps=40,  # Updates of every method and seed, from the same student.
      # The core comparison; the ablation grid is a second run in the same workdir (it reuses
      # the demos, tokenizer, teacher and student): --config.pipeline.methods='("sage_opd_no_intervention",
      # "sage_opd_no_confidence","sage_opd_no_norm")'.
      methods=("sft", "opd", "sage_opd"),
      seeds=(0, 1, 2),  # Seeds per method.
      heldout_split="dev",  # Judge accuracy on judge examples of dev games.
      heldout_games=20,  # Dev games collected for it.
  )
  return config
