"""Who is right on the student's own states: the student, the teacher, or neither?

On-policy distillation trains the student towards the teacher's distribution at the states
the student itself reaches. That only helps where the teacher acts better there than the
student does. This plays the student (at the rollout temperature OPD trains on) with the env
expert shadowing every episode, and at every turn also asks, from the same context, for the
teacher's and the student's greedy responses (decoded as the run decodes: constrained to the
admissible actions when the config says so). Each is compared with the expert's action.
Turns are split by whether the student had already left the expert's path in that episode:
the off-path states are the paper's "off-distribution histories" (docs/method.md).

  python -m experiments.state_agreement --config=configs/alfworld_cpu.py \
      --student=workdirs/alfworld_cpu_dagger/student_sft/hf \
      --teacher=workdirs/alfworld_cpu_dagger/teacher_dagger/round2/hf \
      --config.tokenizer_dir=workdirs/alfworld_cpu_dagger/tokenizer --split=valid_unseen

Prints a JSON report; `--out` also writes it.
"""

import collections
import json
import pathlib
from typing import Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sage_opd_jax import config as config_lib
from sage_opd_jax import judge
from sage_opd_jax import models
from sage_opd_jax import prompts
from sage_opd_jax import rollout as rollout_lib
from sage_opd_jax import train
from sage_opd_jax.envs import base

_CONFIG = config_flags.DEFINE_config_file("config", "configs/alfworld_cpu.py", "The run config.")
_STUDENT = flags.DEFINE_string("student", None, "The student's exported HF directory.", required=True)
_TEACHER = flags.DEFINE_string("teacher", None, "The teacher's exported HF directory.", required=True)
_SPLIT = flags.DEFINE_string("split", "valid_unseen", "The split whose games the student plays.")
_NUM_GAMES = flags.DEFINE_integer("num_games", 0, "Games to play (0: config.eval.num_episodes).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "The student's rollout temperature "
                                  "(default: config.sampling.temperature, what OPD trains on).")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON report here.")

# Who is compared with whom, per turn: (name, first, second).
_PAIRS = (("student_sampled=expert", "sampled", "expert"), ("student_greedy=expert", "student", "expert"),
          ("teacher_greedy=expert", "teacher", "expert"), ("teacher_greedy=student_greedy", "teacher", "student"))


def greedy_actions(model, tokenizer, engine: rollout_lib.RolloutEngine, config, states: Sequence[rollout_lib.TurnState],
                   key: jax.Array) -> list[str | None]:
  """`model`'s greedy action at each state, from the context the student's turn was sampled from."""
  responses = engine.respond(model, states, key, train.sampling_config(config, tokenizer, 0.0))
  return [prompts.parse_action(tokenizer.decode(ids, skip_special_tokens=True)) for ids in responses]


def main(argv):
  del argv
  config = _CONFIG.value
  config.student.hf_dir = _STUDENT.value
  config = config_lib.validate(config)
  temperature = config.sampling.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value
  tokenizer = models.load_tokenizer(config.tokenizer_dir)
  mesh = train.mesh_from_config(config.mesh)
  student = train.load_model(config.student, mesh, config.seed)
  teacher = models.load_hf_checkpoint(_TEACHER.value)
  env = base.make(config.env.name, **train.env_kwargs(config))
  tasks = list(env.tasks(_SPLIT.value))[: _NUM_GAMES.value or config.eval.num_episodes]
  env.close()

  asked: dict[tuple[int, int, int], dict[str, str | None]] = {}  # (batch, episode, turn) -> actions.
  key = jax.random.PRNGKey(config.seed)
  batch_size = config.train.batch_episodes
  with train.make_rollout_engine(config, tokenizer, expert=True) as engine:
    episodes = []
    for start in range(0, len(tasks), batch_size):
      calls = iter(range(1 << 30))

      def record(states, start=start, calls=calls):
        call_key = jax.random.fold_in(key, next(calls))
        teacher_actions = greedy_actions(teacher, tokenizer, engine, config, states, jax.random.fold_in(call_key, 0))
        student_actions = greedy_actions(student, tokenizer, engine, config, states, jax.random.fold_in(call_key, 1))
        for s, a_teacher, a_student in zip(states, teacher_actions, student_actions):
          asked[start, s.episode, s.turn] = dict(teacher=a_teacher, student=a_student)
        return {}  # Nothing is replaced: the student plays its own episode.

      played = engine.run(student, tasks[start : start + batch_size], jax.random.fold_in(key, start),
                          sampling_config=train.sampling_config(config, tokenizer, temperature), intervene=record)
      episodes += [(start, b, e) for b, e in enumerate(played.episodes)]

  same = lambda a, b: a is not None and b is not None and judge.same_action(a, b)
  counts = {path: collections.defaultdict(list) for path in ("on_path", "off_path", "all")}
  for start, b, episode in episodes:
    off = False
    for t, turn in enumerate(episode.turns, start=1):
      if turn.expert_action is None or (start, b, t) not in asked:
        break
      actions = dict(asked[start, b, t], sampled=turn.action, expert=turn.expert_action)
      for path in ("off_path" if off else "on_path", "all"):
        for name, first, second in _PAIRS:
          counts[path][name].append(same(actions[first], actions[second]))
      off = off or not same(turn.action, turn.expert_action)
  report = dict(
      split=_SPLIT.value, games=len(episodes), won=int(sum(e.won for _, _, e in episodes)),
      student=_STUDENT.value, teacher=_TEACHER.value, student_temperature=temperature,
      constrained=bool(config.sampling.constrained),
      turns={path: len(c[_PAIRS[0][0]]) for path, c in counts.items()},
      agreement={path: {name: round(float(np.mean(v)), 3) if v else None for name, v in c.items()}
                 for path, c in counts.items()},
  )
  print(json.dumps(report, indent=1))
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
