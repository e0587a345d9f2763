"""Collects ALFWorld expert demonstrations and judge examples for one split into JSONL.

  export ALFWORLD_DATA="$(../shared/alfworld/unpack)"
  python experiments/collect_demos.py --split=train --out_dir=workdirs/demos/train \
      --num_workers=2 --limit=3000

Re-running with the same --out_dir resumes: finished games are skipped. See
`sage_opd_jax.envs.demos` for the files and their records.
"""

import json

from absl import app, flags

from sage_opd_jax.envs import demos

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder (resumed if it exists).", required=True)
_SPLIT = flags.DEFINE_enum(
    "split", "train", ["train", "valid_seen", "valid_unseen", "valid_train"], "ALFWorld split.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder holding json_2.1.1/; default $ALFWORLD_DATA.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Env worker processes.")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N games of the split's seeded order.")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 50, "Turn limit of an expert episode.")
_GAME_TIMEOUT_S = flags.DEFINE_float(
    "game_timeout_s", 120.0, "Hard limit per game; a hung game is killed and skipped.")
_JUDGE_STATES = flags.DEFINE_integer("judge_states", 4, "States per won episode with Skip/Weak/Strong examples.")
_BRANCH = flags.DEFINE_enum(
    "branch", "snapshot", ["snapshot", "replay"], "How judge examples step a copy of a state.")
_SEED = flags.DEFINE_integer("seed", 0, "Task order and expert/judge randomness.")
_TASK_TYPES = flags.DEFINE_list("task_types", None, "Restrict to these task types (names).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "PDDL grounding cache; default under ~/.cache.")
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", False, "On resume, rerun games that errored or timed out.")


def main(argv):
  del argv
  env_kwargs = dict(
      data_dir=_DATA_DIR.value,
      max_turns=_MAX_TURNS.value,
      seed=_SEED.value,
      task_types=_TASK_TYPES.value,
      cache_dir=_CACHE_DIR.value,
      facts=True,  # The expert's predicates read the game's facts.
  )
  result = demos.collect(
      _OUT_DIR.value,
      _SPLIT.value,
      env_kwargs,
      num_workers=_NUM_WORKERS.value,
      game_timeout_s=_GAME_TIMEOUT_S.value,
      limit=_LIMIT.value,
      judge_states=_JUDGE_STATES.value,
      branch=_BRANCH.value,
      seed=_SEED.value,
      retry_failed=_RETRY_FAILED.value,
  )
  print(json.dumps(result.manifest, indent=2))


if __name__ == "__main__":
  app.run(main)
