"""The host-side environment protocol that every text environment implements.

Environments are pure host code: they never import jax or the models. A rollout
drives them through `reset(task)` and `step(action_text)` only.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any, Callable, Mapping, Protocol, Sequence

# What ALFWorld answers to a command it does not understand; every env reuses it.
NOTHING_HAPPENS = "Nothing happens."


@dataclasses.dataclass(frozen=True)
class Task:
  """One episode's identity: enough to replay it exactly."""

  env: str  # Registry name of the environment, e.g. "alfworld".
  split: str  # Data split, e.g. "valid_unseen".
  task_id: str  # Stable id inside the split (a game path, or "task/variation").
  task_type: str  # Task family, for per-type metrics (e.g. "pick_and_place_simple").
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # Env-specific extras.


@dataclasses.dataclass
class StepInfo:
  """What the env says besides the observation text."""

  task: str  # The task text shown to the agent ("Your task is to: ...").
  admissible_actions: list[str]  # Valid commands now; empty if the env has none.
  won: bool = False  # The episode was won by this step.
  lost: bool = False  # The episode ended without winning (turn limit, death, crash).
  valid: bool = True  # The last action was parseable and admissible.
  error: str | None = None  # Set when the engine crashed; the episode then ends lost.
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # Env-specific extras.


@dataclasses.dataclass
class StepResult:
  observation: str
  reward: float
  done: bool
  info: StepInfo


class Env(Protocol):
  """A text environment. Implementations are not thread-safe; one per worker."""

  def tasks(self, split: str) -> Sequence[Task]:
    """Every task of a split, in a deterministic order."""
    ...

  def reset(self, task: Task) -> tuple[str, StepInfo]:
    """Starts `task`; returns the first observation and info."""
    ...

  def step(self, action_text: str | None) -> StepResult:
    """Applies one parsed action command (not a raw model response).

    `None` stands for a response with no parseable action: the turn is spent, the env
    answers `NOTHING_HAPPENS`, and `info.valid` is False.
    """
    ...

  def close(self) -> None:
    ...


# The `config.env` keys every env's constructor takes from the trainer (`train.env_kwargs`), or
# that only the trainer reads; any other key belongs to one env (`EnvSpec.own_keys`).
COMMON_CONFIG_KEYS = ("name", "train_split", "eval_splits", "task_types", "max_turns", "history_turns",
                      "show_admissible", "num_workers", "step_timeout_s")


@dataclasses.dataclass(frozen=True)
class EnvSpec:
  """What an env declares of itself where it registers; config validation, the trainer and the
  pipeline read it instead of naming envs.

  Attributes:
    splits: its task splits (env.train_split, env.eval_splits, demos.split, ...).
    own_keys: the `config.env` keys only it reads (beside `COMMON_CONFIG_KEYS`).
    config_kwargs: its own constructor arguments from the `config.env` section.
    expert: "module:Class" of an expert that shadows any episode from its states, in the env's
      worker (judge.mode='oracle', DAgger), or None: the env has none.
    expert_kwargs: what the env's constructor needs for that expert, and for collecting demos.
    data_options: the demos/sft config keys (`config.ENV_DATA_OPTIONS`) it gives a meaning to
      beyond their defaults: variations of its expert's search and of its demonstrations.
    resolve: `config.env` values a pipeline pins before it starts (ALFWorld's data folder, from
      $ALFWORLD_DATA), so every stage's config names them.
    tokenizer: builds the pipeline's word-level tokenizer, `(env kwargs, out_dir, demos_dirs) ->
      its folder`, after the demonstrations are collected (their texts may be its corpus); None:
      the pipeline needs a given `config.tokenizer_dir`.
  """

  splits: tuple[str, ...]
  own_keys: tuple[str, ...] = ()
  config_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda env: {}
  expert: str | None = None
  expert_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  data_options: tuple[str, ...] = ()
  resolve: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda env: {}
  tokenizer: Callable[[Mapping[str, Any], pathlib.Path, Sequence[pathlib.Path]], str] | None = None


_REGISTRY: dict[str, Callable[..., Env]] = {}
_SPECS: dict[str, EnvSpec] = {}


def register(name: str, spec: EnvSpec | None = None) -> Callable[[Callable[..., Env]], Callable[..., Env]]:
  """Class decorator: makes an env constructible by `make(name, **kwargs)`, described by `spec`."""

  def decorator(factory: Callable[..., Env]) -> Callable[..., Env]:
    if name in _REGISTRY:
      raise ValueError(f"Environment {name!r} is already registered.")
    _REGISTRY[name] = factory
    if spec is not None:
      _SPECS[name] = spec
    return factory

  return decorator


def _load(name: str) -> None:
  """Imports the env module `name` (it registers itself), unless it already has."""
  if name not in _REGISTRY:
    try:
      importlib.import_module(f"sage_opd_jax.envs.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"sage_opd_jax.envs.{name}":
        raise
  if name not in _REGISTRY:
    raise ValueError(f"Unknown environment {name!r}; registered: {sorted(_REGISTRY)}.")


def make(name: str, **kwargs: Any) -> Env:
  """Builds a registered environment by name, e.g. `make("alfworld", data_dir=...)`.

  Env modules register themselves on import, and load their engines (TextWorld, the
  ScienceWorld JVM) only when an env is built: processes that never build one never load them.
  """
  _load(name)
  return _REGISTRY[name](**kwargs)


def spec(name: str) -> EnvSpec:
  """What env `name` declares of itself (`EnvSpec`); builds nothing."""
  _load(name)
  if name not in _SPECS:
    raise ValueError(f"Environment {name!r} declares no EnvSpec (register it with one).")
  return _SPECS[name]


def registered() -> list[str]:
  return sorted(_REGISTRY)
