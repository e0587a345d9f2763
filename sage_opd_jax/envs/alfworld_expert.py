"""ALFWorld's imitable expert (`HandCodedTWAgent`), driven through the `Env` protocol.

Why this expert and not the planner: the planner (`policy_commands`) knows where every
hidden object is and goes straight to it, which a policy that sees only observations
cannot imitate; it is also slow and can hang. The hand-coded expert that ALFWorld's
DAgger agents learn from explores receptacles with object-placement priors until it
has seen what it needs, and reads only the game's facts for its predicates.

Three things make it run on these games (alfworld 0.4.2, no `traj_data.json`):
- Its `reset` reads the task parameters from `traj_data.json`; here they come from the
  game's folder name (`alfworld.parse_task_folder`), and the env is built with
  `facts=True`.
- The engine says `move X to Y` where the expert's state tracking looks for `put`; its
  last action is given back with `put`, or it never empties its inventory and every
  pick_two game fails.
- The env strips ALFWorld's banner from the first observation, and the expert
  recognises that intro (the receptacle list) by the banner, so its own view of the
  first observation keeps it.

As in ALFWorld's `AlfredExpert` wrapper, an inadmissible command becomes "look". Its
fallback when it would repeat itself is a random admissible command; here that is
drawn from a seeded generator, and only among commands whose every entity has been seen
in an observation, so that the expert never acts on an object before observing it
(`unobserved_entities` checks every action it plays).

Its search visits the receptacles its priors name in one fixed order per room (the
room's listing, reversed), so a room's demonstrations all search alike, and a policy
trained on them can learn where an object usually is in place of reading whether it is
there. `search_order="shuffled"` draws that order (and the order among receptacles of a
target type) from the seeded generator: the same priors, visited in a random order. A tiny
teacher trained on three shuffled passes searched at random and won fewer games (7 of 35
valid_seen against 15 in the fixed order).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import re
import time
from typing import Any, Callable, Iterator, Sequence

import alfworld.gen.constants as alfred_constants
from alfworld.agents.expert import HandCodedAgentFailed, HandCodedAgentTimeout, HandCodedTWAgent
from alfworld.agents.expert import handcoded_expert
from textworld.envs.pddl.pddl import PddlEnv

from sage_opd_jax.config import SEARCH_ORDERS
from sage_opd_jax.envs import alfworld as alfworld_env
from sage_opd_jax.envs import base

EXPERT_NAME = "alfworld_handcoded"
# What the env strips from the first observation, and what the expert looks for there.
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
# ALFWorld names every object and receptacle "<class> <number>", e.g. "countertop 2".
_ENTITY_RE = re.compile(r"\b[a-z]+ \d+\b")


class ExpertError(RuntimeError):
  """The expert broke one of its own rules (e.g. acted on an unobserved object)."""


def task_params(task: base.Task) -> dict[str, Any]:
  """The expert's task parameters (`traj_data.json`'s layout) from the task's folder name.

  Raises:
    ValueError: naming the task and field, if the task lacks ALFWorld metadata or names
      a target the expert does not know.
  """
  meta = task.meta
  if "pddl_params" not in meta or "task_type" not in meta:
    raise ValueError(f"Task {task.task_id!r}: meta lacks 'pddl_params'/'task_type'; not an ALFWorld task.")
  params: dict[str, Any] = {"task_type": meta["task_type"]}
  for key, value in meta["pddl_params"].items():
    if isinstance(value, str) and value:
      if value not in alfred_constants.OBJECTS:
        raise ValueError(f"Task {task.task_id!r}: pddl_params[{key!r}]={value!r} is not an ALFRED object class.")
      value = value.lower()  # The demangled game names them in lower case.
    params[key] = value
  return params


def entities(command: str) -> list[str]:
  """The object and receptacle names a command mentions, e.g. ["apple 1", "fridge 1"]."""
  return _ENTITY_RE.findall(command)


def unobserved_entities(command: str, observed_text: str) -> list[str]:
  """The entities of `command` that never appear in `observed_text`."""
  return [e for e in entities(command) if not re.search(rf"\b{re.escape(e)}\b", observed_text)]


def tracking_wording(command: str) -> str:
  """The expert's last command as its state tracking must read it.

  The engine's "move X to Y" is the expert's "put": its tracking pops the inventory
  only on a command containing "put".
  """
  return "put" + command[len("move"):] if command.startswith("move ") else command


@contextlib.contextmanager
def _seeded_module_random(rng: random.Random) -> Iterator[None]:
  """Makes the expert's `random.choice` calls draw from `rng`, for reproducible demos."""
  saved = handcoded_expert.random
  handcoded_expert.random = rng
  try:
    yield
  finally:
    handcoded_expert.random = saved


class ImitableExpert:
  """One episode of ALFWorld's hand-coded expert on one task.

  Feed it the env's answers: `first_action(observation, info)` after reset, then
  `next_action(result)` after each step. The env must be built with `facts=True`.

  Its state tracking follows the command the env actually played
  (`info.extra["command"]`), not the one it suggested, so it can also shadow another
  agent's episode and name the expert's action at each of its states (oracle labels,
  DAgger): step the env with any action, then ask `next_action(result)`.
  """

  def __init__(self, task: base.Task, max_steps: int = 150, seed: int = 0, search_order: str = "prior"):
    if search_order not in SEARCH_ORDERS:
      raise ValueError(f"search_order={search_order!r}: must be one of {SEARCH_ORDERS}.")
    self.params = task_params(task)
    agent = HandCodedTWAgent(max_steps=max_steps)
    self.policy = agent.get_task_policy(self.params)(self.params, max_steps=max_steps)
    self.rng = random.Random(seed)
    if search_order == "shuffled":
      # The policy searches `receptacles_to_check` from its end; these two build that list.
      for name in ("get_list_of_receptacles_to_search_for_object_cls", "get_list_of_receptacles_of_type"):
        setattr(self.policy, name, self._shuffled(getattr(self.policy, name)))
    self.observed_text = ""
    self.last_played = ""  # The last command the env played; "" before any or after an invalid one.
    self.search: tuple[str, ...] = ()  # `search_candidates` at the last action named.

  def _shuffled(self, receptacles_fn: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    def shuffled(cls: str) -> list[str]:
      receptacles = receptacles_fn(cls)
      self.rng.shuffle(receptacles)
      return receptacles
    return shuffled

  def first_action(self, observation: str, info: base.StepInfo) -> str:
    self.observed_text = observation
    return self._act(f"{_BANNER}\n\n{observation}", info)

  def next_action(self, result: base.StepResult) -> str:
    if "command" not in result.info.extra:
      raise ValueError("info.extra['command'] is missing: the expert follows AlfworldEnv's played command.")
    self.observed_text += "\n" + result.observation
    self.last_played = result.info.extra["command"] or ""
    return self._act(result.observation, result.info)

  def _act(self, observation: str, info: base.StepInfo) -> str:
    if "facts" not in info.extra:
      raise ValueError("info.extra['facts'] is missing: build the env with facts=True for the expert.")
    game_state = {
        "feedback": observation,
        "facts": info.extra["facts"],
        "admissible_commands": info.admissible_actions,
        "won": info.won,
    }
    last = self.last_played
    with _seeded_module_random(self.rng):
      action = self.policy.act(game_state, tracking_wording(last))
    # HandCodedAgent.act's rule: never repeat the last action, nor follow a "look" with
    # an inadmissible one; a random admissible (and fully observed) command instead.
    if action == last or (last == "look" and action not in info.admissible_actions):
      seen = [c for c in info.admissible_actions if not unobserved_entities(c, self.observed_text)]
      if not seen:
        raise ExpertError("No admissible command whose entities were all observed.")
      action = self.rng.choice(sorted(seen))
    # ALFWorld's own expert wrapper (AlfredExpert) offers "look" when the expert's
    # command is not admissible (e.g. closing a receptacle it has walked away from).
    if action not in info.admissible_actions:
      action = "look"
    missing = unobserved_entities(action, self.observed_text)
    if missing:
      raise ExpertError(f"Expert chose {action!r}, which names unobserved {missing}.")
    self.search = search_candidates(self.policy, action, info.admissible_actions)
    return action


def search_candidates(policy: Any, action: str, admissible: Sequence[str]) -> tuple[str, ...]:
  """The admissible `go to`s the expert's search could equally have named, when `action` is a search step; else ().

  While its subgoal is 'find' and it has not seen the class it looks for, `act` names `go to` of the last
  of `receptacles_to_check`: the unvisited receptacles, those its priors name for the class (for an object,
  the receptacles it is found in; for a receptacle class, those of that type) last, so searched first. Which
  of them is last is the room's listing order, not knowledge of where the object lies, so each receptacle of
  the same tier as the one named (prior-matching or not) is as good a next step. Call it right after `act`
  returned `action` (its state is the one that named it). `action` itself is in the tuple; () when the
  action was no search step (the class was seen, an open, a backlog close, a return to drop an object, a
  fallback).
  """
  if policy.subgoal_idx >= len(policy.subgoals):
    return ()
  sub_action, sub_param, _ = policy.get_next_subgoal()
  remaining = list(policy.receptacles_to_check)
  if (sub_action != "find" or sub_param in policy.obj_cls_to_receptacle_map or not remaining
      or action != f"go to {remaining[-1]}" or policy.action_backlog
      or (policy.inventory and not policy.is_agent_holding_right_object)):
    return ()
  # The policy's own `get_list_of_receptacles_of_type` / `..._to_search_for_object_cls` name the same sets,
  # but under search_order="shuffled" they are wrapped to shuffle with the expert's generator: calling them
  # here would draw from it and change the expert's later choices.
  if sub_param in policy.RECEPTACLES:
    prior = {r for r, cls in policy.receptacles.items() if cls == sub_param}
  else:
    prior = {r for r, cls in policy.receptacles.items() if cls in policy.OBJECT_TO_VAL_RECEPTACLE[sub_param]}
  tier = remaining[-1] in prior
  admissible = set(admissible)
  return tuple(f"go to {r}" for r in dict.fromkeys(remaining)
               if (r in prior) == tier and f"go to {r}" in admissible)


def _pddl_env(env: alfworld_env.AlfworldEnv) -> PddlEnv:
  """The innermost TextWorld env under AlfworldEnv's wrappers."""
  layer = env._engine.envs[0]  # pylint: disable=protected-access
  while not isinstance(layer, PddlEnv):
    layer = layer.__dict__.get("_wrapped_env")
    if layer is None:
      raise TypeError("AlfworldEnv's engine has no PddlEnv inside; cannot copy its state.")
  return layer


def peek(env: base.Env, action: str | None) -> tuple[str, bool]:
  """Steps a copy of the current state: returns (the env's feedback to `action`, valid).

  The episode is left exactly as it was: the env's turn count and admissible commands,
  and the engine's state. An inadmissible (or None) action is answered as
  `AlfworldEnv.step` answers it, without the engine. An admissible one is applied on
  the engine and undone: fast_downward keeps the game state in its C library with a
  registry of visited states (`get_state_id`/`set_state_id` return to one), and
  TextWorld's Python-side facts are restored beside it.

  Only the feedback is derived, as `PddlEnv.step` derives it; the next state's
  admissible commands, ~90% of a step's cost, are not. A peek costs a few ms; the
  alternative, a reset and a replay of the prefix, about a second. TextWorld 1.7.0's
  internals are assumed; `tests/test_expert.py` pins peeks against real steps.
  """
  if not isinstance(env, alfworld_env.AlfworldEnv):
    raise TypeError(f"peek needs an AlfworldEnv, got {type(env).__name__}.")
  episode = env._episode  # pylint: disable=protected-access
  if episode is None or episode.done:
    raise RuntimeError("peek needs an episode in progress: reset first.")
  command = None if action is None else alfworld_env.canonical_command(action, episode.admissible)
  if command is None:
    return base.NOTHING_HAPPENS, False
  pddl = _pddl_env(env)
  # pylint: disable=protected-access
  state = pddl._pddl_state
  engine_action = pddl.state["_valid_actions"][pddl.state["_valid_commands"].index(command)]
  saved_id = pddl.downward_lib.get_state_id()
  saved_logic = (
      collections.defaultdict(set, {k: set(v) for k, v in state._facts.items()}),
      dict(state._vars_by_name),
      collections.defaultdict(set, {k: set(v) for k, v in state._vars_by_type.items()}),
      collections.Counter(state._var_counts),
  )
  try:
    with env._speedups():  # The env's parse memo, as for its own steps.
      state.apply(engine_action)
      context = {
          "state": state,
          "facts": list(state.facts),
          "variables": {ph.name: pddl._entity_infos[var.name] for ph, var in engine_action.mapping.items()},
          "mapping": engine_action.mapping,
          "entity_infos": pddl._entity_infos,
      }
      return pddl._logic.grammar.derive(engine_action.feedback_rule, context), True
  finally:
    pddl.downward_lib.set_state_id(saved_id)
    state._facts, state._vars_by_name, state._vars_by_type, state._var_counts = saved_logic


@dataclasses.dataclass
class Episode:
  """One expert episode as played in the real engine.

  `observations[0]` is the reset's; `observations[t]` answers `actions[t-1]`.
  `admissible_actions[t]` and `facts` are those in force when `actions[t]` was chosen;
  `search[t]` is `search_candidates` for `actions[t]`.
  """

  task: base.Task
  task_text: str
  observations: list[str]
  actions: list[str]
  valid: list[bool]
  admissible_actions: list[list[str]]
  won: bool
  error: str | None  # Why the expert stopped early, if it did (never an engine crash: that raises).
  seconds: float
  search: list[tuple[str, ...]] = dataclasses.field(default_factory=list)  # Empty for a gold path (ScienceWorld).


def run_episode(
    env: base.Env,
    task: base.Task,
    max_steps: int = 150,
    seed: int = 0,
    before_step: Callable[[int, base.StepInfo, str], None] | None = None,
    search_order: str = "prior",
) -> Episode:
  """Plays `task` with the expert until the env ends the episode or the expert gives up.

  `won` is the engine's own verdict on the last step. An engine error (`info.error`)
  raises, so that a crashed game is never taken for a lost (or won) demonstration.
  `before_step(turn, info, expert_action)`, if given, runs before each step, while
  the env is in the state the expert acts on (e.g. to `peek` at other actions).
  `search_order` is `ImitableExpert`'s.
  """
  start = time.perf_counter()
  observation, info = env.reset(task)
  expert = ImitableExpert(task, max_steps=max_steps, seed=seed, search_order=search_order)
  observations, actions, valid, admissible, search = [observation], [], [], [], []
  won, error = False, None
  try:
    action = expert.first_action(observation, info)
    while True:
      admissible.append(list(info.admissible_actions))
      search.append(expert.search)
      if before_step is not None:
        before_step(len(actions), info, action)
      result = env.step(action)
      if result.info.error is not None:
        raise RuntimeError(f"Engine error in {task.task_id!r} at turn {len(actions) + 1}: {result.info.error}")
      actions.append(action)
      observations.append(result.observation)
      valid.append(result.info.valid)
      info = result.info
      if result.done:
        won = result.info.won
        break
      action = expert.next_action(result)
  except (HandCodedAgentFailed, HandCodedAgentTimeout, ExpertError) as e:
    error = f"{type(e).__name__}: {e}"
  return Episode(
      task=task,
      task_text=info.task,
      observations=observations,
      actions=actions,
      valid=valid,
      admissible_actions=admissible,
      search=search,
      won=won,
      error=error,
      seconds=time.perf_counter() - start,
  )
