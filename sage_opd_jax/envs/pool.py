"""B environments stepped in parallel worker processes, with crash and hang isolation.

Each worker process owns one env built by `envs.make(env_name, **env_kwargs)` and
serves one request at a time. The API is asynchronous so that a rollout can overlap
env time with model time:

  with EnvPool("alfworld", {"data_dir": d}, num_workers=4, timeout_s=60) as pool:
    pool.submit(0, "reset", task)
    ...                                   # sample the model meanwhile
    for slot, result in pool.poll(wait_s=None):
      ...

Failure isolation, which is why these are processes and not threads: the ALFWorld
engine (fast_downward) can hang inside C code, where `signal.alarm` never fires, and
can crash the interpreter outright. The parent enforces a hard per-call deadline and
kills a worker that passes it; a dead worker is respawned. Either way only the episode
of that slot fails: a reset or step comes back as a `StepResult` with `done=True`,
`info.lost=True` and `info.error` holding what happened, and the run goes on.

An exception raised by the env (an engine error) fails the episode the same way but
keeps the worker: the next `reset` reloads the game, and a respawn would lose the
env's caches.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import multiprocessing.connection
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from sage_opd_jax.envs import base

OPS = ("reset", "step", "call")
# A worker that cannot even build its env within this long is treated as broken.
_STARTUP_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class WorkerError:
  """The result of a `call` that did not return: what failed and why."""

  kind: str  # "exception" (raised in the worker), "crash" (worker died) or "timeout".
  message: str


def failed_step(error: str) -> base.StepResult:
  """The result that stands in for a reset or step whose worker failed."""
  info = base.StepInfo(task="", admissible_actions=[], lost=True, error=error)
  return base.StepResult(observation="", reward=0.0, done=True, info=info)


def _worker_main(
    conn: multiprocessing.connection.Connection,
    env_name: str,
    env_kwargs: Mapping[str, Any],
    imports: Sequence[str],
) -> None:
  """One worker: build the env, then serve (op, arg) requests until told to stop."""
  try:
    for module in imports:
      importlib.import_module(module)
    env = base.make(env_name, **env_kwargs)
  except BaseException:  # Reported to the parent, which refuses to run without envs.
    conn.send(("fatal", traceback.format_exc()))
    return
  conn.send(("ready", None))
  try:
    while True:
      try:
        request = conn.recv()
      except EOFError:  # The parent is gone.
        return
      if request is None:
        return
      op, arg = request
      try:
        if op == "reset":
          observation, info = env.reset(arg)
          value = base.StepResult(observation=observation, reward=0.0, done=False, info=info)
        elif op == "step":
          value = env.step(arg)
        else:  # "call": run fn(env, **kwargs) next to the env, e.g. a whole expert episode.
          fn, kwargs = arg
          value = fn(env, **kwargs)
        reply = ("ok", value)
      except Exception:
        reply = ("error", traceback.format_exc())
      try:
        conn.send(reply)
      except Exception:  # An unpicklable result; pickling fails before any byte is sent.
        conn.send(("error", traceback.format_exc()))
  finally:
    env.close()


@dataclasses.dataclass
class _Slot:
  process: multiprocessing.process.BaseProcess
  conn: multiprocessing.connection.Connection
  op: str | None = None  # The request in flight, if any.
  deadline: float | None = None  # time.monotonic() after which the worker is killed.


class EnvPool:
  """`num_workers` env worker processes addressed by slot 0..num_workers-1.

  Each slot serves one request at a time: `submit` it, then collect it with `poll`
  or `gather`. Results are `StepResult`s for "reset" and "step" (a reset's observation
  and info come packed in one, with reward 0 and done False) and the function's
  return value, or a `WorkerError`, for "call".
  """

  def __init__(
      self,
      env_name: str,
      env_kwargs: Mapping[str, Any] | None = None,
      num_workers: int = 1,
      timeout_s: float | None = None,
      imports: Sequence[str] = (),
      start_method: str = "forkserver",
  ):
    """Starts the workers and waits until each has built its env.

    Args:
      env_name: registered env name, as for `envs.make`.
      env_kwargs: keyword arguments of the env's constructor (picklable).
      num_workers: worker processes, one env each (config.env.num_workers).
      timeout_s: default hard limit of one call; None means no limit.
      imports: modules each worker imports before `make`, e.g. one that registers
        an env outside `sage_opd_jax.envs`.
      start_method: "forkserver" or "spawn"; never "fork", since the parent may
        hold JAX's threads.
    """
    if num_workers < 1:
      raise ValueError(f"num_workers={num_workers}: must be >= 1.")
    if timeout_s is not None and timeout_s <= 0:
      raise ValueError(f"timeout_s={timeout_s}: must be positive or None.")
    if start_method not in ("forkserver", "spawn"):
      raise ValueError(f"start_method={start_method!r}: must be 'forkserver' or 'spawn'.")
    self._env_name = env_name
    self._env_kwargs = dict(env_kwargs or {})
    self._imports = tuple(imports)
    self._ctx = multiprocessing.get_context(start_method)
    self.timeout_s = timeout_s
    self.respawns = 0  # Workers replaced after a crash or a timeout.
    self._slots: list[_Slot] = []
    self._done: list[tuple[int, Any]] = []  # Failures resolved outside a poll.
    try:
      for _ in range(num_workers):
        self._slots.append(self._start_process())
      for slot in range(num_workers):
        self._await_ready(slot)
    except BaseException:
      self.close()
      raise

  @property
  def num_workers(self) -> int:
    return len(self._slots)

  def busy(self, slot: int) -> bool:
    """Whether `slot` has a request in flight."""
    return self._slots[slot].op is not None

  def pending(self) -> list[int]:
    return [i for i, s in enumerate(self._slots) if s.op is not None]

  def free_slots(self) -> list[int]:
    return [i for i, s in enumerate(self._slots) if s.op is None]

  # --- asynchronous API -------------------------------------------------------------

  def submit(self, slot: int, op: str, arg: Any = None, timeout_s: float | None = None) -> None:
    """Sends one request to `slot`'s worker and returns at once.

    Args:
      slot: worker index; it must not have a request in flight.
      op: "reset" (arg: a Task), "step" (arg: action text or None) or "call" (arg:
        (fn, kwargs); the worker runs fn(env, **kwargs); fn must be importable).
      arg: the request's argument.
      timeout_s: hard limit for this call; defaults to the pool's `timeout_s`.
    """
    if op not in OPS:
      raise ValueError(f"op={op!r}: must be one of {OPS}.")
    if not 0 <= slot < len(self._slots):
      raise ValueError(f"slot={slot}: the pool has slots 0..{len(self._slots) - 1}.")
    state = self._slots[slot]
    if state.op is not None:
      raise ValueError(f"slot={slot}: a {state.op!r} request is still in flight.")
    limit = self.timeout_s if timeout_s is None else timeout_s
    state.op = op
    state.deadline = None if limit is None else time.monotonic() + limit
    try:
      state.conn.send((op, arg))
    except (BrokenPipeError, EOFError, OSError) as e:  # The worker died while idle.
      self._fail(slot, "crash", f"worker {slot} was dead before the {op!r} request: {e!r}")
    except Exception:  # An unpicklable argument: nothing was sent, so the slot stays free.
      state.op, state.deadline = None, None
      raise

  def poll(self, wait_s: float | None = 0.0) -> list[tuple[int, Any]]:
    """Returns the (slot, result) pairs completed so far.

    Args:
      wait_s: wait up to this long for at least one result; None waits until one
        arrives (if nothing is in flight, returns an empty list at once).
    """
    end = None if wait_s is None else time.monotonic() + wait_s
    while True:
      self._reap()
      now = time.monotonic()
      if self._done or not self.pending() or (end is not None and now >= end):
        done, self._done = self._done, []
        return done
      # Sleep until a reply, a worker's death, the nearest call deadline, or `end`.
      wake = [s.deadline for s in self._slots if s.op is not None and s.deadline is not None]
      wake += [end] if end is not None else []
      timeout = max(0.0, min(wake) - now) if wake else None
      waitables = [w for s in self._slots if s.op is not None for w in (s.conn, s.process.sentinel)]
      multiprocessing.connection.wait(waitables, timeout=timeout)

  def gather(self) -> dict[int, Any]:
    """Waits for every request in flight; returns {slot: result}."""
    out = {}
    while self.pending() or self._done:
      out.update(self.poll(wait_s=None))
    return out

  # --- blocking helpers -------------------------------------------------------------

  def reset(self, tasks: Sequence[base.Task]) -> list[base.StepResult]:
    """Resets slots 0..len(tasks)-1 in parallel, one task each."""
    for slot, task in enumerate(tasks):
      self.submit(slot, "reset", task)
    out = self.gather()
    return [out[i] for i in range(len(tasks))]

  def step(self, actions: Sequence[str | None]) -> list[base.StepResult]:
    """Steps slots 0..len(actions)-1 in parallel, one action each."""
    for slot, action in enumerate(actions):
      self.submit(slot, "step", action)
    out = self.gather()
    return [out[i] for i in range(len(actions))]

  def imap_unordered(
      self,
      fn: Callable[..., Any],
      kwargs_list: Iterable[Mapping[str, Any]],
      timeout_s: float | None = None,
  ) -> Iterator[tuple[int, Any]]:
    """Runs fn(env, **kwargs) for each kwargs on whichever worker is free.

    Yields (index into kwargs_list, result) as calls complete; a call that raised,
    crashed its worker or ran past `timeout_s` yields a `WorkerError` and the rest
    go on. Nothing else may be in flight on the pool meanwhile.
    """
    if self.pending():
      raise ValueError(f"imap_unordered: slots {self.pending()} already have requests in flight.")
    todo = iter(enumerate(kwargs_list))
    index_of: dict[int, int] = {}
    exhausted = False
    while True:
      for slot in self.free_slots():
        if exhausted:
          break
        item = next(todo, None)
        if item is None:
          exhausted = True
          break
        index_of[slot] = item[0]
        self.submit(slot, "call", (fn, dict(item[1])), timeout_s=timeout_s)
      if not self.pending() and not self._done:
        return
      for slot, result in self.poll(wait_s=None):
        yield index_of.pop(slot), result

  # --- failure handling -------------------------------------------------------------

  def _start_process(self) -> _Slot:
    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(
        target=_worker_main,
        args=(child_conn, self._env_name, self._env_kwargs, self._imports),
        daemon=True,
    )
    process.start()
    child_conn.close()  # Only the child holds its end, so its death reads as EOF here.
    return _Slot(process=process, conn=parent_conn)

  def _await_ready(self, slot: int) -> None:
    state = self._slots[slot]
    if not state.conn.poll(_STARTUP_TIMEOUT_S):
      raise RuntimeError(
          f"EnvPool worker {slot} did not build env {self._env_name!r} within {_STARTUP_TIMEOUT_S} s."
      )
    try:
      kind, payload = state.conn.recv()
    except EOFError:
      raise RuntimeError(
          f"EnvPool worker {slot} died while building env {self._env_name!r} "
          f"(exit code {state.process.exitcode})."
      ) from None
    if kind != "ready":
      raise RuntimeError(f"EnvPool worker {slot} could not build env {self._env_name!r}:\n{payload}")

  def _reap(self) -> None:
    """Collects finished replies, and fails requests whose worker died or timed out."""
    now = time.monotonic()
    for slot, state in enumerate(self._slots):
      if state.op is None:
        continue
      if state.conn.poll():
        try:
          kind, payload = state.conn.recv()
        except (EOFError, OSError):
          self._fail(slot, "crash", self._death_text(slot))
          continue
        op, state.op, state.deadline = state.op, None, None
        if kind == "ok":
          self._done.append((slot, payload))
        elif op == "call":
          self._done.append((slot, WorkerError("exception", payload)))
        else:
          self._done.append((slot, failed_step(f"{op} raised in worker {slot}:\n{payload}")))
      elif not state.process.is_alive():
        self._fail(slot, "crash", self._death_text(slot))
      elif state.deadline is not None and now >= state.deadline:
        self._fail(slot, "timeout", f"{state.op!r} in worker {slot} ran past its time limit; killed.")

  def _death_text(self, slot: int) -> str:
    state = self._slots[slot]
    state.process.join(timeout=1.0)
    return f"worker {slot} died during {state.op!r} (exit code {state.process.exitcode})."

  def _fail(self, slot: int, kind: str, message: str) -> None:
    """Kills and replaces slot's worker; its request completes as a failure."""
    state = self._slots[slot]
    op = state.op
    self._kill(state)
    self.respawns += 1
    self._slots[slot] = self._start_process()
    self._await_ready(slot)
    result = WorkerError(kind, message) if op == "call" else failed_step(f"{kind}: {message}")
    self._done.append((slot, result))

  @staticmethod
  def _kill(state: _Slot) -> None:
    if state.process.is_alive():
      state.process.kill()  # SIGKILL: a hang inside C code ignores anything gentler.
    state.process.join(timeout=5.0)
    state.conn.close()

  # --- shutdown ---------------------------------------------------------------------

  def close(self) -> None:
    """Stops every worker: politely if idle, by SIGKILL if busy or unresponsive."""
    for state in self._slots:
      if state.process.is_alive() and state.op is None:
        try:
          state.conn.send(None)
        except (BrokenPipeError, OSError):
          pass  # Already gone; the join below reaps it.
    for state in self._slots:
      state.process.join(timeout=2.0 if state.op is None else 0.0)
      self._kill(state)
    self._slots = []
    self._done = []

  def __enter__(self) -> EnvPool:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
