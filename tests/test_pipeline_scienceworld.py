"""The whole pipeline on ScienceWorld's real engine, at toy budgets: gold-path demos, the
corpus tokenizer, teacher and student SFT, two methods, the results table."""

import csv
import json
import shutil

import matplotlib.image
import pytest

from configs import alfworld_cpu
from configs import base
from configs import scienceworld_cpu
from sage_opd_jax import config as config_lib
from sage_opd_jax import models
from sage_opd_jax import pipeline
from sage_opd_jax import results
from sage_opd_jax import writers
from sage_opd_jax.envs import demos as demos_lib
from sage_opd_jax.envs import scienceworld as sw

pytestmark = pytest.mark.usefixtures("java")  # conftest.java: skips without Java, fails under CI.

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
            max_position_embeddings=1024)


def tiny_config():
  """scienceworld_cpu with the budgets cut to a couple of tasks and updates."""
  config = scienceworld_cpu.get_config()
  config.env.task_types = ("find-non-living-thing", "lifespan-longest-lived")  # Gold paths of ~5 turns.
  config.env.max_turns = 3
  config.env.history_turns = 1
  config.env.num_workers = 1
  config.env.eval_splits = ("dev",)  # Test's evaluation is the same code; each split's eval costs a rollout.
  config.student.model = base.tiny_model(**TINY)
  config.teacher.model = base.tiny_model(**dict(TINY, hidden_size=48, head_dim=24))
  config.demos.limit = 3
  config.demos.judge_states = 1
  config.sampling.max_new_tokens = 8
  config.judge.max_new_tokens = 2
  config.train.batch_episodes = 2
  config.train.eval_every = 100
  config.train.ckpt_every = 100
  config.eval.num_episodes = 1
  config.eval.num_transcripts = 1
  config.teacher.score_chunk = 64
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 1  # Batch 2 over 2 of the 8 fake devices.
  config.pipeline = alfworld_cpu.pipeline_config(
      teacher_steps=1, student_steps=1, student_demos=2, distill_steps=1, methods=("opd", "sage_opd"),
      seeds=(0,), heldout_split="dev", heldout_games=1)
  return config_lib.validate(config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("sw_pipeline")
  pipeline.run(tiny_config(), root)
  return root


def test_pipeline_writes_the_results_table(workdir):
  table = (workdir / "results" / "results.md").read_text()
  for method in ("opd", "sage_opd"):
    assert f"| {method} | 1 |" in table
  assert "dev success" in table and "test success" not in table
  assert "Judge accuracy on held-out games' judge examples" in table
  assert "Partial" not in table  # Every planned method and seed finished.
  with open(workdir / "results" / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  # Each row's numbers are its run's final greedy eval (one seed: the mean is that run's, the std 0).
  evals = {results.STUDENT_START: workdir / "student_eval", results.TEACHER: workdir / "teacher_eval",
           "opd": workdir / "runs" / "opd" / "seed0", "sage_opd": workdir / "runs" / "sage_opd" / "seed0"}
  assert [r["method"] for r in rows] == list(evals)
  for row in rows:
    final = results._final_eval(evals[row["method"]])  # pylint: disable=protected-access
    for key in ("success", "mean_turns", "invalid_rate"):
      assert float(row[f"dev/{key}_mean"]) == pytest.approx(final[f"eval/dev/t0/{key}"], abs=1e-6), (row, key)
  # The curve of the last eval split: a decodable 6 x 4 inch plot at 120 dpi.
  assert matplotlib.image.imread(workdir / "results" / "dev_success.png").shape == (480, 720, 4)


def test_every_stage_is_timed_once(workdir):
  times = results.stage_times(workdir)
  assert set(times) == {"teacher_sft", "teacher_eval", "judge_accuracy", "student_sft", "student_eval",
                        "opd/seed0", "sage_opd/seed0"}, times
  assert all(t > 0 for t in times.values()), times
  pipeline.run(tiny_config(), workdir)  # Resuming a finished pipeline redoes (and re-times) nothing.
  assert results.stage_times(workdir) == times


def test_demos_are_gold_paths_of_the_chosen_task_types(workdir):
  for split, games in (("train", 3), ("dev", 1)):
    manifest = json.loads((workdir / "demos" / split / demos_lib.MANIFEST).read_text())
    assert manifest["expert"] == sw.EXPERT_NAME and manifest["branch"] == "replay"
    assert manifest["games_done"] == games and manifest["games_won"] == games, manifest
    assert "facts" not in manifest["env_kwargs"]
  demos = [json.loads(line) for line in (workdir / "demos" / "train" / demos_lib.DEMOS).read_text().splitlines()]
  assert {d["task_type"] for d in demos} <= {"find-non-living-thing", "lifespan-longest-lived"}
  assert all(d["env"] == "scienceworld" and d["won"] and len(d["observations"]) == d["num_turns"] + 1
             for d in demos)


def test_tokenizer_covers_the_demonstrations(workdir):
  tokenizer = models.load_tokenizer(str(workdir / "tokenizer"))
  for split in ("train", "dev"):
    for text in demos_lib.demo_texts([workdir / "demos" / split]):
      ids = tokenizer.encode(text, add_special_tokens=False)
      assert tokenizer.unk_token_id not in ids, text
      assert tokenizer.decode(ids) == text
  manifest = json.loads((workdir / "tokenizer" / "sage_manifest.json").read_text())
  assert "ScienceWorld" in manifest["source"]
  # The engine's own names are in too: an animal no train demo of these task types shows.
  assert tokenizer.unk_token_id not in tokenizer.encode(" giant tortoise", add_special_tokens=False)


def test_rerun_resumes_without_redoing_any_stage(workdir):
  stamps = {p: p.stat().st_mtime_ns for p in workdir.glob("**/hf/config.json")}
  stamps[workdir / "tokenizer" / "sage_manifest.json"] = (workdir / "tokenizer" / "sage_manifest.json"
                                                           ).stat().st_mtime_ns
  assert len(stamps) == 5  # teacher, student_sft, two runs, and the tokenizer.
  pipeline.run(tiny_config(), workdir)
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_partial_table_names_what_is_missing(workdir, tmp_path):
  config = tiny_config()
  config.pipeline.seeds = (0, 1)  # One more seed than ran.
  results.write_results(workdir, config, results_dir=tmp_path / "run")
  report = (workdir / "results" / "results.md").read_text()
  assert "**Partial:** not finished yet: opd (1/2 seeds), sage_opd (1/2 seeds)." in report
  games = int(results._final_eval(workdir / "student_eval")["eval/dev/t0/episodes"])
  assert f"(greedy eval on {games} dev games of {', '.join(config.env.task_types)})" in report
  assert (tmp_path / "run" / "dev_success.png").exists() and not list(tmp_path.glob("**/*.md"))
  assert (tmp_path / "run" / "results.csv").read_text() == (workdir / "results" / "results.csv").read_text()


def test_a_sweep_reruns_the_methods_from_the_same_teacher_and_student(workdir, tmp_path):
  root = tmp_path / "pipeline"
  shutil.copytree(workdir, root)  # The other tests keep the module's workdir as it was.
  finished = {p: p.stat().st_mtime_ns for p in root.glob("**/hf/config.json")}
  config = tiny_config()
  config.pipeline.methods = ("opd",)
  config.pipeline.sweep = "lr_high"
  config.optim.learning_rate = 0.01  # The sweep's change; the SFT stages keep pipeline.sft_learning_rate.
  config.optim.warmup_steps = 0
  pipeline.run(config, root)
  assert {p: p.stat().st_mtime_ns for p in finished} == finished  # Teacher, student and base runs untouched.
  sweep = root / "sweeps" / "lr_high"
  rows = writers.rows_with(sweep / "runs" / "opd" / "seed0", "train/")
  assert [row["train/learning_rate"] for row in rows] == pytest.approx([0.01])
  base_rows = writers.rows_with(root / "runs" / "opd" / "seed0", "train/")
  assert base_rows[0]["train/learning_rate"] != pytest.approx(0.01)
  assert "| opd | 1 |" in (sweep / "results" / "results.md").read_text()
  assert "| opd | 1 |" in (root / "results" / "results.md").read_text()  # The main report is the base runs'.
  assert "lr_high/opd/seed0" in results.stage_times(root)
  results.write_results(root, config, results_dir=tmp_path / "docs" / "run")
  with open(tmp_path / "docs" / "run_lr_high" / "results.csv", newline="") as f:  # Beside the main results.
    assert [r["method"] for r in csv.DictReader(f)][-1] == "opd"
  assert not (tmp_path / "docs" / "run").exists()
  # A sweep that changes what made the shared start is refused by name, before anything runs: it would reuse a
  # start made without its change.
  demos = config.pipeline.student_demos
  config.pipeline.sweep, config.pipeline.student_demos = "more_demos", demos + 1
  with pytest.raises(config_lib.ConfigError, match=rf"(?s)student_sft holds a run made with another config.*"
                                                   rf"pipeline\.student_demos: {demos} -> {demos + 1}\n"
                                                   rf"  sft\.max_demos: {demos} -> {demos + 1}\nUse a new workdir"):
    pipeline.run(config, root)
  assert not (root / "sweeps" / "more_demos" / "runs").exists()
