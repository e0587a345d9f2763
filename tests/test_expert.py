"""ALFWorld's imitable expert on the real engine: the fixture games, then sampled real ones.

The fixture games (tests/fixtures/alfworld, hand-written in the ALFWorld domain) run
everywhere; the `real_*` test needs $ALFWORLD_DATA and skips without it.
"""

import os
import re

import alfworld.gen.constants as alfred_constants
import pytest
from conftest import real_alfworld_data

from sage_opd_jax import envs
from sage_opd_jax.envs import alfworld as alfworld_env
from sage_opd_jax.envs import alfworld_expert

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "alfworld")


@pytest.fixture(scope="module")
def fixture_env(tmp_path_factory):
  env = envs.make("alfworld", data_dir=FIXTURE_DIR, max_turns=30, facts=True,
                  cache_dir=str(tmp_path_factory.mktemp("grounding")))
  yield env
  env.close()


def _fixture_tasks(env):
  return list(env.tasks("valid_seen")) + list(env.tasks("train"))


def _acts_before_observing(episode):
  """(turn, action, entity) for every entity an action names before any observation showed it."""
  bad = []
  for t, action in enumerate(episode.actions):
    seen = "\n".join(episode.observations[: t + 1])
    for entity in re.findall(r"[a-z]+ [0-9]+", action):
      if re.search(r"(?<![a-z])" + entity + r"(?![0-9])", seen) is None:
        bad.append((t, action, entity))
  return bad


def test_task_params_come_from_the_folder_name():
  meta = alfworld_env.parse_task_folder("look_at_obj_in_light-CD-None-DeskLamp-308")
  task = envs.Task("alfworld", "valid_unseen", "x/trial", meta["task_type"], meta)
  assert alfworld_expert.task_params(task) == {
      "task_type": "look_at_obj_in_light", "object_target": "cd", "parent_target": "",
      "toggle_target": "desklamp", "mrecep_target": "", "object_sliced": False,
  }
  meta = alfworld_env.parse_task_folder("pick_heat_then_place_in_recep-Potato-None-GarbageCan-10")
  params = alfworld_expert.task_params(envs.Task("alfworld", "train", "y/trial", meta["task_type"], meta))
  assert (params["object_target"], params["parent_target"], params["toggle_target"]) == ("potato", "garbagecan", "")


def test_unknown_target_class_is_an_error_naming_it():
  meta = alfworld_env.parse_task_folder("pick_and_place_simple-Unicorn-None-CounterTop-1")
  with pytest.raises(ValueError, match="object_target.*Unicorn"):
    alfworld_expert.task_params(envs.Task("alfworld", "train", "z/t", meta["task_type"], meta))


def test_unobserved_entities_helper():
  text = "You arrive at countertop 1. On the countertop 1, you see a apple 11, and a pineapple 2."
  assert alfworld_expert.unobserved_entities("take apple 11 from countertop 1", text) == []
  assert alfworld_expert.unobserved_entities("take apple 1 from countertop 1", text) == ["apple 1"]
  assert alfworld_expert.unobserved_entities("take apple 2 from countertop 1", text) == ["apple 2"]


def test_expert_wins_the_fixture_games_without_acting_on_unseen_objects(fixture_env):
  tasks = _fixture_tasks(fixture_env)
  assert {t.task_type for t in tasks} >= {"pick_and_place_simple", "pick_two_obj_and_place"}
  for task in tasks:
    episode = alfworld_expert.run_episode(fixture_env, task)
    assert episode.won, (task.task_id, episode.actions, episode.error)
    assert _acts_before_observing(episode) == [], task.task_id
    assert len(episode.observations) == len(episode.actions) + 1 == len(episode.admissible_actions) + 1
    for action, admissible in zip(episode.actions, episode.admissible_actions):
      assert action in admissible


def test_pick_two_needs_the_put_wording_fix(fixture_env, monkeypatch):
  task = next(t for t in _fixture_tasks(fixture_env) if t.task_type == "pick_two_obj_and_place")
  assert alfworld_expert.run_episode(fixture_env, task).won
  # Without the fix the expert's tracking never empties its inventory after "move".
  monkeypatch.setattr(alfworld_expert, "tracking_wording", lambda command: command)
  episode = alfworld_expert.run_episode(fixture_env, task)
  assert not episode.won
  assert "move apple 1 to countertop 1" in episode.actions  # It did deliver the first one.


def test_expert_shadows_another_agents_episode_and_takes_over(fixture_env):
  """The expert tracks what the env played, so it can name the next action after anyone's."""
  task = next(t for t in _fixture_tasks(fixture_env) if t.task_type == "pick_two_obj_and_place")
  observation, info = fixture_env.reset(task)
  expert = alfworld_expert.ImitableExpert(task, seed=0)
  suggestion = expert.first_action(observation, info)
  # Another agent: a detour, an invalid command, then one apple to the right place.
  other = ["go to cabinet 1", "take unicorn 1 from cabinet 1", "go to diningtable 1",
           "take apple 1 from diningtable 1", "go to countertop 1", "put apple 1 in/on countertop 1"]
  for action in other:
    result = fixture_env.step(action)
    suggestion = expert.next_action(result)
  assert result.info.extra["command"] == "move apple 1 to countertop 1" and not result.done
  observations = [result.observation]
  for _ in range(20):  # The expert takes over and must finish: fetch the second apple.
    result = fixture_env.step(suggestion)
    observations.append(result.observation)
    if result.done:
      break
    suggestion = expert.next_action(result)
  assert result.info.won, observations
  assert any("apple 2" in o for o in observations)


def test_expert_is_reproducible_for_a_seed(fixture_env):
  task = _fixture_tasks(fixture_env)[1]
  first = alfworld_expert.run_episode(fixture_env, task, seed=3)
  again = alfworld_expert.run_episode(fixture_env, task, seed=3)
  assert first.actions == again.actions and first.observations == again.observations


def test_shuffled_search_draws_the_order_of_the_prior_receptacles_from_the_seed(fixture_env):
  # The apple may be on the countertop or the diningtable (ALFRED's priors), and is on the diningtable.
  task = next(t for t in _fixture_tasks(fixture_env) if t.task_id.startswith("pick_and_place_simple-Apple"))
  priors = {r.lower() for r, objects in alfred_constants.VAL_RECEPTACLE_OBJECTS.items() if "Apple" in objects}

  def first_visits(search_order):
    episodes = [alfworld_expert.run_episode(fixture_env, task, seed=s, search_order=search_order) for s in range(4)]
    for episode in episodes:
      assert episode.won and _acts_before_observing(episode) == [], episode.actions
    return [e.actions[0] for e in episodes]

  assert len(set(first_visits("prior"))) == 1  # One order per room, whatever the seed.
  shuffled = first_visits("shuffled")
  assert len(set(shuffled)) == 2, shuffled
  assert {a.removeprefix("go to ").rsplit(" ", 1)[0] for a in shuffled} <= priors
  again = alfworld_expert.run_episode(fixture_env, task, seed=1, search_order="shuffled")
  assert again.actions == alfworld_expert.run_episode(fixture_env, task, seed=1, search_order="shuffled").actions
  with pytest.raises(ValueError, match="search_order='random'"):
    alfworld_expert.ImitableExpert(task, search_order="random")


def test_peek_answers_like_a_step_and_leaves_the_episode_unchanged(fixture_env):
  task = next(t for t in _fixture_tasks(fixture_env) if t.task_type == "pick_two_obj_and_place")
  plain = alfworld_expert.run_episode(fixture_env, task, seed=1)
  peeked = {}

  def peek_everything(turn, info, expert_action):
    del expert_action
    for command in info.admissible_actions + ["take unicorn 1 from countertop 1", None]:
      peeked[turn, command] = alfworld_expert.peek(fixture_env, command)

  with_peeks = alfworld_expert.run_episode(fixture_env, task, seed=1, before_step=peek_everything)
  assert with_peeks.won and with_peeks.actions == plain.actions
  assert with_peeks.observations == plain.observations
  assert with_peeks.admissible_actions == plain.admissible_actions
  # Reference: the feedback of really stepping the command after replaying the prefix.
  for turn in (0, len(plain.actions) // 2, len(plain.actions) - 1):
    others = [c for c in plain.admissible_actions[turn] if c not in ("help", plain.actions[turn])]
    for command in [plain.actions[turn]] + others[-2:] + ["take unicorn 1 from countertop 1", None]:
      fixture_env.reset(task)
      for action in plain.actions[:turn]:
        fixture_env.step(action)
      result = fixture_env.step(command)
      assert peeked[turn, command] == (result.observation, result.info.valid), (turn, command)


def test_env_without_facts_is_refused(tmp_path):
  env = envs.make("alfworld", data_dir=FIXTURE_DIR, facts=False, cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="facts=True"):
    alfworld_expert.run_episode(env, env.tasks("valid_seen")[0])
  env.close()


def test_real_expert_wins_most_sampled_valid_unseen_games():
  env = envs.make("alfworld", data_dir=real_alfworld_data(), max_turns=50, facts=True, seed=0)
  tasks, seen_types = [], set()
  for task in env.tasks("valid_unseen"):  # The first game of each task type, in seeded order.
    if task.task_type not in seen_types:
      seen_types.add(task.task_type)
      tasks.append(task)
  assert len(tasks) == 6
  episodes = [alfworld_expert.run_episode(env, task) for task in tasks]
  env.close()
  wins = sum(e.won for e in episodes)
  print(f"imitable expert won {wins}/{len(episodes)} valid_unseen games (one per task type): "
        + ", ".join(f"{e.task.task_type}={'W' if e.won else 'L'}:{len(e.actions)}" for e in episodes))
  assert wins >= 4
  for episode in episodes:
    assert _acts_before_observing(episode) == [], episode.task.task_id


def test_object_hint_names_the_task_object_where_it_is_seen_and_the_expert_plays_the_same():
  """`env.object_hint` adds one sentence before each list that shows the task's object, and no other
  text: the expert (which reads the list) plays the same actions with it, on real pick games."""
  data = real_alfworld_data()
  plain, hinted = (envs.make("alfworld", data_dir=data, max_turns=30, facts=True, seed=0, object_hint=hint,
                             task_types=("pick_and_place_simple",)) for hint in (False, True))
  hinted_lists = 0
  for task in plain.tasks("valid_unseen")[:4]:
    obj = alfworld_env.parse_task_folder(task.task_id)["pddl_params"]["object_target"].lower()
    a, b = alfworld_expert.run_episode(plain, task), alfworld_expert.run_episode(hinted, task)
    assert b.actions == a.actions and b.won == a.won, task.task_id
    for before, after in zip(a.observations, b.observations, strict=True):
      listed = re.search(r"(?:On the [a-z]+ \d+|In it), you see (.*)", before)
      instance = listed and re.search(rf"\b{obj} \d+\b", listed[1])
      if instance:
        hint = f"There is the {instance[0]}. "
        assert after == before.replace(listed[0], hint + listed[0], 1), (task.task_id, after)
        hinted_lists += 1
      else:
        assert after == before, (task.task_id, after)
  plain.close()
  hinted.close()
  assert hinted_lists >= 4  # Every won pick game sees its object at least once.
  # Unset, the option is no constructor argument, so demos collected without it (whose manifest records the
  # env's arguments) still resume.
  kwargs = envs.base.spec("alfworld").config_kwargs
  assert kwargs({"data_dir": "", "object_hint": False}) == {"data_dir": None}
  assert kwargs({"data_dir": "", "object_hint": True}) == {"data_dir": None, "object_hint": True}
