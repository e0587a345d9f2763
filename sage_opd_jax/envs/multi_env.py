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

Host-only code: workers import this module to unpickle `run_requests`, so it never imports jax.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Hashable, Mapping, Sequence

from sage_opd_jax.envs import base
from sage_opd_jax.envs import pool as pool_lib

# Per worker process: local index -> (env, token of the episode it is playing).
_HOSTED: dict[int, base.Env] = {}
_EPISODE_OF: dict[int, Hashable] = {}


def run_requests(
    env: base.Env,
    *,
    env_name: str,
    env_kwargs: Mapping[str, Any],
    requests: Sequence[tuple[int, Hashable, str, Any]],
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
        observation, info = hosted.reset(arg)
        _EPISODE_OF[local] = token
        results.append(base.StepResult(observation=observation, reward=0.0, done=False, info=info))
      elif op == "step":
        if _EPISODE_OF.get(local) != token:
          results.append(pool_lib.failed_step(
              f"state lost: local env {local} of this worker no longer plays episode {token!r} "
              "(the worker was respawned after a crash or timeout)"))
        else:
          results.append(hosted.step(arg))
      else:
        raise ValueError(f"op={op!r}: must be 'reset' or 'step'.")
    except Exception:  # pylint: disable=broad-except
      # An engine error fails this episode only, as the pool does for its own env.
      results.append(pool_lib.failed_step(f"{op} raised in a hosted env:\n{traceback.format_exc()}"))
  return results, time.perf_counter() - start
