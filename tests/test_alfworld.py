"""Tests of the ALFWorld adapter on the real TextWorld engine.

Most tests play the hand-written fixture games in `tests/fixtures/alfworld/` (see
`tests/fixtures/make_alfworld_fixture.py`); the `real_*` tests play sampled games of the
data set and skip when `$ALFWORLD_DATA` does not point at it.
"""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
import subprocess
import sys
import zlib

import fast_downward
import fast_downward.interface
import pytest
from conftest import real_alfworld_data
import textworld
import textworld.gym
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

from sage_opd_jax.envs import NOTHING_HAPPENS, Task, make
from sage_opd_jax.envs import alfworld
from sage_opd_jax.envs.alfworld import AlfworldEnv, canonical_command, parse_task_folder
from sage_opd_jax.envs.alfworld_cache import GroundingCache

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "fixtures"))
import make_alfworld_fixture as fixture  # noqa: E402  (a script beside the fixture files)

FIXTURE_DIR = fixture.FIXTURE_DIR
GAMES_BY_TRIAL = {game.trial: game for game in fixture.GAMES}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """One env over the fixture games, shared by the tests (resets are the slow part)."""
  cache_dir = tmp_path_factory.mktemp("grounding")
  env = make("alfworld", data_dir=FIXTURE_DIR, cache_dir=cache_dir, facts=True)
  yield env
  env.close()


def _task(env, trial: str) -> Task:
  game = GAMES_BY_TRIAL[trial]
  (task,) = [t for t in env.tasks(game.split) if t.meta["trial"] == trial]
  return task


def _play(env, commands):
  return [env.step(c) for c in commands]


def test_fixture_files_match_their_generator():
  for game in fixture.GAMES:
    assert fixture.game_path(game).read_text() == fixture.render(game), game.trial


@pytest.mark.parametrize("trial", sorted(GAMES_BY_TRIAL))
def test_fixture_walkthrough_wins(env, trial):
  game = GAMES_BY_TRIAL[trial]
  obs, info = env.reset(_task(env, trial))
  assert not info.won and not info.lost
  assert info.task == f"Your task is to: {game.task_text}."
  assert obs.endswith(info.task) and "Welcome to TextWorld" not in obs
  # Every receptacle of the kitchen is one "go to" away at the start.
  kitchen = {"go to cabinet 1", "go to countertop 1", "go to diningtable 1"}
  assert kitchen <= set(info.admissible_actions)
  assert info.extra["walkthrough"] == list(game.walkthrough)
  assert info.extra["gamefile"] == str(fixture.game_path(game))

  results = _play(env, game.walkthrough)
  for result in results[:-1]:
    assert result.info.valid and not result.done and result.reward == 0.0
  last = results[-1]
  assert last.done and last.info.won and not last.info.lost and last.reward == 1.0
  assert [r.info.extra["command"] for r in results] == list(game.walkthrough)
  with pytest.raises(RuntimeError, match="reset first"):
    env.step("look")


def test_facts_follow_the_state(env):
  env.reset(_task(env, "trial_fixture_a"))
  result = _play(env, ["go to diningtable 1", "take apple 1 from diningtable 1"])[-1]
  facts = {(f.name, tuple(v.name for v in f.arguments)) for f in result.info.extra["facts"]}
  assert any(name == "holds" and args[1].startswith("apple 1") for name, args in facts)
  # An invalid command changes nothing, so the same facts come back.
  invalid = env.step("take apple 1 from diningtable 1")
  assert not invalid.info.valid and invalid.info.extra["facts"] == result.info.extra["facts"]


def test_planner_commands_when_requested_win(tmp_path):
  env = AlfworldEnv(data_dir=FIXTURE_DIR, cache_dir=tmp_path, policy_commands=True)
  _, info = env.reset(_task(env, "trial_fixture_b"))
  # After each step the planner replans from the new state; following it wins.
  plan, results = info.extra["policy_commands"], []
  while plan and not (results and results[-1].done) and len(results) < 20:
    results.append(env.step(plan[0]))
    plan = results[-1].info.extra["policy_commands"]
  assert results[-1].info.won and all(r.info.valid for r in results)
  assert len(results) <= len(GAMES_BY_TRIAL["trial_fixture_b"].walkthrough)
  env.close()


def test_none_and_invalid_commands_answer_nothing_happens(env):
  _, info = env.reset(_task(env, "trial_fixture_a"))
  for action in (None, "fly to the moon", "take apple 1 from diningtable 1", ""):
    result = env.step(action)
    assert result.observation == NOTHING_HAPPENS
    assert not result.info.valid and not result.done and result.reward == 0.0
    assert result.info.extra["command"] is None
    assert result.info.admissible_actions == info.admissible_actions
  assert result.info.extra["turn"] == 4
  # The state did not move: the walkthrough still wins from here.
  assert _play(env, GAMES_BY_TRIAL["trial_fixture_a"].walkthrough)[-1].info.won


def test_engine_itself_answers_nothing_happens():
  """The adapter answers invalid commands without the engine; pin that to what it says."""
  infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
  game = fixture.game_path(fixture.GAMES[0])
  env_id = textworld.gym.register_games(
    [str(game)], infos, batch_size=1, asynchronous=False, max_episode_steps=50,
    wrappers=[AlfredDemangler(shuffle=False), AlfredInfos],
  )
  engine = textworld.gym.make(env_id)
  _, before = engine.reset()
  obs, _, done, after = engine.step(["fly to the moon"])
  engine.close()
  assert obs[0] == NOTHING_HAPPENS and not done[0]
  assert after["admissible_commands"] == before["admissible_commands"]


@pytest.mark.parametrize(
  "spoken",
  [
    "put apple 1 in/on countertop 1",
    "  PUT Apple 1   on CounterTop 1. ",
    "put apple 1 in countertop 1",
    "Move apple 1 to countertop 1",
  ],
)
def test_put_and_move_wordings_win(env, spoken):
  env.reset(_task(env, "trial_fixture_a"))
  _play(env, ["go to diningtable 1", "take apple 1 from diningtable 1", "go to countertop 1"])
  result = env.step(spoken)
  assert result.info.valid and result.info.won and result.done
  assert result.info.extra["command"] == "move apple 1 to countertop 1"


def test_canonical_command_both_engine_wordings():
  move_engine = ["go to sofa 1", "move pillow 2 to sofa 1", "take cd 1 from safe 1"]
  put_engine = ["go to sofa 1", "put pillow 2 in/on sofa 1"]
  assert canonical_command("put pillow 2 in sofa 1", move_engine) == "move pillow 2 to sofa 1"
  assert canonical_command("put pillow 2 in/on sofa 1", move_engine) == "move pillow 2 to sofa 1"
  assert canonical_command("move pillow 2 to sofa 1", put_engine) == "put pillow 2 in/on sofa 1"
  assert canonical_command("  Take   CD 1 from SAFE 1 ", move_engine) == "take cd 1 from safe 1"
  assert canonical_command("put pillow 1 in sofa 1", move_engine) is None  # Another pillow.
  assert canonical_command("put pillow 2 in sofa 2", move_engine) is None
  assert canonical_command("go to sofa", move_engine) is None


def test_turn_limit_ends_lost(tmp_path):
  env = AlfworldEnv(data_dir=FIXTURE_DIR, max_turns=3, cache_dir=tmp_path)
  env.reset(_task(env, "trial_fixture_a"))
  results = _play(env, ["go to diningtable 1", None, "look"])
  assert [r.done for r in results] == [False, False, True]
  assert results[-1].info.lost and not results[-1].info.won and results[-1].reward == 0.0
  # One step short of the walkthrough's four: the limit holds even with the win in reach.
  env.reset(_task(env, "trial_fixture_a"))
  results = _play(env, GAMES_BY_TRIAL["trial_fixture_a"].walkthrough[:3])
  assert results[-1].done and results[-1].info.lost
  env.close()


def test_engine_crash_fails_the_episode_with_the_error(env, monkeypatch):
  env.reset(_task(env, "trial_fixture_a"))

  def crash(commands):
    raise RuntimeError("injected engine failure")

  monkeypatch.setattr(env._engine, "step", crash)  # pylint: disable=protected-access
  result = env.step("go to diningtable 1")
  assert result.done and result.info.lost and not result.info.won
  assert "injected engine failure" in result.info.error


def test_missing_data_dir_says_where_and_how(monkeypatch, tmp_path):
  monkeypatch.delenv("ALFWORLD_DATA", raising=False)
  with pytest.raises(FileNotFoundError) as unset:
    AlfworldEnv()
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as absent:
    AlfworldEnv(data_dir=missing)
  for error in (unset, absent):
    message = str(error.value)
    for hint in ("alfworld-download", "ALFWORLD_DATA", "../shared/alfworld/unpack", "json_2.1.1"):
      assert hint in message
  assert str(missing) in str(absent.value)


def test_task_listing_order_and_filters(tmp_path):
  first = AlfworldEnv(data_dir=FIXTURE_DIR, cache_dir=tmp_path)
  again = AlfworldEnv(data_dir=FIXTURE_DIR, cache_dir=tmp_path)
  tasks = first.tasks("valid_seen")
  assert tasks == again.tasks("valid_seen")
  expected = {(g.folder, g.trial) for g in fixture.GAMES if g.split == "valid_seen"}
  assert {(t.task_id.split("/")[0], t.meta["trial"]) for t in tasks} == expected
  for seed in range(4):
    shuffled = AlfworldEnv(data_dir=FIXTURE_DIR, cache_dir=tmp_path, seed=seed).tasks("valid_seen")
    assert sorted(t.task_id for t in shuffled) == sorted(t.task_id for t in tasks)

  (two,) = AlfworldEnv(data_dir=FIXTURE_DIR, cache_dir=tmp_path, task_types=[6]).tasks("valid_seen")
  assert two.task_type == "pick_two_obj_and_place" and two.meta["object"] == "Apple"
  assert (two.meta["recep"], two.meta["scene"], two.meta["mrecep"]) == ("CounterTop", 901, None)
  with pytest.raises(ValueError, match="task_types"):
    AlfworldEnv(data_dir=FIXTURE_DIR, task_types=["pick_and_juggle"])
  with pytest.raises(ValueError, match="split"):
    first.tasks("test")


def test_parse_task_folder():
  look = parse_task_folder("look_at_obj_in_light-AlarmClock-None-DeskLamp-308")
  assert (look["toggle"], look["recep"], look["scene"]) == ("DeskLamp", None, 308)
  assert look["pddl_params"] == {
    "object_target": "AlarmClock", "parent_target": "", "toggle_target": "DeskLamp",
    "mrecep_target": "", "object_sliced": False,
  }
  heat = parse_task_folder("pick_heat_then_place_in_recep-PotatoSliced-Pan-GarbageCan-10")
  assert (heat["recep"], heat["mrecep"], heat["sliced"]) == ("GarbageCan", "Pan", True)
  assert heat["pddl_params"]["object_target"] == "Potato"
  assert parse_task_folder("pick_heat_then_place_in_recep-PotatoSliced-Pan-GarbageCan-10/trial_T2019_a") == heat
  with pytest.raises(ValueError, match="pick_and_place_simple-Mug"):
    parse_task_folder("pick_and_place_simple-Mug-Desk-308")


def _cached_and_uncached_agree(task: Task, data_dir: pathlib.Path, cache_dir: pathlib.Path) -> None:
  """Plays `task`'s walkthrough with no caches and from a warm cache; all output must match."""
  uncached = AlfworldEnv(data_dir=data_dir, facts=True, grounding_cache=False, parse_memo=False)
  with open(task.meta["gamefile"]) as f:
    game = json.load(f)
  filler = GroundingCache(cache_dir)
  for optimize in (False, True):  # The two groundings a reset asks for.
    filler.pddl2sas(game["pddl_domain"], game["pddl_problem"], optimize=optimize)
  cached = AlfworldEnv(data_dir=data_dir, facts=True, cache_dir=cache_dir)
  runs = []
  for env in (uncached, cached):
    obs, info = env.reset(task)
    steps = _play(env, info.extra["walkthrough"])
    runs.append(
      [(obs, info.admissible_actions, info.extra["facts"])]
      + [
        (r.observation, r.info.admissible_actions, r.info.extra["facts"], r.info.won)
        for r in steps
      ]
    )
  assert runs[0] == runs[1]
  assert runs[1][-1][-1]  # Won.
  # Every grounding of the cached reset came from disk or memory, none was recomputed,
  # and the steps reused parses.
  assert cached.cache.misses == 0 and cached.cache.disk_hits == 2
  assert cached.parse_memo.hits > 0


def test_cached_reset_matches_uncached_fixture(tmp_path):
  env = AlfworldEnv(data_dir=FIXTURE_DIR, cache_dir=tmp_path)
  _cached_and_uncached_agree(_task(env, "trial_fixture_b"), FIXTURE_DIR, tmp_path)


def test_grounding_cache_returns_what_fast_downward_computes(tmp_path, caplog):
  data = fixture.game_json(fixture.GAMES[0])
  domain, problem = data["pddl_domain"], data["pddl_problem"]
  cache = GroundingCache(tmp_path)
  sas_by_optimize = {}
  for optimize in (False, True):
    _, sas = fast_downward.interface.pddl2sas(domain, problem, optimize=optimize)
    sas_by_optimize[optimize] = sas
    assert cache.pddl2sas(domain, problem, optimize=optimize)[1] == sas
    assert GroundingCache(tmp_path).pddl2sas(domain, problem, optimize=optimize)[1] == sas
  assert cache.misses == 2
  # Two whole entries, no temporary files left behind.
  assert sorted(p.name[-4:] for p in tmp_path.iterdir()) == [".pkl", ".pkl"]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

  # A truncated entry (not one the cache wrote) is recomputed, logged and replaced.
  path = cache.path(cache.key(domain, problem, optimize=False))
  path.write_bytes(path.read_bytes()[:100])
  fresh = GroundingCache(tmp_path)
  with caplog.at_level(logging.WARNING):
    assert fresh.pddl2sas(domain, problem)[1] == sas_by_optimize[False]
  assert fresh.misses == 1 and "Unreadable grounding cache entry" in caplog.text
  assert pickle.loads(zlib.decompress(path.read_bytes()))[1] == sas_by_optimize[False]


_GROUND_IN_A_WORKER = """
import sys
sys.path.insert(0, {fixtures!r})
import make_alfworld_fixture as fixture
from sage_opd_jax.envs.alfworld_cache import GroundingCache
data = fixture.game_json(fixture.GAMES[0])
cache = GroundingCache({cache_dir!r})
for optimize in (False, True):
  cache.pddl2sas(data["pddl_domain"], data["pddl_problem"], optimize=optimize)
"""


def test_grounding_cache_shared_by_concurrent_processes(tmp_path):
  script = _GROUND_IN_A_WORKER.format(fixtures=str(FIXTURE_DIR.parent), cache_dir=str(tmp_path))
  command = [sys.executable, "-c", script]
  workers = [subprocess.Popen(command, stderr=subprocess.PIPE) for _ in range(2)]
  for worker in workers:
    _, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 0, stderr.decode()
  # Whichever worker's write landed last, each entry is whole and right.
  data = fixture.game_json(fixture.GAMES[0])
  domain, problem = data["pddl_domain"], data["pddl_problem"]
  reader = GroundingCache(tmp_path)
  for optimize in (False, True):
    expected = fast_downward.interface.pddl2sas(domain, problem, optimize=optimize)[1]
    assert reader.pddl2sas(domain, problem, optimize=optimize)[1] == expected
  assert reader.misses == 0
  assert sorted(p.name.startswith(".tmp") for p in tmp_path.iterdir()) == [False, False]


def test_grounding_cache_is_installed_only_inside_the_block(tmp_path):
  cache = GroundingCache(tmp_path)
  original = fast_downward.pddl2sas
  with pytest.raises(KeyError):
    with cache.installed():
      assert fast_downward.pddl2sas == cache.pddl2sas
      raise KeyError("leave the block by an error")
  assert fast_downward.pddl2sas is original


def test_real_split_sizes(tmp_path):
  data_dir = real_alfworld_data()
  env = AlfworldEnv(data_dir=data_dir, cache_dir=tmp_path)
  splits = ("train", "valid_seen", "valid_unseen", "valid_train")
  sizes = {split: len(env.tasks(split)) for split in splits}
  assert sizes == {"train": 3553, "valid_seen": 140, "valid_unseen": 134, "valid_train": 200}
  reseeded = AlfworldEnv(data_dir=data_dir, cache_dir=tmp_path, seed=1)
  seeded = [t.task_id for t in reseeded.tasks("valid_unseen")]
  assert seeded != [t.task_id for t in env.tasks("valid_unseen")]
  assert sorted(seeded) == sorted(t.task_id for t in env.tasks("valid_unseen"))


def test_real_walkthroughs_win_sampled_valid_unseen(tmp_path):
  data_dir = real_alfworld_data()
  env = AlfworldEnv(data_dir=data_dir, cache_dir=tmp_path)
  tasks = env.tasks("valid_unseen")
  # Two families, one of them pick_two (which needs the "move" wording twice).
  sample = [next(t for t in tasks if t.task_type == family)
            for family in ("pick_two_obj_and_place", "pick_heat_then_place_in_recep")]
  for task in sample:
    obs, info = env.reset(task)
    object_name = task.meta["object"].lower()
    assert object_name in info.task
    results = _play(env, info.extra["walkthrough"])
    assert all(r.info.valid for r in results)
    assert results[-1].info.won and results[-1].done and not any(r.done for r in results[:-1])


def test_real_cached_reset_matches_uncached(tmp_path):
  data_dir = real_alfworld_data()
  # A short game (a look_at_obj_in_light walkthrough is 3-4 steps): the uncached run is slow.
  task = AlfworldEnv(data_dir=data_dir, cache_dir=tmp_path, task_types=[2]).tasks("valid_unseen")[0]
  _cached_and_uncached_agree(task, data_dir, tmp_path)


def test_subgoal_thoughts_follow_the_pick_up_of_the_task_object():
  task_id = "pick_and_place_simple-SoapBottle-None-CounterTop-424/trial_T1"
  actions = ["go to toilet 1", "take toiletpaper 2 from toilet 1", "take soapbottle 3 from toilet 1",
             "take soapbottle 3 from toilet 1", "go to countertop 1", "move soapbottle 3 to countertop 1"]
  observations = ["You are in the middle of a room.", "You arrive at toilet 1.", "You pick up the toiletpaper 2.",
                  "Nothing happens.", "You pick up the soapbottle 3 from the toilet 1.", "You arrive at countertop 1.",
                  "You move the soapbottle 3 to the countertop 1."]
  # Another object's pick-up and a failed take leave the subgoal as it was.
  assert alfworld.subgoal_thoughts(task_id, actions, observations) == [
      "find soapbottle"] * 4 + ["put soapbottle 3 in countertop"] * 2
  # Named takes: every take of the task's object, the failed one too (a thought never reads the
  # feedback that answers its action); another object's take stays a search.
  assert alfworld.subgoal_thoughts(task_id, actions, observations, name_take=True) == [
      "find soapbottle", "find soapbottle", "take soapbottle", "take soapbottle"] + [
      "put soapbottle 3 in countertop"] * 2


def test_subgoal_thoughts_of_look_at_obj_in_light():
  task_id = "look_at_obj_in_light-AlarmClock-None-DeskLamp-308/trial_T2"
  actions = ["go to sidetable 1", "take alarmclock 3 from sidetable 1", "go to sidetable 2", "use desklamp 2"]
  observations = ["You are in the middle of a room.", "You arrive at sidetable 1.",
                  "You pick up the alarmclock 3 from the sidetable 1.", "You arrive at sidetable 2.",
                  "You turn on the desklamp 2."]
  assert alfworld.subgoal_thoughts(task_id, actions, observations) == [
      "find alarmclock", "find alarmclock", "find desklamp", "use desklamp 2"]
  with pytest.raises(ValueError, match="pick_two_obj_and_place"):
    alfworld.subgoal_thoughts("pick_two_obj_and_place-Apple-None-CounterTop-901/t", actions, observations)
