"""The host-side environment protocol that every text environment implements.

Environments are pure host code: they never import jax or the models. A rollout
drives them through `reset(task)` and `step(action_text)` only.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Protocol, Sequence

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


_REGISTRY: dict[str, Callable[..., Env]] = {}


def register(name: str) -> Callable[[Callable[..., Env]], Callable[..., Env]]:
  """Class decorator: makes an env constructible by `make(name, **kwargs)`."""

  def decorator(factory: Callable[..., Env]) -> Callable[..., Env]:
    if name in _REGISTRY:
      raise ValueError(f"Environment {name!r} is already registered.")
    _REGISTRY[name] = factory
    return factory

  return decorator


def make(name: str, **kwargs: Any) -> Env:
  """Builds a registered environment by name, e.g. `make("alfworld", data_dir=...)`.

  Env modules register themselves on import; importing lazily here keeps the heavy
  engines (TextWorld, the ScienceWorld JVM) out of processes that never use them.
  """
  if name not in _REGISTRY:
    try:
      importlib.import_module(f"sage_opd_jax.envs.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"sage_opd_jax.envs.{name}":
        raise
  if name not in _REGISTRY:
    raise ValueError(f"Unknown environment {name!r}; registered: {sorted(_REGISTRY)}.")
  return _REGISTRY[name](**kwargs)


def registered() -> list[str]:
  return sorted(_REGISTRY)
