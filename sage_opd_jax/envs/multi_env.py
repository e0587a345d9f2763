"""Several envs per `EnvPool` worker: one batched `call` resets or steps a worker's episodes.

An `EnvPool` worker owns one env, hence one live episode. A rollout of B lockstep episodes on
W < B workers (config.env.num_workers is small on a 2-core machine) hosts ceil(B / W) envs in
each worker: the pool's own env serves local index 0, and `run_requests` builds the others in
the worker on first use, with the same constructor arguments. One pool `call` carries every
request of a worker for one lockstep round and runs them one after the other there.

Failure isolation keeps the pool's rules, at the finer grain where possible:
* an env exception fails only its own episode (the request answers `pool.failed_step`);
* a worker crash or hang fails the whole call (the pool answers a `WorkerError`), and the
  respawned worker has lost the state of every episode it hosted: a later step of such an
  episode answers a failed step ("state lost") instead of acting on a fresh env.

Optionally a shadow expert (e.g. `alfworld_expert.ImitableExpert`, for oracle labels) follows
each hosted episode in the worker and names its action at every state, in
`info.extra["expert_action"]` (None once the expert gave up; `info.extra["expert_error"]` says
why), and in `info.extra["expert_search"]` the actions its search could equally have named there
(the expert's `search` attribute, e.g. `alfworld_expert.search_candidates`; () if none or it has
no such attribute). An expert failure never fails the episode.

Host-only code: workers import this module to unpickle `run_requests`, so it never imports jax.
"""

from __future__ import annotations

import importlib
import time
import traceback
from typing import Any, Hashable, Mapping, Sequence

from sage_opd_jax.envs import base
from sage_opd_jax.envs import pool as pool_lib

# Per worker process, by local index: the env, the token of the episode it plays, its expert.
_HOSTED: dict[int, base.Env] = {}
_EPISODE_OF: dict[int, Hashable] = {}
_EXPERT_OF: dict[int, Any] = {}


def _expert_class(path: str) -> Any:
  module, _, name = path.partition(":")
  if not name:
    raise ValueError(f"expert={path!r}: expected 'module:Class'.")
  return getattr(importlib.import_module(module), name)


def _shadow(local: int, result: base.StepResult, act: Any) -> None:
  """Stores the expert's action (and its search's alternatives) for the state `result` leads to, or why none."""
  action, search, error = None, (), None
  if local in _EXPERT_OF and not result.done:
    try:
      action = act(_EXPERT_OF[local])
      search = tuple(getattr(_EXPERT_OF[local], "search", ()))
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}"
      del _EXPERT_OF[local]  # It cannot follow the episode any further.
  result.info.extra["expert_action"] = action
  result.info.extra["expert_search"] = search
  if error is not None:
    result.info.extra["expert_error"] = error


def run_requests(
    env: base.Env,
    *,
    env_name: str,
    env_kwargs: Mapping[str, Any],
    requests: Sequence[tuple[int, Hashable, str, Any]],
    expert: str | None = None,
) -> tuple[list[base.StepResult], float]:
  """Runs one worker's requests in order; meant as the function of an `EnvPool` "call".

  Args:
    env: the worker's own env (local index 0).
    env_name: registered name, to build the worker's other envs.
    env_kwargs: their constructor arguments (the pool's).
    requests: (local index, episode token, op, arg) with op "reset" (arg: a Task) or "step"
      (arg: the action text or None). A step must name the token of the episode that the
      last reset of that local env started; otherwise its state is gone (the worker was
      respawned) and the step fails.
    expert: optional "module:Class" of a shadow expert, built per episode as Class(task), with
      `first_action(observation, info)` and `next_action(step_result)`.

  Returns:
    One `StepResult` per request (a reset's observation and info packed as the pool does),
    and the seconds the worker spent on them.
  """
  start = time.perf_counter()
  _HOSTED[0] = env
  results = []
  for local, token, op, arg in requests:
    try:
      if local not in _HOSTED:
        _HOSTED[local] = base.make(env_name, **env_kwargs)
      hosted = _HOSTED[local]
      if op == "reset":
        _EPISODE_OF[local] = None  # A failed reset leaves no episode behind.
        _EXPERT_OF.pop(local, None)
        observation, info = hosted.reset(arg)
        _EPISODE_OF[local] = token
        result = base.StepResult(observation=observation, reward=0.0, done=False, info=info)
        if expert is not None:
          _EXPERT_OF[local] = _expert_class(expert)(arg)
          _shadow(local, result, lambda x: x.first_action(observation, info))
        results.append(result)
      elif op == "step":
        if _EPISODE_OF.get(local) != token:
          results.append(pool_lib.failed_step(
              f"state lost: local env {local} of this worker no longer plays episode {token!r} "
              "(the worker was respawned after a crash or timeout)"))
        else:
          result = hosted.step(arg)
          if expert is not None:
            _shadow(local, result, lambda x, r=result: x.next_action(r))
          results.append(result)
      else:
        raise ValueError(f"op={op!r}: must be 'reset' or 'step'.")
    except Exception:  # pylint: disable=broad-except
      # An engine error fails this episode only, as the pool does for its own env.
      results.append(pool_lib.failed_step(f"{op} raised in a hosted env:\n{traceback.format_exc()}"))
  return results, time.perf_counter() - start
