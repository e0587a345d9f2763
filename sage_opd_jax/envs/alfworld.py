"""ALFWorld on the real engine (alfworld 0.4.2 / TextWorld 1.7.0) behind `base.Env`.

Games are the `game.tw-pddl` files of ALFWorld's `json_2.1.1/` layout:
`<data_dir>/json_2.1.1/<split>/<task_type>-<object>-<mrecep>-<recep>-<scene>/<trial>/game.tw-pddl`
(for `look_at_obj_in_light` the fourth field is the toggle target, e.g. a desk lamp).

One TextWorld env is built per `AlfworldEnv` and reused across games (a fresh one costs
seconds). Resets route fast_downward's grounding through `GroundingCache`, so a game
that was reset once before (by any process sharing the cache folder) resets fast, and
resets and steps route the engine's TatSu snippet parsing through `ParseMemo`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import random
import re
from typing import Any, Iterator, Mapping, Sequence

from sage_opd_jax.envs.base import NOTHING_HAPPENS, EnvSpec, StepInfo, StepResult, Task, register

ENV_NAME = "alfworld"
SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
# ALFWorld's task families, with the integer ids its configs use (`env.task_types`).
TASK_TYPES = {
  1: "pick_and_place_simple",
  2: "look_at_obj_in_light",
  3: "pick_clean_then_place_in_recep",
  4: "pick_heat_then_place_in_recep",
  5: "pick_cool_then_place_in_recep",
  6: "pick_two_obj_and_place",
}
DATA_SUBDIR = "json_2.1.1"
GAME_FILE = "game.tw-pddl"
# The engine's first observation opens with this banner; it carries nothing for the agent.
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_TASK_PREFIX = "Your task is to:"
# "put X in/on Y" (the wording ALFWorld prompts and older engines use) and the 0.4.2
# engine's "move X to Y" name the same action.
_PUT_RE = re.compile(r"put (?P<obj>.+?) (?:in/on|in|on|into|onto|inside|to) (?P<recep>.+)")
_MOVE_RE = re.compile(r"move (?P<obj>.+?) to (?P<recep>.+)")


def missing_data_message(looked_at: str) -> str:
  """The missing-data error text: where data was looked for, and how to get it."""
  return (
    f"ALFWorld game files not found: looked for {looked_at} (the `data_dir` argument, else "
    f"$ALFWORLD_DATA), expecting {DATA_SUBDIR}/<split>/<task folder>/<trial>/{GAME_FILE} inside. "
    "Get them with `alfworld-download` and `export ALFWORLD_DATA=<the folder it wrote>`, or in "
    'this workspace: `export ALFWORLD_DATA="$(../shared/alfworld/unpack)"`.'
  )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """The folder holding `json_2.1.1/`: `data_dir`, else `$ALFWORLD_DATA`; raises if absent."""
  if data_dir is None:
    data_dir = os.environ.get("ALFWORLD_DATA")
    if not data_dir:
      raise FileNotFoundError(
        missing_data_message("nothing: data_dir=None and ALFWORLD_DATA is unset")
      )
  path = pathlib.Path(data_dir).expanduser()
  if not (path / DATA_SUBDIR).is_dir():
    raise FileNotFoundError(missing_data_message(str(path / DATA_SUBDIR)))
  return path


def parse_task_folder(folder: str) -> dict[str, Any]:
  """Task parameters from a folder name such as `pick_two_obj_and_place-CD-None-Safe-308`, or from a
  game's `<task folder>/<trial>` id (the trial is ignored).

  Returns `task_type`, `object`, `mrecep`, `recep`, `toggle`, `scene`, `sliced`, and
  `pddl_params` in the layout of ALFRED's `traj_data.json` (what ALFWorld's hand-coded
  expert reads): `object_target`, `parent_target`, `toggle_target`, `mrecep_target`,
  `object_sliced`, with "" for an absent target.
  """
  folder = folder.split("/", 1)[0]
  parts = folder.split("-")
  if len(parts) != 5 or parts[0] not in TASK_TYPES.values() or not parts[4].isdigit():
    raise ValueError(
      f"ALFWorld task folder {folder!r} does not match "
      "<task_type>-<object>-<mrecep>-<recep or toggle>-<scene>."
    )
  task_type, obj, mrecep, target, scene = parts
  mrecep = None if mrecep == "None" else mrecep
  # The fourth field names the light to turn on for this family, the receptacle otherwise.
  toggle = target if task_type == "look_at_obj_in_light" else None
  recep = None if toggle is not None else target
  sliced = obj.endswith("Sliced")
  return {
    "task_type": task_type,
    "object": obj,
    "mrecep": mrecep,
    "recep": recep,
    "toggle": toggle,
    "scene": int(scene),
    "sliced": sliced,
    "pddl_params": {
      "object_target": obj[: -len("Sliced")] if sliced else obj,
      "parent_target": recep or "",
      "toggle_target": toggle or "",
      "mrecep_target": mrecep or "",
      "object_sliced": sliced,
    },
  }


# Task families whose subgoals `subgoal_thoughts` knows.
THOUGHT_TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light")
# A take command: the object instance and the receptacle it is taken from.
TAKE_RE = re.compile(r"take (?P<obj>\S+ \d+) from (?P<recep>.+)")


def subgoal_thoughts(task_id: str, actions: Sequence[str], observations: Sequence[str], *,
                     name_take: bool = False) -> list[str]:
  """ReAct-style subgoal thoughts for an expert episode: one per action.

  Why: a tiny model trained on bare actions must match the task's object, hundreds of
  tokens back, against the current observation in one step, and it does not learn to
  (it walks past the object). A thought that restates the subgoal ("find soapbottle",
  then "put soapbottle 3 in countertop") puts the thing to match a few tokens before
  the action, which is the scratchpad's usual trick. The thoughts are read off the
  game's own task parameters and the episode's pick-ups, so they are always right.

  With `name_take` the turn that takes the task's object thinks "take {object}" instead of
  "find {object}": the object is named 3 tokens before the action's, and "is it here?" is the
  thought's first word. It was a test of one reading of the tiny pick teacher's commonest loss,
  a take of another object (16 of its 20 on valid_seen), as a failed binding between the task's
  object and the take's. It did not help (13 of 35 valid_seen games won against 15): the object
  was absent at those takes, so the teacher believes it is there rather than mis-binding it. A thought
  is what the expert means to do, so it depends on the action, never on the feedback that
  answers it.

  Args:
    task_id: the game's `<task folder>/<trial>` (`parse_task_folder` reads the folder).
    actions: a_1..a_T.
    observations: o_1..o_T (o_{t+1} answers a_t; a final o_{T+1} may follow).
    name_take: think "take {object}" on the turns that take the task's object.

  Returns:
    T thoughts: "find {object}" until the object is picked up, then "put {object N} in
    {receptacle}" (pick_and_place_simple) or "find {light}" and, once it is in view,
    "use {light N}" (look_at_obj_in_light).
  """
  params = parse_task_folder(task_id)
  if params["task_type"] not in THOUGHT_TASK_TYPES:
    raise ValueError(f"subgoal_thoughts: task type {params['task_type']!r} of {task_id!r} has no subgoal "
                     f"template; known: {THOUGHT_TASK_TYPES}.")
  obj = params["pddl_params"]["object_target"].lower()
  held = None  # "soapbottle 3" once picked up.
  thoughts = []
  for t, action in enumerate(actions):
    take = TAKE_RE.fullmatch(action)
    takes_task_object = take is not None and take["obj"].split()[0] == obj
    if held is None:
      thoughts.append(f"take {obj}" if name_take and takes_task_object else f"find {obj}")
    elif params["toggle"] is None:
      thoughts.append(f"put {held} in {params['recep'].lower()}")
    else:
      light = params["toggle"].lower()
      use = re.fullmatch(rf"use ({light} \d+)", action)
      thoughts.append(f"use {use[1]}" if use else f"find {light}")
    answered = observations[t + 1] if t + 1 < len(observations) else ""
    if takes_task_object and answered.startswith("You pick up"):
      held = take["obj"]
  return thoughts


def _normalize(command: str) -> str:
  """Lower case, single spaces: the form commands are compared in."""
  return " ".join(command.lower().split())


def canonical_command(action: str, admissible: Sequence[str]) -> str | None:
  """The admissible command that `action` names, or None when it names none.

  Case and whitespace do not matter, and "put X in/on Y" and "move X to Y" are the same
  command, whichever of the two the engine lists.
  """
  by_normal = {_normalize(c): c for c in admissible}
  normal = _normalize(action).rstrip(".")
  if normal in by_normal:
    return by_normal[normal]
  put = _PUT_RE.fullmatch(normal)
  if put:
    return by_normal.get(f"move {put['obj']} to {put['recep']}")
  move = _MOVE_RE.fullmatch(normal)
  if move:
    for preposition in ("in/on", "in", "on"):
      candidate = by_normal.get(f"put {move['obj']} {preposition} {move['recep']}")
      if candidate is not None:
        return candidate
  return None


def _task_text(observation: str) -> str:
  for line in observation.splitlines():
    if line.startswith(_TASK_PREFIX):
      return line.strip()
  raise ValueError(f"The first ALFWorld observation has no {_TASK_PREFIX!r} line: {observation!r}")


def _strip_banner(observation: str) -> str:
  return observation.replace(_BANNER, "", 1).strip()


# An observation listing what is on or in a receptacle (what a take could pick up).
SHOWS_OBJECTS = re.compile(r"(?:On the [a-z]+ \d+|In it), you see a ")


def with_object_hint(observation: str, obj: str) -> str:
  """`observation` with "There is the {obj} N." before the list of what it sees, where that list
  names an instance of the task's object `obj`.

  Why: a from-scratch student must match the task's object, hundreds of tokens back, against the
  list of what it sees, and a tiny one learns its training rooms instead (docs/results.md). The
  hint puts that match into a few fixed words, so a controlled experiment can separate what a
  student cannot read from what its training teaches it. It goes before the list, not after it:
  ALFWorld's expert reads everything after "you see" as the list. Only the first instance named
  is hinted.
  """
  shows = SHOWS_OBJECTS.search(observation)
  if shows is None:
    return observation
  found = re.search(rf"\b{re.escape(obj)} \d+\b", observation[shows.end():])
  if found is None:
    return observation
  return f"{observation[:shows.start()]}There is the {found[0]}. {observation[shows.start():]}"


@dataclasses.dataclass
class _Episode:
  task: Task
  walkthrough: list[str]
  admissible: list[str]
  task_text: str
  facts: list[Any]  # The state's facts; empty unless the env requests them.
  plan: list[str]  # The planner's commands from this state; empty unless requested.
  turn: int = 0
  done: bool = False


def _build_tokenizer(env_kwargs: Mapping[str, Any], out_dir: pathlib.Path, demos_dirs: Sequence[pathlib.Path]) -> str:
  """The pipeline's tokenizer: every game's names, of every split (the demonstrations add none)."""
  del demos_dirs
  from sage_opd_jax import tokenization  # Here: the env module itself stays free of the tokenizer stack.

  return tokenization.build_alfworld_tokenizer(resolve_data_dir(env_kwargs.get("data_dir")), out_dir)


@register(ENV_NAME, EnvSpec(
    splits=SPLITS,
    own_keys=("data_dir", "object_hint"),
    # object_hint only where set: demos collected without it record no such key, and stay valid to resume.
    config_kwargs=lambda env: {"data_dir": env.get("data_dir") or None,  # Empty: $ALFWORLD_DATA.
                               **({"object_hint": True} if env.get("object_hint") else {})},
    # A pipeline names the folder it found, so every stage's config does.
    resolve=lambda env: {"data_dir": str(resolve_data_dir(env.get("data_dir") or None))},
    tokenizer=_build_tokenizer,
    # The imitable expert reads the game's facts, and can follow any episode from its state.
    expert="sage_opd_jax.envs.alfworld_expert:ImitableExpert",
    expert_kwargs={"facts": True},
    data_options=("demos.search_order", "demos.passes", "sft.thoughts", "sft.renamed_copies", "sft.renumbered_copies"),
))
class AlfworldEnv:
  """ALFWorld text games on the real TextWorld engine; one instance per worker."""

  def __init__(
    self,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    max_turns: int = 30,
    task_types: Sequence[str | int] | None = None,
    seed: int = 0,
    facts: bool = False,
    policy_commands: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    grounding_cache: bool = True,
    parse_memo: bool = True,
    object_hint: bool = False,
  ):
    """Builds the env.

    Args:
      data_dir: the folder holding `json_2.1.1/`; None reads `$ALFWORLD_DATA`.
      max_turns: steps per episode; the last one ends the episode, lost unless won.
      task_types: keep only these families (names, or ALFWorld's ids 1-6); None keeps all.
      seed: shuffles each split's task order, reproducibly.
      facts: also return the game's facts in `info.extra["facts"]` (the hand-coded
        expert reads them; they cost time on every step).
      policy_commands: also return fast_downward's plan from the current state in
        `info.extra["policy_commands"]`. Off by default: it replans on every step, takes
        0.3-8 s a call on ALFWorld games and can hang in C code.
      cache_dir: where grounded games are cached; None is
        `${XDG_CACHE_HOME:-~/.cache}/sage_opd_jax/alfworld_grounding`. Never put it
        beside the game files (read-only in CI, and never to be committed).
      grounding_cache: False grounds every reset from scratch (benchmarks, tests).
      parse_memo: False parses every text snippet from scratch (benchmarks, tests).
      object_hint: put "There is the {object N}." before each list of what the agent sees that
        names the task's object (`with_object_hint`): a legibility aid for controlled experiments.
    """
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
    self.data_dir = resolve_data_dir(data_dir)
    self.max_turns = max_turns
    self.task_types = self._resolve_task_types(task_types)
    self.seed = seed
    self.facts = facts
    self.policy_commands = policy_commands
    self.object_hint = object_hint
    # The engine loads here, not on import: reading the env's `EnvSpec` needs no TextWorld.
    import textworld
    import textworld.gym
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    from sage_opd_jax.envs import alfworld_cache

    self.cache = alfworld_cache.GroundingCache(cache_dir) if grounding_cache else None
    self.parse_memo = alfworld_cache.ParseMemo() if parse_memo else None
    self._tasks: dict[str, list[Task]] = {}
    self._episode: _Episode | None = None

    request_infos = textworld.EnvInfos(
      won=True,
      admissible_commands=True,
      facts=facts,
      policy_commands=policy_commands,
      extras=["gamefile"],
    )
    env_id = textworld.gym.register_games(
      [],
      request_infos,
      batch_size=1,
      asynchronous=False,
      # Our own turn counter ends episodes; the engine's limit only needs to not be hit first.
      max_episode_steps=max_turns + 1,
      wrappers=[AlfredDemangler(shuffle=False), AlfredInfos],
    )
    # The batch env's load/reset/step play a chosen game on one reused engine; the gym
    # env's own reset would cycle through a fixed game list instead.
    self._engine = textworld.gym.make(env_id).batch_env

  @staticmethod
  def _resolve_task_types(task_types: Sequence[str | int] | None) -> frozenset[str] | None:
    if task_types is None:
      return None
    names = set()
    for task_type in task_types:
      name = TASK_TYPES.get(task_type, task_type) if isinstance(task_type, int) else task_type
      if name not in TASK_TYPES.values():
        raise ValueError(
          f"Unknown ALFWorld task_types entry {task_type!r}; expected one of "
          f"{sorted(TASK_TYPES.values())} or their ids {sorted(TASK_TYPES)}."
        )
      names.add(name)
    return frozenset(names)

  def tasks(self, split: str) -> Sequence[Task]:
    """Every game of `split` (filtered by `task_types`), shuffled by `seed`."""
    if split not in SPLITS:
      raise ValueError(f"Unknown ALFWorld split {split!r}; expected one of {SPLITS}.")
    if split not in self._tasks:
      split_dir = self.data_dir / DATA_SUBDIR / split
      if not split_dir.is_dir():
        raise FileNotFoundError(missing_data_message(str(split_dir)))
      tasks = []
      for gamefile in sorted(split_dir.glob(f"*/*/{GAME_FILE}")):
        trial_dir = gamefile.parent
        meta = parse_task_folder(trial_dir.parent.name)
        if self.task_types is not None and meta["task_type"] not in self.task_types:
          continue
        meta["gamefile"] = str(gamefile)
        meta["trial"] = trial_dir.name
        tasks.append(
          Task(
            env=ENV_NAME,
            split=split,
            task_id=f"{trial_dir.parent.name}/{trial_dir.name}",
            task_type=meta["task_type"],
            meta=meta,
          )
        )
      random.Random(self.seed).shuffle(tasks)
      self._tasks[split] = tasks
    return list(self._tasks[split])

  def reset(self, task: Task) -> tuple[str, StepInfo]:
    """Loads `task`'s game on the shared engine; returns the room and task description.

    `info.extra["walkthrough"]` is the game file's own winning command list (empty if
    the file has none).
    """
    if task.env != ENV_NAME:
      raise ValueError(f"Task {task.task_id!r} is for env {task.env!r}, not {ENV_NAME!r}.")
    gamefile = task.meta.get("gamefile")
    if not gamefile or not os.path.isfile(gamefile):
      raise FileNotFoundError(f"Task {task.task_id!r}: game file {gamefile!r} does not exist.")
    with open(gamefile) as f:
      walkthrough = list(json.load(f).get("walkthrough") or [])

    self._episode = None
    with self._speedups():
      self._engine.load([gamefile])
      observations, infos = self._engine.reset()

    observation = _strip_banner(observations[0])
    admissible = list(infos["admissible_commands"][0])
    self._episode = _Episode(
      task=task,
      walkthrough=walkthrough,
      admissible=admissible,
      task_text=_task_text(observation),
      facts=list(infos["facts"][0]) if self.facts else [],
      plan=list(infos["policy_commands"][0]) if self.policy_commands else [],
    )
    observation = self._hinted(observation)
    info = StepInfo(
      task=self._episode.task_text,
      admissible_actions=list(admissible),
      won=bool(infos["won"][0]),
      extra=self._extra(command=None),
    )
    return observation, info

  def step(self, action_text: str | None) -> StepResult:
    """Plays one command (see `canonical_command`); None is an unparseable response."""
    episode = self._episode
    if episode is None:
      raise RuntimeError("AlfworldEnv.step called before reset.")
    if episode.done:
      raise RuntimeError(
        f"AlfworldEnv.step called after episode {episode.task.task_id!r} ended; reset first."
      )
    episode.turn += 1

    command = None if action_text is None else canonical_command(action_text, episode.admissible)
    won, error = False, None
    if command is None:
      # The engine answers a non-admissible command with this text and an unchanged state,
      # so it is answered here without the engine's cost.
      observation = NOTHING_HAPPENS
    else:
      try:
        with self._speedups():
          observations, _, _, infos = self._engine.step([command])
        observation = observations[0]
        won = bool(infos["won"][0])
        episode.admissible = list(infos["admissible_commands"][0])
        if self.facts:
          episode.facts = list(infos["facts"][0])
        if self.policy_commands:
          episode.plan = list(infos["policy_commands"][0])
      except Exception as e:  # pylint: disable=broad-except
        # An engine crash fails this episode only; the error is reported in the info.
        observation, error = NOTHING_HAPPENS, f"{type(e).__name__}: {e}"

    episode.done = won or error is not None or episode.turn >= self.max_turns
    info = StepInfo(
      task=episode.task_text,
      admissible_actions=list(episode.admissible),
      won=won,
      lost=episode.done and not won,
      valid=command is not None,
      error=error,
      extra=self._extra(command=command),
    )
    reward = 1.0 if won else 0.0
    return StepResult(observation=self._hinted(observation), reward=reward, done=episode.done, info=info)

  def _hinted(self, observation: str) -> str:
    if not self.object_hint:
      return observation
    obj = parse_task_folder(self._episode.task.task_id)["pddl_params"]["object_target"]
    return with_object_hint(observation, obj.lower())

  @contextlib.contextmanager
  def _speedups(self) -> Iterator[None]:
    """Installs the enabled engine caches for one engine call."""
    with contextlib.ExitStack() as stack:
      for cache in (self.cache, self.parse_memo):
        if cache is not None:
          stack.enter_context(cache.installed())
      yield

  def _extra(self, command: str | None) -> dict[str, Any]:
    episode = self._episode
    extra: dict[str, Any] = {
      "gamefile": episode.task.meta["gamefile"],
      "walkthrough": list(episode.walkthrough),
      "turn": episode.turn,
      # The admissible command actually played (e.g. "move X to Y" for "put X in Y").
      "command": command,
    }
    if self.facts:
      # After an invalid command the state, hence its facts, did not change.
      extra["facts"] = list(episode.facts)
    if self.policy_commands:
      extra["policy_commands"] = list(episode.plan)
    return extra

  def close(self) -> None:
    """Releases the engine."""
    self._engine.close()
