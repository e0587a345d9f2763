"""DAgger corrections: the env expert's actions at the states a trained policy reaches.

Why: a policy cloned from expert demonstrations has only seen the expert's states. Once it
errs (the CPU pipeline's tiny teacher walks back to shelves it has already searched), it is
in states no demonstration shows, and its errors compound (Ross et al., 2011, DAgger). So the
policy plays games, the expert names what it would do at every state the policy reached,
and those answers become training targets.

The ALFWorld expert (`envs.alfworld_expert.ImitableExpert`) shadows each episode in its env
worker (`RolloutConfig.expert`): it follows the commands the policy played and names its own
action at each state. Every turn where the two differ becomes one SFT sample, a
`demos.jsonl` record: the policy's own transcript up to that turn, with the expert's action
as that turn's response, the only turn trained (`trained`; the earlier turns are context).
`SftSource` adds them to the demonstrations (`config.sft.extra_demos_dirs`). Round after
round (`pipeline.dagger_rounds`), the latest policy plays new games and is trained on every
round's corrections, DAgger's aggregate.

Host side: the rollout engine plays; this module only turns episodes into records.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import tqdm

from sage_opd_jax import files
from sage_opd_jax import judge
from sage_opd_jax import models
from sage_opd_jax import rollout as rollout_lib
from sage_opd_jax import train
from sage_opd_jax.envs import base
from sage_opd_jax.envs import demos as demos_lib

MANIFEST = "manifest.json"


def corrections(episode: rollout_lib.Episode) -> list[dict[str, Any]]:
  """One `demos.jsonl` record per turn of `episode` where the policy left the expert's action.

  A record's first t turns are the policy's (observations, admissible lists and actions as
  played) and its last is the expert's action at o_t; `trained` marks only that last turn.
  An unparseable policy action has no command to rebuild the transcript from, so the
  episode's later turns yield nothing.
  """
  records, actions = [], []
  for t, turn in enumerate(episode.turns):
    expert = turn.expert_action
    if expert is not None and (turn.action is None or not judge.same_action(turn.action, expert)):
      task = episode.task
      records.append(dict(
          env=task.env, split=task.split, task_id=task.task_id, task_type=task.task_type, task=episode.task_text,
          observations=[u.observation for u in episode.turns[: t + 1]], actions=[*actions, expert],
          admissible_actions=[list(u.admissible) for u in episode.turns[: t + 1]],
          trained=[False] * t + [True]))
    if turn.action is None:
      break
    actions.append(turn.action)
  return records


def collect(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path, first: int, num_games: int,
            temperature: float, player: str = "teacher") -> dict[str, Any]:
  """Plays games [first, first + num_games) of `config.env.train_split` with `config.student`.

  `out_dir` gets `demos.jsonl` (the correction records), `games.jsonl` (one line per game
  played: won, turns, corrections) and, once every game is played, `manifest.json`. An
  interrupted collection resumes: finished games are kept and the rest are played.

  Args:
    config: the run config; `config.student` is the policy (e.g. the pipeline's SFT'd teacher,
      through `student.hf_dir`).
    out_dir: the corrections folder.
    first: where in the split's seeded order the games start (each round plays new ones;
      past the split's end the order wraps around).
    num_games: games to play.
    temperature: the policy's sampling temperature (0 is greedy).
    player: whose states these are, for the manifest and the report: "teacher" (the policy
      being corrected) or "student" (the pipeline's student plays; its teacher is corrected).

  Returns:
    The manifest: games played and won, corrections, the policy and the settings.
  """
  if player not in ("teacher", "student"):
    raise ValueError(f"dagger.collect: player={player!r}; expected 'teacher' or 'student'.")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  games = demos_lib.read_jsonl(out / demos_lib.GAMES)
  done = {g["task_id"] for g in games}
  # Records of a batch whose games line was never written (a killed run) are played again.
  demos_lib.rewrite_jsonl(out / demos_lib.DEMOS,
                          [r for r in demos_lib.read_jsonl(out / demos_lib.DEMOS) if r["task_id"] in done])
  env = base.make(config.env.name, **train.env_kwargs(config))
  split = list(env.tasks(config.env.train_split))
  tasks = [split[(first + i) % len(split)] for i in range(min(num_games, len(split)))]
  env.close()
  todo = [task for task in tasks if task.task_id not in done]
  if todo:
    tokenizer = models.load_tokenizer(config.tokenizer_dir)
    policy = train.load_model(config.student, train.mesh_from_config(config.mesh), config.seed)
    sampling_config = train.sampling_config(config, tokenizer, temperature)
    batch = config.train.batch_episodes
    key = jax.random.PRNGKey(config.seed + 7_919)
    with train.make_rollout_engine(config, tokenizer, expert=True) as engine, \
        tqdm.tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="dagger", unit="game") as bar:
      for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        played = engine.run(policy, chunk, jax.random.fold_in(key, len(games)), sampling_config=sampling_config)
        lines = []
        with (out / demos_lib.DEMOS).open("a") as f:
          for episode in played.episodes:
            records = corrections(episode)
            f.writelines(json.dumps(r) + "\n" for r in records)
            lines.append(dict(task_id=episode.task.task_id, task_type=episode.task.task_type, won=episode.won,
                              turns=len(episode.turns), corrections=len(records), error=episode.error))
        with (out / demos_lib.GAMES).open("a") as f:
          f.writelines(json.dumps(line) + "\n" for line in lines)
        games += lines
        bar.update(len(chunk))
        bar.set_postfix(won=sum(g["won"] for g in games), corrections=sum(g["corrections"] for g in games))
  manifest = dict(requested=num_games, first=first, policy=config.student.hf_dir or "config.student.model",
                  player=player, split=config.env.train_split, temperature=temperature,
                  expert=base.spec(config.env.name).expert, games=len(games), won=sum(g["won"] for g in games),
                  turns=sum(g["turns"] for g in games), corrections=sum(g["corrections"] for g in games))
  files.write_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
  logging.info("DAgger: %d games, %d won, %d corrections in %s.", manifest["games"], manifest["won"],
               manifest["corrections"], out)
  return manifest


def finished(out_dir: str | pathlib.Path, num_games: int) -> bool:
  """Whether `out_dir` holds a finished collection of `num_games` games."""
  path = pathlib.Path(out_dir) / MANIFEST
  return path.exists() and json.loads(path.read_text())["requested"] == num_games


def round_dir(root: str | pathlib.Path, r: int) -> pathlib.Path:
  """The corrections folder of a pipeline workdir's DAgger round `r` (from 1)."""
  return pathlib.Path(root) / "dagger" / f"round{r}"


def round_manifests(root: str | pathlib.Path) -> list[dict[str, Any]]:
  """The manifests of a pipeline workdir's finished DAgger rounds, round 1 first."""
  manifests = []
  while (path := round_dir(root, len(manifests) + 1) / MANIFEST).exists():
    manifests.append(json.loads(path.read_text()))
  return manifests
