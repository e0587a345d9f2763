"""EnvPool: parallel workers, and isolation of engine exceptions, crashes and hangs.

The pool is what is under test, so the env here is a tiny scripted one registered in
this module (workers import it by name) whose actions inject each failure for real:
"raise" raises in the env, "exit" kills the worker process, "hang" sleeps past any
timeout the way a planner stuck in C code would.
"""

import os
import time

import pytest

from sage_opd_jax import envs
from sage_opd_jax.envs import pool as pool_lib

_MODULE = __name__  # Workers import this module so that "pool_test" is registered there.


@envs.register("pool_test")
class ScriptedEnv:
  """Counts "inc" actions to 3 (a win); other actions inject failures."""

  def __init__(self, goal: int = 3):
    self.goal = goal
    self.count = 0
    self.task_id = ""

  def tasks(self, split):
    return [envs.Task("pool_test", split, f"t{i}", "count") for i in range(6)]

  def _info(self, **kw):
    return envs.StepInfo(task=f"count to {self.goal}", admissible_actions=["inc"], **kw)

  def reset(self, task):
    self.count, self.task_id = 0, task.task_id
    return f"start {task.task_id} pid={os.getpid()}", self._info()

  def step(self, action):
    if action == "raise":
      raise RuntimeError("injected engine failure")
    if action == "exit":
      os._exit(3)
    if action == "hang":
      time.sleep(3600)
    if action != "inc":
      return envs.StepResult(envs.NOTHING_HAPPENS, 0.0, False, self._info(valid=False))
    self.count += 1
    won = self.count >= self.goal
    obs = f"{self.task_id} count={self.count} pid={os.getpid()}"
    return envs.StepResult(obs, float(won), won, self._info(won=won))

  def close(self):
    pass


def _pid(observation: str) -> int:
  return int(observation.rsplit("pid=", 1)[1])


def count_calls(env, task_id: str, action: str) -> str:
  """A `call` payload: one whole episode inside the worker."""
  env.reset(envs.Task("pool_test", "train", task_id, "count"))
  result = env.step(action)
  while not result.done:
    result = env.step(action)
  return result.observation.split(" pid=")[0]


def unpicklable_result(env):
  del env
  return lambda: None


@pytest.fixture
def pool():
  with pool_lib.EnvPool("pool_test", {"goal": 3}, num_workers=2, timeout_s=20.0, imports=(_MODULE,)) as p:
    yield p


def test_slots_step_in_separate_processes_in_parallel(pool):
  tasks = ScriptedEnv().tasks("train")[:2]
  first = pool.reset(tasks)
  assert [r.observation.split(" pid=")[0] for r in first] == ["start t0", "start t1"]
  pids = {_pid(r.observation) for r in first}
  assert len(pids) == 2 and os.getpid() not in pids
  for expected in (1, 2, 3):
    results = pool.step(["inc", "inc"])
    assert [r.observation.split(" pid=")[0] for r in results] == [
        f"t0 count={expected}", f"t1 count={expected}"]
  assert all(r.done and r.info.won and r.reward == 1.0 for r in results)


def test_async_submit_poll_returns_each_slot_once(pool):
  pool.submit(1, "reset", envs.Task("pool_test", "train", "b", "count"))
  pool.submit(0, "reset", envs.Task("pool_test", "train", "a", "count"))
  with pytest.raises(ValueError, match="slot=0"):
    pool.submit(0, "step", "inc")
  got = pool.gather()
  assert sorted(got) == [0, 1]
  assert got[0].observation.startswith("start a") and got[1].observation.startswith("start b")
  assert pool.poll() == [] and pool.pending() == []


def test_engine_exception_fails_only_that_episode_and_keeps_worker(pool):
  first = pool.reset(ScriptedEnv().tasks("train")[:2])
  results = pool.step(["raise", "inc"])
  assert results[0].done and results[0].info.lost and not results[0].info.won
  assert "injected engine failure" in results[0].info.error
  assert results[1].info.error is None and results[1].observation.startswith("t1 count=1")
  again = pool.reset(ScriptedEnv().tasks("train")[2:4])
  assert _pid(again[0].observation) == _pid(first[0].observation)  # Same worker.
  assert pool.respawns == 0


def test_crashed_worker_fails_its_episode_and_is_respawned(pool):
  first = pool.reset(ScriptedEnv().tasks("train")[:2])
  results = pool.step(["exit", "inc"])
  assert results[0].done and results[0].info.lost
  assert "exit code 3" in results[0].info.error
  assert results[1].observation.startswith("t1 count=1")
  assert pool.respawns == 1
  again = pool.reset(ScriptedEnv().tasks("train")[2:4])
  assert _pid(again[0].observation) != _pid(first[0].observation)
  assert _pid(again[1].observation) == _pid(first[1].observation)
  assert pool.step(["inc", "inc"])[0].observation.startswith("t2 count=1")


def test_hung_worker_is_killed_at_the_deadline_and_the_run_goes_on(pool):
  first = pool.reset(ScriptedEnv().tasks("train")[:2])
  pool.submit(0, "step", "hang", timeout_s=1.0)
  pool.submit(1, "step", "inc")
  got = pool.gather()
  assert got[0].done and got[0].info.lost and got[0].info.error.startswith("timeout")
  assert got[1].observation.startswith("t1 count=1")
  assert pool.respawns == 1
  hung_pid = _pid(first[0].observation)
  with pytest.raises(ProcessLookupError):
    os.kill(hung_pid, 0)  # The hung worker is gone, not merely abandoned.
  assert pool.reset(ScriptedEnv().tasks("train")[:1])[0].observation.startswith("start t0")


def test_imap_unordered_reports_failures_and_finishes_the_rest(pool):
  jobs = [dict(task_id=f"j{i}", action=a) for i, a in enumerate(["inc", "hang", "inc", "raise", "exit", "inc"])]
  got = dict(pool.imap_unordered(count_calls, jobs, timeout_s=2.0))
  assert sorted(got) == list(range(len(jobs)))
  for i in (0, 2, 5):
    assert got[i] == f"j{i} count=3"
  assert isinstance(got[1], pool_lib.WorkerError) and got[1].kind == "timeout"
  assert isinstance(got[3], pool_lib.WorkerError) and got[3].kind == "exception"
  assert "injected engine failure" in got[3].message
  assert isinstance(got[4], pool_lib.WorkerError) and got[4].kind == "crash"


def test_unpicklable_result_is_an_error_not_a_crash(pool):
  pool.submit(0, "call", (unpicklable_result, {}))
  got = pool.gather()[0]
  assert isinstance(got, pool_lib.WorkerError) and got.kind == "exception"
  assert "pickle" in got.message.lower()
  assert pool.respawns == 0


def test_unpicklable_request_is_refused_and_the_slot_stays_free(pool):
  with pytest.raises(Exception, match="pickle"):
    pool.submit(0, "call", (lambda env: env, {}))
  assert not pool.busy(0)
  assert pool.reset(ScriptedEnv().tasks("train")[:1])[0].observation.startswith("start t0")


def test_close_stops_every_worker():
  p = pool_lib.EnvPool("pool_test", {}, num_workers=2, imports=(_MODULE,))
  pids = [_pid(r.observation) for r in p.reset(ScriptedEnv().tasks("train")[:2])]
  p.submit(0, "step", "hang")  # A busy worker must not block shutdown.
  p.close()
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_unbuildable_env_is_an_error_naming_it():
  with pytest.raises(RuntimeError, match="no_such_env"):
    pool_lib.EnvPool("no_such_env", {}, num_workers=1)
