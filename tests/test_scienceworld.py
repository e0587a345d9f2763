"""ScienceWorld on the real engine: one JVM for the whole module (it takes ~1-2 s to start)."""

import pytest

from sage_opd_jax import envs
from sage_opd_jax.envs import scienceworld as sw

pytestmark = pytest.mark.skipif(
    not sw.java_available(), reason="ScienceWorld needs Java: no `java` on PATH (apt-get install default-jre-headless)."
)

# Cheap tasks: their gold paths win in 5-7 steps.
FIND = "find-non-living-thing"
LIFESPAN = "lifespan-longest-lived"


@pytest.fixture(scope="module")
def env():
  e = envs.make("scienceworld", task_types=[FIND, LIFESPAN], max_steps=20)
  yield e
  e.close()


def test_registered_and_splits_are_disjoint(env):
  assert "scienceworld" in envs.registered()
  splits = {split: env.tasks(split) for split in sw.SPLITS}
  for split, tasks in splits.items():
    assert tasks, split
    assert {t.task_type for t in tasks} == {FIND, LIFESPAN}
    assert all(t.split == split and t.env == "scienceworld" for t in tasks)
  ids = [{t.task_id for t in tasks} for tasks in splits.values()]
  assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
  # Deterministic order: a second listing (from the cache) is identical.
  assert env.tasks("dev") == splits["dev"]
  with pytest.raises(ValueError, match="split"):
    env.tasks("valid_unseen")


def test_unknown_task_type_is_named():
  with pytest.raises(ValueError, match="not-a-task"):
    sw.ScienceWorldEnv(task_types=["not-a-task"])


def test_reset_step_and_invalid_actions(env):
  task = env.tasks("train")[0]
  observation, info = env.reset(task)
  assert "This room is called" in observation
  assert info.task.startswith("Your task is to")
  assert "look around" in info.admissible_actions
  result = env.step("look around")
  assert result.info.valid and not result.done and result.observation.startswith("This room is called")
  # Gibberish and an unparseable response are both invalid, and answered like ALFWorld.
  result = env.step("xyzzy plugh")
  assert not result.info.valid
  assert result.observation == envs.NOTHING_HAPPENS
  assert result.info.extra["engine_observation"].startswith(("No known action", "Unknown action"))
  result = env.step(None)
  assert not result.info.valid and result.observation == envs.NOTHING_HAPPENS and result.reward == 0.0
  # An ambiguous command is resolved to the engine's first reading.
  result = env.step("open door")
  assert result.info.valid and "ambiguous" in result.info.extra
  assert result.observation == "The door is now open."


def test_turn_limit_loses():
  e = sw.ScienceWorldEnv(task_types=[FIND], max_steps=2)
  try:
    e.reset(e.tasks("dev")[0])
    assert not e.step("look around").done
    last = e.step("look around")
    assert last.done and last.info.lost and not last.info.won
    with pytest.raises(RuntimeError, match="reset"):
      e.step("look around")
  finally:
    e.close()


def test_engine_exception_fails_the_episode(env, monkeypatch):
  # An injected failure inside the engine's step. (Killing the JVM works too, but py4j's
  # reconnect storm then trips a CPython 3.11 compiler bug later in the pytest process.)
  def crash(action):
    raise OSError(f"injected engine failure on {action!r}")

  task = env.tasks("train")[0]
  env.reset(task)
  monkeypatch.setattr(env._engine, "step", crash)
  crashed = env.step("look around")
  assert crashed.done and crashed.info.lost and not crashed.info.valid
  assert "injected engine failure" in crashed.info.error
  with pytest.raises(RuntimeError, match="reset"):
    env.step("look around")
  monkeypatch.undo()
  env.reset(task)  # The env itself is still usable.
  assert env.step("look around").info.valid


@pytest.mark.parametrize("task_type", [FIND, LIFESPAN])
def test_gold_path_wins(env, task_type):
  task = env.make_task(task_type, env.variations(task_type, "test")[0], "test")
  demo = sw.gold_demonstration(env, task)
  assert demo.won, demo.actions
  assert all(demo.valid)
  assert len(demo.observations) == len(demo.actions) == len(demo.rewards)
  # Scores run 0..100 and a win is 100, so the rewards (gains / 100) sum to 1.
  assert sum(demo.rewards) == pytest.approx(1.0)
