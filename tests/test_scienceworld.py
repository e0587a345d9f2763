"""ScienceWorld on the real engine: one JVM for the whole module (it takes ~1-2 s to start)."""

import pytest

from sage_opd_jax import envs
from sage_opd_jax.envs import scienceworld as sw

pytestmark = pytest.mark.usefixtures("java")  # conftest.java: skips without Java, fails under CI.

# Cheap tasks: their gold paths win in 5-7 steps.
FIND = "find-non-living-thing"
LIFESPAN = "lifespan-longest-lived"


@pytest.fixture(scope="module")
def env():
  e = envs.make("scienceworld", task_types=[FIND, LIFESPAN], max_turns=20)
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
  e = sw.ScienceWorldEnv(task_types=[FIND], max_turns=2)
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
  assert len(demo.observations) == len(demo.actions) + 1 == len(demo.rewards) + 1 == len(demo.admissible_actions) + 1
  # Scores run 0..100 and a win is 100, so the rewards (gains / 100) sum to 1.
  assert sum(demo.rewards) == pytest.approx(1.0)


def test_seed_shuffles_the_task_order_reproducibly(env):
  ordered = sorted(env.tasks("dev"), key=lambda t: (t.task_type, t.meta["variation"]))
  assert env.tasks("dev") != ordered  # Seed 0 mixes the task types ...
  assert {t.task_type for t in env.tasks("dev")[:10]} == {FIND, LIFESPAN}
  other = sw.ScienceWorldEnv(task_types=[FIND, LIFESPAN], seed=1)
  try:  # ... and another seed mixes them otherwise: the same tasks, another order.
    assert sorted(other.tasks("dev"), key=lambda t: t.task_id) == sorted(ordered, key=lambda t: t.task_id)
    assert other.tasks("dev") != env.tasks("dev")
  finally:
    other.close()


def test_spread_over_verbs_takes_each_verbs_shortest_in_turn():
  actions = ["move a to b", "focus on b", "go to a", "look around", "focus on a", "inventory", "go to b"]
  # By words, then alphabetically: inventory | look around | focus on a, focus on b, go to a,
  # go to b | move a to b; verbs in that order, one action each per round.
  assert sw.spread_over_verbs(actions, 5) == ["inventory", "look around", "focus on a", "go to a", "move a to b"]
  assert sw.spread_over_verbs(actions, 6)[5] == "focus on b"
  assert sorted(sw.spread_over_verbs(actions, 100)) == sorted(actions)
  assert sw.spread_over_verbs(actions, 0) == []


def test_max_admissible_caps_the_list_with_the_same_actions(env):
  capped = sw.ScienceWorldEnv(task_types=[FIND], max_admissible=12)
  try:
    task = env.make_task(FIND, env.variations(FIND, "dev")[0], "dev")
    _, full = env.reset(task)
    _, short = capped.reset(task)
    assert len(full.admissible_actions) > 100 and len(short.admissible_actions) == 12
    assert set(short.admissible_actions) <= set(full.admissible_actions)
    assert "look around" in short.admissible_actions
    assert len({a.split()[0] for a in short.admissible_actions}) >= 8  # Many verbs, not 12 "activate"s.
    step = capped.step("look around")
    assert len(step.info.admissible_actions) == 12
  finally:
    capped.close()


def test_vocabulary_texts_name_objects_actions_and_tasks(env):
  texts = env.vocabulary_texts()
  for expected in ("giant tortoise", "aluminum foil", "look around", "find non living thing", envs.NOTHING_HAPPENS):
    assert expected in texts
  # It loaded a task: any running episode is over.
  with pytest.raises(RuntimeError, match="reset"):
    env.step("look around")


def test_trainer_env_kwargs_build_scienceworld_and_keep_alfworld_as_it_was():
  from configs import base, scienceworld_cpu
  from sage_opd_jax import config as config_lib
  from sage_opd_jax import train

  config = scienceworld_cpu.get_config()
  config.env.task_types = (FIND,)
  kwargs = train.env_kwargs(config)
  assert kwargs == {"max_turns": 15, "seed": 0, "task_types": [FIND], "simplifications": "",
                    "max_admissible": 16}
  made = envs.make("scienceworld", **kwargs)
  try:
    assert {t.task_type for t in made.tasks("test")} == {FIND}
  finally:
    made.close()
  config.env.data_dir = "/data/alfworld"
  with pytest.raises(config_lib.ConfigError, match="config.env.data_dir"):
    train.env_kwargs(config)

  alfworld = base.get_config()
  assert train.env_kwargs(alfworld) == {"max_turns": 30, "seed": 0, "task_types": None, "data_dir": None}
  alfworld.env.max_admissible = 5
  with pytest.raises(config_lib.ConfigError, match="config.env.max_admissible"):
    train.env_kwargs(alfworld)


def test_expert_game_gives_gold_demo_and_checked_judge_examples(env):
  from sage_opd_jax.envs import demos

  task = env.make_task(FIND, env.variations(FIND, "train")[1], "train")
  result = demos.expert_game(env, task, seed=0, judge_states=3, max_expert_steps=50, branch="replay")
  assert result["status"] == "won" and result["error"] is None
  demo = result["demo"]
  assert demo["expert"] == sw.EXPERT_NAME and set(demo) == set(demos.DEMO_KEYS)
  assert len(demo["observations"]) == len(demo["actions"]) + 1 == len(demo["admissible_actions"]) + 1
  judge = result["judge"]
  assert {r["label"] for r in judge} >= {"Skip", "Strong"} and len({r["turn"] for r in judge}) == 3
  for record in judge:
    t = record["turn"]
    assert record["observation"] == demo["observations"][t]
    if record["label"] == "Skip":
      assert record["action"] == demo["actions"][t] and record["feedback"] == demo["observations"][t + 1]
    elif record["label"] == "Strong":  # Rejected by the engine, or an unparseable response.
      assert not record["valid"] and record["feedback"] == envs.NOTHING_HAPPENS
    else:
      assert record["valid"] and record["action"] in record["admissible_actions"]
  with pytest.raises(ValueError, match="replay"):
    demos.expert_game(env, task, seed=0, judge_states=1, max_expert_steps=50, branch="snapshot")
