"""Expert demonstrations and judge examples, collected into JSONL by worker processes.

The expert is the env's own (`experts()`): ALFWorld's imitable hand-coded expert, or
ScienceWorld's gold path.

One output folder per (env, split):

  manifest.json   what was collected, with which settings, and the tallies so far
  games.jsonl     one line per finished game: its status (won, lost, error, timeout,
                  crash), turns and seconds; the resume ledger
  demos.jsonl     one line per WON episode (see `DEMO_KEYS`)
  judge.jsonl     judge examples from states of won episodes (see `JUDGE_KEYS`)

Each game runs as one `EnvPool` call with a hard time limit, so a game whose engine
hangs is killed and recorded as "timeout", and collection goes on. Re-running with the
same folder skips every game in games.jsonl; lines that a killed run wrote for a game
it did not finish are dropped first.

Judge examples (the oracle labels of docs/method.md) come from states of won episodes: the
expert's action is Skip, an off-plan admissible action is Weak, and an inadmissible
action is Strong. Each carries the env's own feedback to that action. For Skip that is
the next observation of the episode; for Weak the env is stepped from a copy of the
state. Two ways to copy it (`branch`): "snapshot" steps ALFWorld's engine and undoes
the step (`alfworld_expert.peek`, ~0.03 s), "replay" resets the game and replays the
prefix (any env, ~1 s per state; the replay must retrace the episode or the game
fails). An inadmissible action leaves the state unchanged, and the env answers it
"Nothing happens.".
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import time
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import tqdm

from sage_opd_jax import files
from sage_opd_jax.envs import base
from sage_opd_jax.envs import pool as pool_lib
from sage_opd_jax.envs import scienceworld as scienceworld_env

if TYPE_CHECKING:
  # Imported where used: reading demos (the trainer) must not load TextWorld and ALFWorld.
  from sage_opd_jax.envs import alfworld_expert

MANIFEST = "manifest.json"
GAMES = "games.jsonl"
DEMOS = "demos.jsonl"
JUDGE = "judge.jsonl"
STATUSES = ("won", "lost", "error", "timeout", "crash")
BRANCHES = ("snapshot", "replay")  # How judge examples step a copy of a state.
LABELS = ("Skip", "Weak", "Strong")
# Keys of one demos.jsonl record.
DEMO_KEYS = (
    "env", "split", "task_id", "task_type", "task", "expert", "observations", "actions",
    "valid", "admissible_actions", "won", "num_turns", "seconds",
)
# Keys of one judge.jsonl record; `turn` indexes the demo's `observations`/`actions`.
JUDGE_KEYS = (
    "env", "split", "task_id", "task_type", "task", "turn", "observation",
    "admissible_actions", "label", "action", "valid", "feedback",
)
# How each env's judge examples copy a state: only ALFWorld's engine can be snapshotted.
DEFAULT_BRANCH = {"alfworld": "snapshot", "scienceworld": "replay"}
# Manifest settings that must match for a re-run to resume a folder.
_STRONG_TRIES = 3  # Strong candidates tried per state before an unparseable response stands in.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_RESUME_KEYS = ("env", "split", "expert", "env_kwargs", "judge_states", "branch", "seed", "max_expert_steps",
                "search_order")
# Settings that folders collected before they existed did not record, with the value they had.
_RESUME_DEFAULTS = {"search_order": "prior"}


def experts() -> dict[str, str]:
  """Env name -> its expert, as manifests and demo records name it: ALFWorld's imitable
  hand-coded expert, ScienceWorld's gold path (the engine's own solution of the task)."""
  from sage_opd_jax.envs import alfworld_expert  # pylint: disable=g-import-not-at-top,redefined-outer-name

  return {"alfworld": alfworld_expert.EXPERT_NAME, "scienceworld": scienceworld_env.EXPERT_NAME}


def list_tasks(env: base.Env, split: str) -> list[base.Task]:
  """A pool call: the split's tasks, in the env's order."""
  return list(env.tasks(split))


def _game_seed(seed: int, task_id: str) -> int:
  return (seed * 1_000_003 + zlib.crc32(task_id.encode())) % (2**31)


def _invalid_candidates(actions: Sequence[str], admissible: Sequence[Sequence[str]], t: int) -> list[str]:
  """Commands valid somewhere in this game but not at turn t: plausible, yet wrong here."""
  now = set(admissible[t])
  seen = {c for turn in admissible for c in turn} | set(actions)
  return sorted(c for c in seen if c not in now)


def _weak_choice(admissible: Sequence[str], expert_action: str, rng: random.Random) -> str | None:
  off_plan = sorted(a for a in admissible if a != expert_action)
  return rng.choice(off_plan) if off_plan else None


def _examples_at(
    task: base.Task,
    episode: alfworld_expert.Episode,
    t: int,
    weak: tuple[str, str, bool] | None,
    strong: tuple[str | None, str, bool],
) -> list[dict[str, Any]]:
  """The Skip/Weak/Strong records of turn t; weak/strong are (action, feedback, valid)."""
  state = dict(
      env=task.env, split=task.split, task_id=task.task_id, task_type=task.task_type, task=episode.task_text,
      turn=t, observation=episode.observations[t], admissible_actions=list(episode.admissible_actions[t]),
  )
  if strong[2]:
    raise RuntimeError(f"{task.task_id}: {strong[0]!r} was meant to be invalid at turn {t}.")
  skip = dict(state, label="Skip", action=episode.actions[t], valid=episode.valid[t],
              feedback=episode.observations[t + 1])
  out = [skip, dict(state, label="Strong", action=strong[0], valid=False, feedback=strong[1])]
  if weak is not None:
    out.append(dict(state, label="Weak", action=weak[0], valid=weak[2], feedback=weak[1]))
  return out


def _same_observation(replayed: str, recorded: str) -> bool:
  """Equal, or equal as bags of words: ScienceWorld lists a room's objects in a new order on every load."""
  return replayed == recorded or sorted(_TOKEN_RE.findall(replayed)) == sorted(_TOKEN_RE.findall(recorded))


def _replay_prefix(env: base.Env, task: base.Task, episode: alfworld_expert.Episode, t: int) -> None:
  """Resets `task` and replays the episode's first t actions, checking that it retraces them."""
  observation, _ = env.reset(task)
  if not _same_observation(observation, episode.observations[0]):
    raise RuntimeError(f"{task.task_id}: replayed reset differs from the recorded one.")
  for i in range(t):
    replayed = env.step(episode.actions[i])
    if not _same_observation(replayed.observation, episode.observations[i + 1]) or replayed.done:
      raise RuntimeError(f"{task.task_id}: replay diverged at turn {i + 1}.")


def _judge_by_replay(
    env: base.Env, task: base.Task, episode: alfworld_expert.Episode, turns: Sequence[int], rng: random.Random
) -> list[dict[str, Any]]:
  """Judge examples whose state copies are made by a fresh reset and a replay of the prefix.

  Works for any env; costs a reset and t steps per state. The replay must retrace the
  recorded episode, or this raises. Where the env lists only part of what its engine
  accepts (ScienceWorld), a Strong candidate may turn out valid; the state is then
  replayed again and another candidate tried, up to `_STRONG_TRIES` in all, and after
  that the Strong action is an unparseable response (None).
  """
  out = []
  for t in turns:
    weak_action = _weak_choice(episode.admissible_actions[t], episode.actions[t], rng)
    invalid = _invalid_candidates(episode.actions, episode.admissible_actions, t)
    strong_action = rng.choice(invalid) if invalid else None  # None: an unparseable response.
    _replay_prefix(env, task, episode, t)
    # The invalid action leaves the engine's state as it was, so the Weak one can follow.
    strong = env.step(strong_action)
    tried = {strong_action}
    while strong.info.valid:  # Accepted after all: the state moved on, so replay it and try another.
      left = sorted(c for c in invalid if c not in tried)
      strong_action = rng.choice(left) if left and len(tried) < _STRONG_TRIES else None
      tried.add(strong_action)
      _replay_prefix(env, task, episode, t)
      strong = env.step(strong_action)
    weak = None
    if weak_action is not None and not strong.done:
      result = env.step(weak_action)
      if result.info.error is not None:
        raise RuntimeError(f"{task.task_id}: engine error on {weak_action!r}: {result.info.error}")
      weak = (weak_action, result.observation, result.info.valid)
    out += _examples_at(task, episode, t, weak, (strong_action, strong.observation, strong.info.valid))
  return out


def _scienceworld_episode(env: base.Env, task: base.Task) -> alfworld_expert.Episode:
  """ScienceWorld's gold path, played in the engine, as an expert `Episode`."""
  from sage_opd_jax.envs import alfworld_expert  # pylint: disable=g-import-not-at-top,redefined-outer-name

  start = time.perf_counter()
  demo = scienceworld_env.gold_demonstration(env, task)
  return alfworld_expert.Episode(
      task=task, task_text=demo.task_text, observations=demo.observations, actions=demo.actions,
      valid=demo.valid, admissible_actions=demo.admissible_actions, won=demo.won, error=None,
      seconds=time.perf_counter() - start,
  )


def expert_game(
    env: base.Env,
    task: base.Task,
    seed: int,
    judge_states: int,
    max_expert_steps: int,
    branch: str = "snapshot",
    search_order: str = "prior",
) -> dict[str, Any]:
  """A pool call: one expert episode on `task`, and judge examples if it was won.

  With branch="snapshot" the Weak action of every turn is `peek`ed at during the
  episode (one undone engine step each) and `judge_states` turns are kept; with
  "replay", `judge_states` turns are replayed after the episode (see `_judge_by_replay`).
  `search_order` is the ALFWorld expert's (`alfworld_expert.ImitableExpert`).
  Returns {"status", "turns", "seconds", "cpu_seconds", "error", "demo" (won only),
  "judge", "judge_seconds"}.
  """
  from sage_opd_jax.envs import alfworld as alfworld_env  # pylint: disable=g-import-not-at-top
  from sage_opd_jax.envs import alfworld_expert  # pylint: disable=g-import-not-at-top,redefined-outer-name

  if branch not in BRANCHES:
    raise ValueError(f"branch={branch!r}: must be one of {BRANCHES}.")
  cpu_start, start = time.process_time(), time.perf_counter()
  rng = random.Random(_game_seed(seed, task.task_id))
  expert_seed = rng.randrange(2**31)
  peeked: dict[int, tuple[str, str, bool]] = {}
  peek_seconds = 0.0

  def peek_weak(t: int, info: base.StepInfo, expert_action: str) -> None:
    nonlocal peek_seconds
    weak_action = _weak_choice(info.admissible_actions, expert_action, rng)
    if weak_action is not None:
      peek_start = time.perf_counter()
      peeked[t] = (weak_action, *alfworld_expert.peek(env, weak_action))
      peek_seconds += time.perf_counter() - peek_start

  snapshot = judge_states > 0 and branch == "snapshot"
  if task.env == scienceworld_env.ENV_NAME:
    if snapshot:
      raise ValueError("branch='snapshot' steps ALFWorld's engine; ScienceWorld's judge examples need 'replay'.")
    # The gold path has its own length; the env's turn limit bounds it, not max_expert_steps.
    episode = _scienceworld_episode(env, task)
  else:
    episode = alfworld_expert.run_episode(
        env, task, max_steps=max_expert_steps, seed=expert_seed, before_step=peek_weak if snapshot else None,
        search_order=search_order,
    )
  result: dict[str, Any] = dict(
      status="won" if episode.won else "lost", turns=len(episode.actions), error=episode.error, demo=None,
      judge=[], judge_seconds=peek_seconds,
  )
  if episode.won:
    result["demo"] = dict(
        env=task.env, split=task.split, task_id=task.task_id, task_type=task.task_type, task=episode.task_text,
        expert=experts()[task.env], observations=episode.observations, actions=episode.actions,
        valid=episode.valid, admissible_actions=episode.admissible_actions, won=True,
        num_turns=len(episode.actions), seconds=episode.seconds,
    )
    turns = sorted(rng.sample(range(len(episode.actions)), min(judge_states, len(episode.actions))))
    if snapshot:
      for t in turns:
        invalid = _invalid_candidates(episode.actions, episode.admissible_actions, t)
        strong_action = rng.choice(invalid) if invalid else None
        # An inadmissible command leaves the state as it is; peek answers it as the env does.
        strong = (strong_action, base.NOTHING_HAPPENS, False)
        if strong_action is not None and alfworld_env.canonical_command(strong_action, episode.admissible_actions[t]):
          raise RuntimeError(f"{task.task_id}: {strong_action!r} is admissible at turn {t}.")
        result["judge"] += _examples_at(task, episode, t, peeked.get(t), strong)
    elif turns:
      judge_start = time.perf_counter()
      result["judge"] = _judge_by_replay(env, task, episode, turns, rng)
      result["judge_seconds"] = time.perf_counter() - judge_start
  result["seconds"] = time.perf_counter() - start
  result["cpu_seconds"] = time.process_time() - cpu_start
  return result


def demo_texts(demos_dirs: Sequence[pathlib.Path]) -> list[str]:
  """Every task, observation, action, admissible action and judge feedback of collection folders."""
  texts: set[str] = set()
  for folder in demos_dirs:
    for name in (DEMOS, JUDGE):
      path = folder / name
      if not path.exists():
        raise FileNotFoundError(f"{path} is missing: collect the demonstrations first.")
      for line in path.read_text().splitlines():
        record = json.loads(line)
        if name == DEMOS:
          texts.update([record["task"], *record["observations"], *record["actions"]])
          texts.update(a for turn in record["admissible_actions"] for a in turn)
        else:  # A Strong action may be None: an unparseable response has no text.
          texts.update(t for t in (record["action"], record["feedback"]) if t is not None)
  return sorted(texts)


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  """Every complete line; a torn last line (a killed writer) is dropped."""
  if not path.exists():
    return []
  records = []
  with path.open() as f:
    for line in f:
      if not line.endswith("\n"):
        break
      records.append(json.loads(line))
  return records


def in_fixed_order(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """A collection's records in an order that is the same in every run of it.

  Workers append games as they finish, so a file's order differs between two collections of
  the same games; trained in file order, two pipelines from one command got different SFT
  batches (and student slices, `sft.max_demos`) and different teachers. Sorted by a hash of the
  task id, a slice of any length is spread over the split rather than alphabetical; the sort is
  stable, so a game's own records (its judge examples) keep their written order.
  """
  return sorted(records, key=lambda r: (zlib.crc32(r["task_id"].encode()), r["task_id"]))


def rewrite_jsonl(path: pathlib.Path, records: Sequence[Mapping[str, Any]]) -> None:
  """Replaces `path` with `records`, one JSON line each, atomically; a file that already holds them is
  left as it is (two pipelines resuming one workdir, a sweep each, both pass over its finished demos)."""
  text = "".join(json.dumps(record) + "\n" for record in records)
  if not (path.exists() and path.read_text() == text):
    files.write_atomically(path, text)


def _summary(games: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  counts = {s: sum(g["status"] == s for g in games) for s in STATUSES}
  won = [g for g in games if g["status"] == "won"]
  played = counts["won"] + counts["lost"]
  timed = [g for g in games if g.get("cpu_seconds") is not None]

  def mean(key: str) -> float | None:
    return sum(g[key] for g in timed) / len(timed) if timed else None

  return dict(
      games_done=len(games),
      **{f"games_{s}": n for s, n in counts.items()},
      success_rate=counts["won"] / played if played else None,
      mean_turns_won=sum(g["turns"] for g in won) / len(won) if won else None,
      # Per played game, in its worker: wall time, CPU time, and the judge's share of it.
      mean_seconds=mean("seconds"),
      mean_cpu_seconds=mean("cpu_seconds"),
      mean_judge_seconds=mean("judge_seconds"),
  )


@dataclasses.dataclass
class CollectResult:
  out_dir: pathlib.Path
  manifest: dict[str, Any]
  new_games: int  # Games finished by this run (the rest were skipped as done).
  seconds: float


def collect(
    out_dir: str | os.PathLike[str],
    split: str,
    env_kwargs: Mapping[str, Any],
    *,
    env_name: str = "alfworld",
    num_workers: int = 2,
    game_timeout_s: float = 120.0,
    limit: int | None = None,
    judge_states: int = 4,
    branch: str = "snapshot",
    seed: int = 0,
    max_expert_steps: int = 150,
    search_order: str = "prior",
    retry_failed: bool = False,
    game_fn: Callable[..., dict[str, Any]] = expert_game,
    imports: Sequence[str] = (),
    progress: bool = True,
) -> CollectResult:
  """Collects expert demonstrations (and judge examples) for one split into `out_dir`.

  Args:
    out_dir: output folder; an existing one is resumed (its settings must match).
    split: the env's split, e.g. "train".
    env_kwargs: the env's constructor arguments; the ALFWorld expert needs facts=True.
    env_name: registered env name; `experts()` names the expert that plays it.
    num_workers: worker processes.
    game_timeout_s: hard limit per game (the episode and its judge replays).
    limit: only the first `limit` games of the split's order; None takes all.
    judge_states: states per won episode that get judge examples; 0 for none.
    branch: how judge examples step a copy of a state: "snapshot" (ALFWorld's engine,
      `alfworld_expert.peek`) or "replay" (any env; a reset and a replay per state).
      `DEFAULT_BRANCH` holds each env's choice; ScienceWorld has only "replay".
    seed: seeds the expert's random choices and the judge examples, per game.
    max_expert_steps: the ALFWorld expert's own step budget (a gold path has its own length).
    search_order: the ALFWorld expert's receptacle search order, "prior" or "shuffled"
      (`alfworld_expert.ImitableExpert`); a gold path has its own.
    retry_failed: on resume, run again the games that ended in error/timeout/crash.
    game_fn: the pool call that plays one game (tests inject failures through it).
    imports: modules the workers import first (e.g. one registering a test env).
    progress: show a tqdm bar.
  """
  if branch not in BRANCHES:
    raise ValueError(f"branch={branch!r}: must be one of {BRANCHES}.")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  env_kwargs = dict(env_kwargs)
  known = experts()
  if game_fn is expert_game:
    if env_name not in known:
      raise ValueError(f"env_name={env_name!r} has no expert; experts exist for {sorted(known)}.")
    if env_name == "alfworld" and not env_kwargs.get("facts"):
      raise ValueError("env_kwargs['facts'] must be True: the ALFWorld expert reads the game's facts.")
  settings = dict(
      # A test's own game_fn on a test env is recorded under ALFWorld's expert, as before.
      env=env_name, split=split, expert=known.get(env_name, known["alfworld"]), env_kwargs=env_kwargs,
      judge_states=judge_states, branch=branch, seed=seed, max_expert_steps=max_expert_steps,
      search_order=search_order,
  )
  manifest_path = out / MANIFEST
  if manifest_path.exists():
    previous = json.loads(manifest_path.read_text())
    for key in _RESUME_KEYS:
      recorded = previous.get(key, _RESUME_DEFAULTS.get(key))
      if recorded != json.loads(json.dumps(settings[key])):
        raise ValueError(
            f"{manifest_path}: {key}={recorded!r} but this run has {settings[key]!r}; "
            "use another out_dir or the same settings."
        )

  games = read_jsonl(out / GAMES)
  if retry_failed:
    games = [g for g in games if g["status"] in ("won", "lost")]
  finished = {g["task_id"] for g in games}
  # Drop what a killed run wrote for games it did not finish (and torn lines).
  rewrite_jsonl(out / GAMES, games)
  rewrite_jsonl(out / DEMOS, [r for r in read_jsonl(out / DEMOS) if r["task_id"] in finished])
  rewrite_jsonl(out / JUDGE, [r for r in read_jsonl(out / JUDGE) if r["task_id"] in finished])

  start = time.perf_counter()
  new_games = 0
  with pool_lib.EnvPool(env_name, env_kwargs, num_workers=num_workers, imports=imports) as pool:
    pool.submit(0, "call", (list_tasks, dict(split=split)))
    (_, tasks), = pool.gather().items()
    if isinstance(tasks, pool_lib.WorkerError):
      raise RuntimeError(f"Listing the tasks of split {split!r} failed:\n{tasks.message}")
    tasks = tasks[:limit] if limit is not None else tasks
    todo = [t for t in tasks if t.task_id not in finished]
    calls = [dict(task=t, seed=seed, judge_states=judge_states, max_expert_steps=max_expert_steps, branch=branch,
                  search_order=search_order) for t in todo]
    bar = tqdm.tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"demos {split}", disable=not progress)
    with (out / GAMES).open("a") as games_f, (out / DEMOS).open("a") as demos_f, (out / JUDGE).open("a") as judge_f:
      for index, result in pool.imap_unordered(game_fn, calls, timeout_s=game_timeout_s):
        task = todo[index]
        if isinstance(result, pool_lib.WorkerError):
          status = "error" if result.kind == "exception" else result.kind
          line = dict(task_id=task.task_id, task_type=task.task_type, status=status, turns=0, seconds=None,
                      error=result.message[-2000:])
        else:
          for example in result["judge"]:
            judge_f.write(json.dumps(example) + "\n")
          if result["demo"] is not None:
            demos_f.write(json.dumps(result["demo"]) + "\n")
          line = dict(task_id=task.task_id, task_type=task.task_type, status=result["status"],
                      turns=result["turns"], seconds=result["seconds"], cpu_seconds=result.get("cpu_seconds"),
                      judge_seconds=result.get("judge_seconds"), error=result["error"])
        # The ledger line goes last: a game counts as finished only once its records are out.
        judge_f.flush()
        demos_f.flush()
        games_f.write(json.dumps(line) + "\n")
        games_f.flush()
        games.append(line)
        new_games += 1
        bar.update(1)
        tally = _summary(games)
        bar.set_postfix(won=tally["games_won"], lost=tally["games_lost"], failed=len(games) - tally["games_won"]
                        - tally["games_lost"])
    bar.close()
    respawns = pool.respawns

  seconds = time.perf_counter() - start
  manifest = dict(
      settings,
      games_total=len(tasks),
      **_summary(games),
      last_run=dict(new_games=new_games, seconds=seconds, games_per_s=new_games / seconds if seconds else None,
                    num_workers=num_workers, respawns=respawns,
                    finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
      judge_examples=len(read_jsonl(out / JUDGE)),
      files=dict(games=GAMES, demos=DEMOS, judge=JUDGE),
  )
  files.write_atomically(manifest_path, json.dumps(manifest, indent=2) + "\n")
  return CollectResult(out_dir=out, manifest=manifest, new_games=new_games, seconds=seconds)


@dataclasses.dataclass(frozen=True)
class JudgeExample:
  """One judge training example, with the history the judge prompt shows."""

  task: str
  history: list[tuple[str, str]]  # (observation, action) pairs before `turn`, oldest first.
  observation: str
  admissible_actions: list[str]
  action: str | None  # None: an unparseable response.
  feedback: str
  label: str  # Skip | Weak | Strong.
  task_id: str
  turn: int


def load_judge_examples(out_dir: str | os.PathLike[str], history_turns: int | None,
                        demos: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[JudgeExample]:
  """Judge examples of a collection folder, each with its last `history_turns` turns (None: all).

  `demos`: the folder's demo records by task id, when the caller has read them already.
  """
  out = pathlib.Path(out_dir)
  if demos is None:
    demos = {d["task_id"]: d for d in read_jsonl(out / DEMOS)}
  for record in in_fixed_order(read_jsonl(out / JUDGE)):
    demo = demos.get(record["task_id"])
    if demo is None:
      raise ValueError(f"{out / JUDGE}: example for {record['task_id']!r} has no demo in {out / DEMOS}.")
    t = record["turn"]
    first = 0 if history_turns is None else max(0, t - history_turns)
    history = [(demo["observations"][i], demo["actions"][i]) for i in range(first, t)]
    yield JudgeExample(
        task=record["task"], history=history, observation=record["observation"],
        admissible_actions=record["admissible_actions"], action=record["action"],
        feedback=record["feedback"], label=record["label"], task_id=record["task_id"], turn=t,
    )
