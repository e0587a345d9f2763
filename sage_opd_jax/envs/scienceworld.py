"""ScienceWorld (scienceworld 1.2.3, a Scala engine in a JVM) behind the env protocol.

A task is one (task type, variation) pair; the library fixes which variations are
train, dev and test. Every parsed action goes to the engine, because the engine
accepts many phrasings that its own list of valid action-object combinations does
not contain (its gold paths use them too). An action is invalid when the engine
rejects it ("No known action matches that input.", "Unknown action. ..."); the env
then answers `NOTHING_HAPPENS`, as ALFWorld does, and keeps the engine's words in
`info.extra["engine_observation"]`. An ambiguous command ("open door" with several
doors) gets the engine's numbered choices; the env answers "0", the engine's first
reading, and sets `info.extra["ambiguous"]`, since the model cannot answer with a
number in this protocol.

Scores run 0..100; `reward` is the score gain of a step divided by 100. The episode
is won when the engine completes it with score 100, and lost when it completes
otherwise (a negative score, e.g. focusing on a wrong object) or at the turn limit.
An exception from the engine (e.g. the JVM died) ends the episode lost with
`info.error` set; after a dead JVM the env must be rebuilt.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import random
import re
import shutil
from typing import Any, Mapping, Sequence

from sage_opd_jax.envs.base import NOTHING_HAPPENS, EnvSpec, StepInfo, StepResult, Task, register

ENV_NAME = "scienceworld"
EXPERT_NAME = "scienceworld_gold_path"  # The expert `gold_demonstration` plays (demos' manifests name it).
SPLITS = ("train", "dev", "test")
# Prefixes of the engine's answers to commands it cannot parse or ground.
_REJECTIONS = ("No known action matches that input", "Unknown action.")
_AMBIGUOUS = "Ambiguous request"
_MAX_SCORE = 100
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])")


def java_available() -> bool:
  """Whether a `java` executable is on PATH (the engine runs in a JVM)."""
  return shutil.which("java") is not None


def spread_over_verbs(actions: Sequence[str], n: int) -> list[str]:
  """`n` of `actions`, one verb at a time: each verb's shortest action, then its next, ...

  A verb is an action's first word ("go", "focus", "pick"); within a verb, actions go
  by word count, then alphabetically, and verbs by their shortest action. A pure
  function of the set of actions, so a replayed state lists the same ones.
  """
  by_verb: dict[str, list[str]] = {}
  for action in sorted(set(actions), key=lambda a: (len(a.split()), a)):
    by_verb.setdefault(action.split(" ", 1)[0], []).append(action)
  queues = list(by_verb.values())
  out: list[str] = []
  depth = 0
  while len(out) < n and any(depth < len(q) for q in queues):
    out += [q[depth] for q in queues if depth < len(q)][: n - len(out)]
    depth += 1
  return out


def _config_kwargs(env: Mapping[str, Any]) -> dict[str, Any]:
  """Its own settings, when the config sets them (configs/scienceworld_*.py do; absent, the defaults apply)."""
  kwargs = {"simplifications": env["simplifications"]} if "simplifications" in env else {}
  if "max_admissible" in env:
    kwargs["max_admissible"] = env["max_admissible"] or None  # 0: every admissible action.
  return kwargs


def _build_tokenizer(env_kwargs: Mapping[str, Any], out_dir: pathlib.Path, demos_dirs: Sequence[pathlib.Path]) -> str:
  """The pipeline's tokenizer: the engine's object, action and task names (`vocabulary_texts`) and
  the collected gold paths' texts, since ScienceWorld has no game files to read."""
  from sage_opd_jax import tokenization  # Here: the env module itself stays free of the tokenizer stack.
  from sage_opd_jax.envs import demos

  env = ScienceWorldEnv(**env_kwargs)
  try:
    engine_texts = env.vocabulary_texts()
  finally:
    env.close()
  return tokenization.build_corpus_tokenizer(
      [*engine_texts, *demos.demo_texts(demos_dirs)], out_dir,
      source="ScienceWorld object/action/task names and the collected gold-path demonstrations")


# Its gold path is one fixed episode, so it has no expert to shadow another agent's episode.
@register(ENV_NAME, EnvSpec(splits=SPLITS, own_keys=("simplifications", "max_admissible"),
                            config_kwargs=_config_kwargs, tokenizer=_build_tokenizer))
class ScienceWorldEnv:
  """One ScienceWorld engine (one JVM). Not thread-safe; one per worker.

  The first three arguments are the ones every env takes from the trainer
  (`train.env_kwargs`); the last two are ScienceWorld's own.

  Args:
    task_types: the task types that `tasks()` lists (None: all 30).
    max_turns: the turn limit; every `step` call counts, invalid ones too.
    seed: shuffles each split's task order, reproducibly (as ALFWorld's does), so
      that the first N tasks of a split mix its task types.
    simplifications: the engine's simplification string, e.g. "easy" or
      "noElectricalAction" (which also removes `connect` actions from the list).
    max_admissible: keep only this many admissible actions, spread over their verbs
      (`spread_over_verbs`); None keeps all. The engine lists every action-object
      combination alphabetically, often several hundred to over a thousand, mostly
      two-object `move`/`pour`/`mix` ones, so its first N would all be `activate`
      and `close` ones.
  """

  def __init__(
      self,
      task_types: Sequence[str] | None = None,
      max_turns: int = 100,
      seed: int = 0,
      simplifications: str = "",
      max_admissible: int | None = None,
  ):
    if not java_available():
      raise RuntimeError(
          "ScienceWorld needs Java (its engine runs in a JVM), but no `java` is on PATH; "
          "install a JRE >= 11, e.g. `apt-get install default-jre-headless`."
      )
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1; got {max_turns}.")
    if max_admissible is not None and max_admissible < 0:
      raise ValueError(f"max_admissible must be >= 0 or None; got {max_admissible}.")
    from scienceworld import ScienceWorldEnv as _Engine  # Heavy: starts the JVM.

    # py4j logs the gateway's routine shutdown (close) at INFO, with tracebacks of its own
    # callback server; nothing failed, and a run's INFO log should not look like a crash.
    logging.getLogger("py4j").setLevel(logging.WARNING)

    # The engine's own limit counts only accepted moves; ours counts turns, so set the
    # engine's one above ours and let ours decide.
    self._engine = _Engine("", envStepLimit=max_turns + 1)
    all_types = list(self._engine.get_task_names())
    if task_types is None:
      task_types = all_types
    unknown = sorted(set(task_types) - set(all_types))
    if unknown:
      raise ValueError(f"task_types has unknown ScienceWorld tasks {unknown}; known: {all_types}.")
    self._task_types = sorted(task_types)
    self._seed = seed
    self._simplifications = simplifications
    self._max_turns = max_turns
    self._max_admissible = max_admissible
    self._variations: dict[tuple[str, str], list[int]] = {}
    self._task: Task | None = None
    self._task_text = ""
    self._turns = 0
    self._score = 0
    self._done = True

  # -- Tasks -----------------------------------------------------------------

  def variations(self, task_type: str, split: str) -> list[int]:
    """The variation indices of `task_type` in `split`, sorted.

    Cached per task type: the first call loads the task (~0.1-0.4 s), which ends any
    running episode, so list tasks before resetting.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    key = (task_type, split)
    if key not in self._variations:
      self._engine.load(task_type, 0, self._simplifications)
      self._variations[(task_type, "train")] = sorted(self._engine.get_variations_train())
      self._variations[(task_type, "dev")] = sorted(self._engine.get_variations_dev())
      self._variations[(task_type, "test")] = sorted(self._engine.get_variations_test())
      self._done = True  # Loading replaced whatever episode was running.
    return list(self._variations[key])

  def tasks(self, split: str) -> list[Task]:
    """Every (task type, variation) of `split`, sorted by both, then shuffled by `seed`."""
    tasks = [
        self.make_task(task_type, variation, split)
        for task_type in self._task_types
        for variation in self.variations(task_type, split)
    ]
    random.Random(self._seed).shuffle(tasks)
    return tasks

  def make_task(self, task_type: str, variation: int, split: str) -> Task:
    return Task(
        env=ENV_NAME,
        split=split,
        task_id=f"{task_type}/{variation}",
        task_type=task_type,
        meta={"variation": variation, "simplifications": self._simplifications},
    )

  def vocabulary_texts(self) -> list[str]:
    """The engine's own names, for a tokenizer's vocabulary beyond what demonstrations show.

    Every object class of the simulator ("GiantTortoise" as "giant tortoise"), every
    action template and every task name, so that objects met only in dev or test
    variations still have words. The engine lists actions only with a task loaded, so
    this loads one, which ends any running episode.
    """
    self._engine.load(self._task_types[0], 0, self._simplifications)
    self._done = True
    classes = [name.rsplit(".", 1)[-1] for name in self._engine.get_object_types()]
    objects = [_CAMEL_RE.sub(" ", name).lower() for name in classes]
    templates = [t.replace("OBJ", " ") for t in self._engine.get_possible_actions()]
    tasks = [name.replace("-", " ") for name in self._engine.get_task_names()]
    return sorted({*objects, *templates, *tasks, NOTHING_HAPPENS})

  # -- Episodes --------------------------------------------------------------

  def _load(self, task: Task, gold: bool) -> None:
    if task.env != ENV_NAME:
      raise ValueError(f"task.env is {task.env!r}, not {ENV_NAME!r}.")
    if "variation" not in task.meta:
      raise ValueError(f"task.meta of {task.task_id!r} lacks 'variation'.")
    self._engine.load(
        task.task_type, int(task.meta["variation"]), task.meta.get("simplifications", self._simplifications),
        generateGoldPath=gold,
    )

  def _admissible(self, actions: Sequence[str] | None = None) -> list[str]:
    """The engine's valid combinations (`actions`, else asked for), cut to `max_admissible`."""
    if actions is None:
      actions = self._engine.get_valid_action_object_combinations()
    if self._max_admissible is None:
      return list(actions)
    return spread_over_verbs(actions, self._max_admissible)

  def reset(self, task: Task) -> tuple[str, StepInfo]:
    return self._begin(task, gold=False)

  def reset_with_gold(self, task: Task) -> tuple[str, StepInfo, list[str]]:
    """Like `reset`, plus the engine's gold action sequence for this very episode.

    The engine draws the gold path anew on every load (e.g. which non-living thing
    to fetch), so it is only valid for the episode started by the same load. It
    may run past the winning step (e.g. a final "wait1"); follow it until `done`.
    """
    observation, info = self._begin(task, gold=True)
    return observation, info, list(self._engine.get_gold_action_sequence())

  def _begin(self, task: Task, gold: bool) -> tuple[str, StepInfo]:
    self._load(task, gold=gold)
    observation, engine_info = self._engine.reset()
    self._task = task
    self._task_text = self._engine.get_task_description()
    self._turns = 0
    self._score = int(engine_info["score"])
    self._done = False
    return observation, StepInfo(task=self._task_text, admissible_actions=self._admissible())

  def step(self, action_text: str | None) -> StepResult:
    if self._done:
      raise RuntimeError("step() called with no running episode; call reset(task) first.")
    self._turns += 1
    extra: dict = {}
    if action_text is None:
      observation, valid, reward, engine_done, admissible = NOTHING_HAPPENS, False, 0.0, False, None
    else:
      try:
        observation, valid, reward, engine_done, admissible = self._engine_step(action_text, extra)
      except Exception as e:  # pylint: disable=broad-except
        # A crash in the JVM or the bridge to it fails this episode, not the run.
        self._done = True
        info = StepInfo(task=self._task_text, admissible_actions=[], lost=True, valid=False,
                        error=f"{type(e).__name__}: {e}", extra={"score": self._score})
        return StepResult(observation=NOTHING_HAPPENS, reward=0.0, done=True, info=info)
    won = engine_done and self._score >= _MAX_SCORE
    lost = not won and (engine_done or self._turns >= self._max_turns)
    self._done = won or lost
    extra["score"] = self._score
    if self._done:
      admissible = []
    elif admissible is None:
      admissible = self._admissible()
    info = StepInfo(
        task=self._task_text, admissible_actions=admissible, won=won, lost=lost, valid=valid, extra=extra
    )
    return StepResult(observation=observation, reward=reward, done=self._done, info=info)

  def _engine_step(self, action: str, extra: dict) -> tuple[str, bool, float, bool, list[str]]:
    """(observation, valid, reward, engine done, admissible actions) of one engine command."""
    observation, _, engine_done, engine_info = self._engine.step(action)
    if observation.startswith(_AMBIGUOUS):
      extra["ambiguous"] = observation
      observation, _, engine_done, engine_info = self._engine.step("0")
    valid = not observation.startswith(_REJECTIONS)
    if not valid:
      extra["engine_observation"] = observation
      observation = NOTHING_HAPPENS
    score = int(engine_info["score"])
    reward = (score - self._score) / _MAX_SCORE
    self._score = score
    # The engine's step already listed the valid combinations; reuse them.
    return observation, valid, reward, engine_done, self._admissible(engine_info["valid"])

  def close(self) -> None:
    self._engine.close()


@dataclasses.dataclass
class Demonstration:
  """One episode played by an expert, laid out like ALFWorld's expert episodes.

  `observations[0]` is the reset's and `observations[t]` answers `actions[t-1]`, so
  there is one more observation than actions; `admissible_actions[t]` is the list in
  force when `actions[t]` was chosen.
  """

  task: Task
  task_text: str
  observations: list[str]
  actions: list[str]
  valid: list[bool]
  rewards: list[float]
  won: bool
  admissible_actions: list[list[str]] = dataclasses.field(default_factory=list)


def gold_demonstration(env: ScienceWorldEnv, task: Task) -> Demonstration:
  """Plays the gold path of `task` in the real engine, stopping when the episode ends.

  The gold path answers the engine's ambiguity questions with a number ("0"). The
  env already answers "0" itself, so such an answer is dropped; any other number
  would need a reading the env does not pick, and raises.
  """
  observation, info, actions = env.reset_with_gold(task)
  demo = Demonstration(task, info.task, [observation], [], [], [], won=False)
  admissible = info.admissible_actions
  after_ambiguity = False
  for action in actions:
    if after_ambiguity and action.strip().isdigit():
      if action.strip() != "0":
        raise ValueError(f"gold path of {task.task_id!r} picks reading {action!r} of an ambiguous command; "
                         "the env always picks reading 0.")
      after_ambiguity = False
      continue
    result = env.step(action)
    after_ambiguity = "ambiguous" in result.info.extra
    demo.admissible_actions.append(admissible)
    demo.actions.append(action)
    demo.valid.append(result.info.valid)
    demo.rewards.append(result.reward)
    demo.observations.append(result.observation)
    demo.won = result.info.won
    admissible = result.info.admissible_actions
    if result.done:
      break
  return demo
