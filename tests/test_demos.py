"""Demonstration and judge-example collection: records, judge feedback, resume, failures.

Collection runs the real expert on the real engine over the fixture games
(tests/fixtures/alfworld). Hangs, crashes and engine exceptions are injected through
a small scripted env registered here (workers import this module), since what is
under test there is the collection's supervision, not the game.
"""

import json
import os
import shutil
import time

import pytest

from sage_opd_jax import envs
from sage_opd_jax import sft_data
from sage_opd_jax.envs import alfworld
from sage_opd_jax.envs import demos

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "alfworld")
_MODULE = __name__


def _fixture_collection(tmp_path_factory, branch):
  out = tmp_path_factory.mktemp(f"demos_{branch}")
  kwargs = dict(data_dir=FIXTURE_DIR, max_turns=30, facts=True, cache_dir=str(tmp_path_factory.mktemp("grounding")))
  result = demos.collect(out, "valid_seen", kwargs, num_workers=2, judge_states=3, branch=branch,
                         game_timeout_s=120, progress=False)
  return out, kwargs, result


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
  """One collection over the fixture games' valid_seen split (both won by the expert)."""
  return _fixture_collection(tmp_path_factory, "snapshot")


@pytest.fixture(scope="module")
def fixture_run_replay(tmp_path_factory):
  return _fixture_collection(tmp_path_factory, "replay")


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_demo_records_have_the_schema_and_are_consistent(fixture_run):
  out, _, result = fixture_run
  assert result.manifest["games_total"] == 2 and result.manifest["games_won"] == 2
  assert result.manifest["success_rate"] == 1.0
  records = _lines(out / demos.DEMOS)
  assert sorted(r["task_id"] for r in records) == sorted(g["task_id"] for g in _lines(out / demos.GAMES))
  for r in records:
    assert tuple(sorted(r)) == tuple(sorted(demos.DEMO_KEYS))
    assert r["won"] and r["split"] == "valid_seen" and r["task"].startswith("Your task is to:")
    assert r["task_type"] == r["task_id"].split("-")[0]
    assert r["num_turns"] == len(r["actions"]) == len(r["valid"]) == len(r["admissible_actions"])
    assert len(r["observations"]) == len(r["actions"]) + 1
    assert all(a in adm for a, adm in zip(r["actions"], r["admissible_actions"]))
    assert all(r["valid"])


@pytest.mark.parametrize("run", ["fixture_run", "fixture_run_replay"])
def test_judge_examples_carry_the_envs_own_feedback(run, request):
  out, kwargs, _ = request.getfixturevalue(run)
  demo_by_id = {r["task_id"]: r for r in _lines(out / demos.DEMOS)}
  examples = _lines(out / demos.JUDGE)
  assert {e["label"] for e in examples} == set(demos.LABELS)
  env = envs.make("alfworld", **kwargs)
  tasks = {t.task_id: t for t in env.tasks("valid_seen")}
  for e in examples:
    assert tuple(sorted(e)) == tuple(sorted(demos.JUDGE_KEYS))
    demo, t = demo_by_id[e["task_id"]], e["turn"]
    assert e["observation"] == demo["observations"][t]
    assert e["admissible_actions"] == demo["admissible_actions"][t]
    if e["label"] == "Skip":
      assert e["action"] == demo["actions"][t] and e["feedback"] == demo["observations"][t + 1]
      continue
    if e["label"] == "Strong":
      assert e["action"] not in e["admissible_actions"] and not e["valid"]
    else:
      assert e["action"] in e["admissible_actions"] and e["action"] != demo["actions"][t] and e["valid"]
    # Reference: a fresh env in this process, replaying the demo up to the state.
    env.reset(tasks[e["task_id"]])
    for i, action in enumerate(demo["actions"][:t]):
      assert env.step(action).observation == demo["observations"][i + 1]
    assert env.step(e["action"]).observation == e["feedback"], e
  env.close()
  loaded = list(demos.load_judge_examples(out, history_turns=2))
  assert len(loaded) == len(examples)
  for example in loaded:
    demo = demo_by_id[example.task_id]
    assert len(example.history) == min(2, example.turn)
    if example.history:
      assert example.history[-1] == (demo["observations"][example.turn - 1], demo["actions"][example.turn - 1])


def test_rerun_skips_finished_games_and_drops_unfinished_records(fixture_run):
  out, kwargs, _ = fixture_run
  before = {name: (out / name).read_text() for name in (demos.GAMES, demos.DEMOS, demos.JUDGE)}
  inodes = {name: (out / name).stat().st_ino for name in before}
  again = demos.collect(out, "valid_seen", kwargs, num_workers=1, judge_states=3, progress=False)
  assert again.new_games == 0
  assert {name: (out / name).read_text() for name in before} == before
  # Nothing to drop, so nothing is rewritten: the same files, not replaced by copies (two pipelines resuming
  # one workdir both pass here), and no temporary file left beside them.
  assert {name: (out / name).stat().st_ino for name in before} == inodes
  assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
  # A run killed after writing a game's records but before its ledger line.
  games = before[demos.GAMES].splitlines(keepends=True)
  (out / demos.GAMES).write_text("".join(games[:-1]))
  redone = demos.collect(out, "valid_seen", kwargs, num_workers=1, judge_states=3, progress=False)
  assert redone.new_games == 1
  task_ids = [r["task_id"] for r in _lines(out / demos.DEMOS)]
  assert len(task_ids) == len(set(task_ids)) == 2
  assert redone.manifest["games_done"] == 2


def test_readers_do_not_depend_on_the_order_workers_finished_in(fixture_run, tmp_path):
  out, _, _ = fixture_run
  # The same records as another collection's workers may have written them: games reversed, each
  # game's own judge examples still in their written order.
  for name in (demos.DEMOS, demos.JUDGE):
    records = _lines(out / name)
    games = list(dict.fromkeys(r["task_id"] for r in records))
    assert len(games) == 2
    demos.rewrite_jsonl(tmp_path / name, [r for g in reversed(games) for r in records if r["task_id"] == g])
  assert sft_data.read_demonstrations(tmp_path) == sft_data.read_demonstrations(out)
  assert sft_data.read_judge_examples(tmp_path, 2) == sft_data.read_judge_examples(out, 2)


def test_resume_with_other_settings_is_refused(fixture_run):
  out, kwargs, _ = fixture_run
  with pytest.raises(ValueError, match="judge_states"):
    demos.collect(out, "valid_seen", kwargs, num_workers=1, judge_states=1, progress=False)
  with pytest.raises(ValueError, match="facts"):
    demos.collect(out, "valid_seen", {**kwargs, "facts": False}, num_workers=1, judge_states=3, progress=False)
  with pytest.raises(ValueError, match="search_order='prior' but this run has 'shuffled'"):
    demos.collect(out, "valid_seen", kwargs, num_workers=1, judge_states=3, search_order="shuffled", progress=False)


def test_a_folder_collected_before_search_orders_resumes_as_prior(fixture_run, tmp_path):
  out, kwargs, _ = fixture_run
  old = tmp_path / "old"
  shutil.copytree(out, old)
  manifest = json.loads((old / demos.MANIFEST).read_text())
  del manifest["search_order"]
  (old / demos.MANIFEST).write_text(json.dumps(manifest))
  result = demos.collect(old, "valid_seen", kwargs, num_workers=1, judge_states=3, progress=False)
  assert result.new_games == 0 and result.manifest["search_order"] == "prior"
  with pytest.raises(ValueError, match="search_order='prior'"):
    demos.collect(old, "valid_seen", kwargs, num_workers=1, judge_states=3, search_order="shuffled", progress=False)


# --- injected failures ---------------------------------------------------------------


@envs.register("demos_test")
class FaultyEnv:
  """Six one-step games; t1's step hangs, t3's raises, t4's kills the worker."""

  def tasks(self, split):
    return [envs.Task("demos_test", split, f"t{i}", "one_step") for i in range(6)]

  def reset(self, task):
    self.task = task
    return "start", envs.StepInfo(task="win", admissible_actions=["win"])

  def step(self, action):
    if self.task.task_id == "t1":
      time.sleep(3600)
    if self.task.task_id == "t3":
      raise RuntimeError("injected engine failure")
    if self.task.task_id == "t4":
      os._exit(7)
    return envs.StepResult("won", 1.0, True, envs.StepInfo(task="win", admissible_actions=[], won=True))

  def close(self):
    pass


def one_step_game(env, task, seed, judge_states, max_expert_steps, branch, search_order):
  """A `game_fn` that plays the scripted env's one-step game."""
  del seed, judge_states, max_expert_steps, branch, search_order
  observation, _ = env.reset(task)
  result = env.step("win")
  demo = dict(task_id=task.task_id, observations=[observation, result.observation], actions=["win"])
  return dict(status="won", turns=1, seconds=0.0, error=None, demo=demo, judge=[])


def test_hang_crash_and_exception_are_skipped_and_collection_goes_on(tmp_path):
  def run(**kw):
    return demos.collect(tmp_path, "train", {}, env_name="demos_test", num_workers=2, game_timeout_s=3.0,
                         game_fn=one_step_game, imports=(_MODULE,), progress=False, **kw)

  result = run()
  status = {g["task_id"]: g["status"] for g in _lines(tmp_path / demos.GAMES)}
  assert status == {"t0": "won", "t1": "timeout", "t2": "won", "t3": "error", "t4": "crash", "t5": "won"}
  errors = {g["task_id"]: g["error"] for g in _lines(tmp_path / demos.GAMES)}
  assert "injected engine failure" in errors["t3"] and "exit code 7" in errors["t4"]
  assert sorted(r["task_id"] for r in _lines(tmp_path / demos.DEMOS)) == ["t0", "t2", "t5"]
  assert result.manifest["last_run"]["respawns"] == 2  # The hung and the crashed worker.
  assert run().new_games == 0  # Failed games count as finished...
  assert run(retry_failed=True).new_games == 3  # ...unless asked to retry them.


def test_subgoal_thoughts_of_a_real_expert_episode(fixture_run):
  out, _, _ = fixture_run
  (record,) = [r for r in _lines(out / demos.DEMOS) if r["task_type"] == "pick_and_place_simple"]
  thoughts = alfworld.subgoal_thoughts(record["task_id"], record["actions"], record["observations"])
  take = next(t for t, a in enumerate(record["actions"]) if a.startswith("take apple"))
  held = record["actions"][take].split(" from ")[0][len("take "):]
  assert thoughts == ["find apple"] * (take + 1) + [f"put {held} in countertop"] * (len(thoughts) - take - 1)
  assert record["actions"][-1] == f"move {held} to countertop 1"


def test_judge_examples_carry_the_thought_of_their_state(fixture_run, tmp_path):
  out, _, _ = fixture_run
  # Only the pick_and_place_simple game: subgoal thoughts refuse pick_two (tested below).
  keep = {r["task_id"] for r in _lines(out / demos.DEMOS) if r["task_type"] == "pick_and_place_simple"}
  for name in (demos.DEMOS, demos.JUDGE):
    lines = [json.dumps(r) for r in _lines(out / name) if r["task_id"] in keep]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
  (task_id,) = keep
  records = _lines(tmp_path / demos.JUDGE)
  for thoughts in ("subgoal", "subgoal_take"):
    demo = sft_data.Demonstration.from_record(_lines(tmp_path / demos.DEMOS)[0], thoughts)
    examples = sft_data.read_judge_examples(tmp_path, 2, thoughts)
    assert len(examples) == len(records) > 0
    for record, example in zip(records, examples):
      if record["label"] == "Skip":  # The expert's own step: the demo's own thought.
        assert example.thought == demo.thoughts[record["turn"]]
      assert example.thought.startswith(("find apple", "take apple", "put apple"))
      # The transcript judge reads the response whole; section 5's prompt without its thought.
      assert f"<think>{example.thought}</think>" in sft_data.judge_prompt(None, example, 2, transcript=True)
      assert f"<think>{example.thought}</think>" not in sft_data.judge_prompt(None, example, 2)
  assert "take apple" in demo.thoughts
  assert all(e.thought == "" for e in sft_data.read_judge_examples(tmp_path, 2))
  with pytest.raises(ValueError, match="pick_two_obj_and_place"):
    sft_data.read_judge_examples(out, 2, "subgoal")
