"""The results report's pieces, on metric logs written here."""

import csv
import json
import pathlib
import subprocess
import sys

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from configs import alfworld_cpu
from sage_opd_jax import pipeline
from sage_opd_jax import results
from sage_opd_jax import writers


def _log(run_dir, rows):
  writer = writers.MetricWriter(run_dir)
  for step, row in enumerate(rows, 1):
    writer.write(step, row)
  writer.close()


def test_time_table_medians_each_phase_over_every_seed(tmp_path):
  rng = np.random.default_rng(0)
  runs = {}
  for method, judge in (("opd", None), ("sage_opd", 3.0)):
    runs[method] = []
    for seed in range(2):
      run_dir = tmp_path / method / f"seed{seed}"
      rows = []
      for _ in range(5):
        row = {"time/rollout": rng.uniform(4, 6), "time/teacher": rng.uniform(0.5, 1), "time/update": rng.uniform(1, 2)}
        if judge is not None:
          row["time/judge"] = judge + rng.uniform(0, 1)
        row["time/data"] = sum(v for k, v in row.items() if k != "time/update")
        rows.append(row)
      _log(run_dir, rows + [{"eval/valid_seen/t0/success": 0.5}])  # Eval rows carry no times.
      runs[method].append(run_dir)
  table = results.time_table(runs).splitlines()
  assert table[0] == "| method | rollout | teacher | judge | update | total | / opd |"

  def expected(method):
    rows = [r for d in runs[method] for r in writers.read_metrics(d) if "time/update" in r]
    parts = [np.median([r.get(f"time/{p}", 0.0) for r in rows]) for p in ("rollout", "teacher", "judge", "update")]
    return parts, np.median([r["time/data"] + r["time/update"] for r in rows])

  (opd_parts, opd_total), (sage_parts, sage_total) = expected("opd"), expected("sage_opd")
  assert table[2] == "| opd | " + " | ".join(f"{v:.2f}" for v in opd_parts) + f" | {opd_total:.2f} | 1.00x |"
  assert table[3] == ("| sage_opd | " + " | ".join(f"{v:.2f}" for v in sage_parts)
                      + f" | {sage_total:.2f} | {sage_total / opd_total:.2f}x |")


def test_time_table_is_empty_without_timed_updates(tmp_path):
  _log(tmp_path / "eval_only", [{"eval/valid_seen/t0/success": 0.5}])
  assert results.time_table({"student": [tmp_path / "eval_only"]}) == ""


def test_seed_mean_averages_the_seeds_that_logged_the_key(tmp_path):
  _log(tmp_path / "s0", [{"judge/skip_frac": 0.2}, {"judge/skip_frac": 0.4}])
  _log(tmp_path / "s1", [{"judge/skip_frac": 0.6}, {"judge/skip_frac": 0.8}])
  _log(tmp_path / "s2", [{"train/loss": 1.0}])  # Never judged: left out, not counted as 0.
  steps, values = results._seed_mean([tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"], "judge/skip_frac")
  assert steps == [1, 2]
  np.testing.assert_allclose(values, [0.4, 0.6])
  assert results._seed_mean([tmp_path / "s2"], "judge/skip_frac") is None


def _pixels(png, colour, alpha=1.0):
  """How many pixels of `png` are matplotlib colour `colour` drawn at `alpha` over white."""
  image_HxWx4 = matplotlib.image.imread(png)
  want = alpha * np.asarray(matplotlib.colors.to_rgb(colour)) + (1 - alpha)
  return int((np.abs(image_HxWx4[..., :3] - want).max(-1) < 0.02).sum())


def test_label_mix_plot_stacks_each_judged_methods_fractions(tmp_path):
  _log(tmp_path / "sage", [{"judge/skip_frac": 0.5, "judge/weak_frac": 0.3, "judge/strong_frac": 0.2}] * 3)
  _log(tmp_path / "opd", [{"train/loss": 1.0}] * 3)
  results._plot_label_mix({"sage_opd": [tmp_path / "sage"], "opd": [tmp_path / "opd"]}, tmp_path / "mix.png")
  results._plot_label_mix({"opd": [tmp_path / "opd"]}, tmp_path / "none.png")
  # One panel (opd is never judged), 4 x 3.2 inches at 120 dpi; its bands' areas are the fractions
  # (their colours at the stack's alpha 0.85; the legend covers some of the lowest band), so that
  # swapped or dropped fractions miss by 0.2 or more.
  assert matplotlib.image.imread(tmp_path / "mix.png").shape == (384, 480, 4)
  areas = np.asarray([_pixels(tmp_path / "mix.png", f"C{i}", alpha=0.85) for i in range(3)])
  np.testing.assert_allclose(areas / areas.sum(), [0.5, 0.3, 0.2], atol=0.05)
  assert all(_pixels(tmp_path / "none.png", f"C{i}", alpha=0.85) == 0 for i in range(3))


def test_success_plot_draws_every_methods_curve(tmp_path):
  _log(tmp_path / "start", [{"eval/valid_seen/t0/success": 0.25}])
  _log(tmp_path / "opd", [{"eval/valid_seen/t0/success": 0.5}, {"eval/valid_seen/t0/success": 0.75}])
  _log(tmp_path / "sage", [{"train/loss": 1.0}, {"eval/valid_seen/t0/success": 1.0}])
  runs = {"opd": [tmp_path / "opd"], "sage_opd": [tmp_path / "sage"]}
  results._plot(runs, "eval/valid_seen/t0/success", "success", tmp_path / "curve.png", start=tmp_path / "start")
  assert matplotlib.image.imread(tmp_path / "curve.png").shape == (480, 720, 4)  # 6 x 4 inches at 120 dpi.
  # Each method's curve in its own colour, and nothing of a third.
  assert _pixels(tmp_path / "curve.png", "C0") > 100 and _pixels(tmp_path / "curve.png", "C1") > 100
  assert _pixels(tmp_path / "curve.png", "C2") == 0


def test_the_ledger_names_the_commit_each_stage_ran_at(tmp_path):
  # A ledger line from before commits were recorded, then two stages of this checkout.
  (tmp_path / results.TIMINGS).write_text(json.dumps({"stage": "teacher_sft", "seconds": 5.0}) + "\n")
  results.record_stage_time(tmp_path, "student_sft", 2.0)
  results.record_stage_time(tmp_path, "opd/seed0", 3.0)
  head = results.git_commit(pathlib.Path(__file__).parent)  # Pinned against git itself below.
  assert results.stage_commits(tmp_path) == {"unrecorded": ["teacher_sft"], head: ["student_sft", "opd/seed0"]}
  assert results.stage_times(tmp_path) == {"teacher_sft": 5.0, "student_sft": 2.0, "opd/seed0": 3.0}

  # A stage that raises is recorded as an unfinished attempt: its time counts, the stage has
  # not finished, and it raises on.
  def crash():
    raise RuntimeError("LLVM: Cannot allocate memory")

  with pytest.raises(RuntimeError, match="LLVM"):
    pipeline._stage(tmp_path, "sage_opd/seed0", False, crash)  # pylint: disable=protected-access
  assert "sage_opd/seed0" in results.stage_times(tmp_path)
  assert all("sage_opd/seed0" not in stages for stages in results.stage_commits(tmp_path).values())
  assert results._raised_note(tmp_path) == " (1 that raised included)"  # pylint: disable=protected-access


def test_a_run_from_an_edited_checkout_is_labelled_dirty(tmp_path):
  def git(*args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                          capture_output=True, text=True).stdout.strip()

  assert results.git_commit(tmp_path) == "unknown"
  git("init", "-q")
  (tmp_path / "losses.py").write_text("a = 1\n")
  git("add", "losses.py")
  git("commit", "-qm", "one")
  head = git("rev-parse", "--short", "HEAD")
  (tmp_path / "notes.txt").write_text("untracked files are not the code\n")
  assert results.git_commit(tmp_path) == head
  (tmp_path / "losses.py").write_text("a = 2\n")
  assert results.git_commit(tmp_path) == head + "+dirty"


def test_the_ledger_keeps_the_commit_the_run_started_at(tmp_path, monkeypatch):
  started = results.code_commit()
  # The checkout may move on during a long run; the ledger must not ask git again.
  monkeypatch.setattr(results.subprocess, "run", lambda *args, **kwargs: pytest.fail("asked git again"))
  results.record_stage_time(tmp_path, "opd/seed0", 1.0)
  assert results.stage_commits(tmp_path) == {started: ["opd/seed0"]}


def _finished_workdir(root, sweep=""):
  """A pipeline workdir whose student start and two methods are evaluated (eval-only folders)."""
  def evaluated(run_dir, success):
    _log(run_dir, [{f"eval/{split}/t0/{key}": value for split in ("valid_seen", "valid_unseen")
                    for key, value in (("success", success), ("invalid_rate", 0.0), ("repeated_rate", 0.1),
                                       ("mean_turns", 9.0), ("episodes", 4.0))}])

  evaluated(root / "student_eval", 0.25)
  for method, success in (("opd", 0.5), ("sage_opd", 0.75)):
    evaluated(results.sweep_root(root, sweep) / "runs" / method / "seed0", success)
  return root


def _report_config(sweep=""):
  config = alfworld_cpu.get_config()
  config.pipeline.methods, config.pipeline.seeds, config.pipeline.sweep = ("opd", "sage_opd"), (0,), sweep
  return config


def test_results_dir_gets_the_csv_and_plots_and_the_report_stays_in_the_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  root = _finished_workdir(pathlib.Path("workdirs") / "pick")  # Relative, as typed on a command line.
  monkeypatch.setattr(sys, "argv", ["main.py", "--config=configs/alfworld_cpu.py", "--workdir=workdirs/pick"])
  out = results.write_results(root, _report_config(), results_dir="docs/results/pick")

  docs = tmp_path / "docs" / "results" / "pick"
  assert sorted(p.name for p in docs.iterdir()) == [
      "judge_label_mix.png", "results.csv", results.SOURCE, "valid_unseen_success.png"]
  assert not list((tmp_path / "docs").glob("**/*.md"))  # A rerun leaves no stray report in docs/.
  assert (docs / "results.csv").read_text() == (out / "results.csv").read_text()
  with open(docs / "results.csv", newline="") as f:
    assert [(r["method"], r["valid_unseen/success_mean"]) for r in csv.DictReader(f)] == [
        (results.STUDENT_START, "0.25"), ("opd", "0.5"), ("sage_opd", "0.75")]
  source = json.loads((docs / results.SOURCE).read_text())
  assert (source["config"], source["workdir"]) == ("configs/alfworld_cpu.py", "pick")
  report = (out / "results.md").read_text()
  assert out == root / "results" and "Command: `python -m sage_opd_jax.main --config=configs/alfworld_cpu.py " \
      "--workdir=workdirs/pick`" in report
  assert "](results.csv)" in report and "](valid_unseen_success.png)" in report  # Links beside the report.
  for text in (report, (docs / results.SOURCE).read_text()):
    assert str(tmp_path) not in text  # No machine path in what may be committed.


def test_results_dir_another_workdir_wrote_is_kept_and_its_own_is_rewritten(tmp_path, caplog):
  config = _report_config()
  root = _finished_workdir(tmp_path / "pick")
  docs = tmp_path / "docs" / "pick"
  docs.mkdir(parents=True)
  (docs / "results.csv").write_text("a committed table\n")  # Files that do not name their workdir.
  results.write_results(root, config, results_dir=docs)
  assert sorted(p.name for p in docs.iterdir()) == ["results.csv"] and "an unnamed workdir" in caplog.text
  assert (docs / "results.csv").read_text() == "a committed table\n"

  (docs / "results.csv").unlink()  # An empty folder is anyone's.
  results.write_results(root, config, results_dir=docs)
  written = (docs / "results.csv").read_text()
  assert written == (root / "results" / "results.csv").read_text()
  (docs / "results.csv").write_text("stale\n")
  results.write_results(root, config, results_dir=docs)  # Its own folder: rewritten.
  assert (docs / "results.csv").read_text() == written

  variant = _finished_workdir(tmp_path / "variant")  # A variant's workdir with other numbers.
  _log(variant / "runs" / "opd" / "seed1", [{"eval/valid_unseen/t0/success": 0.0}])
  caplog.clear()
  results.write_results(variant, config, results_dir=docs)
  assert (docs / "results.csv").read_text() == written and "results of workdir 'pick'" in caplog.text
  assert (variant / "results" / "results.csv").read_text() != written  # Its own table is in its workdir.


def test_a_sweeps_results_dir_is_beside_the_configs(tmp_path):
  root = _finished_workdir(tmp_path / "pick", sweep="lr_high")
  results.write_results(root, _report_config("lr_high"), results_dir=tmp_path / "docs" / "pick")
  assert (tmp_path / "docs" / "pick_lr_high" / "results.csv").read_text() == (
      root / "sweeps" / "lr_high" / "results" / "results.csv").read_text()
  assert not (tmp_path / "docs" / "pick").exists()


def test_the_teacher_is_a_row_of_the_table_beside_the_student_start_and_the_methods(tmp_path):
  root = _finished_workdir(tmp_path / "pick")
  # The teacher's eval folder also holds its judge accuracy, in a row of its own after the eval.
  _log(root / "teacher_eval", [{f"eval/{split}/t0/{key}": value for split in ("valid_seen", "valid_unseen")
                                for key, value in (("success", 0.625), ("invalid_rate", 0.0),
                                                   ("repeated_rate", 0.0), ("mean_turns", 7.0))},
                               {"judge_eval/accuracy": 0.5, "judge_eval/count": 8.0}])
  out = results.write_results(root, _report_config())
  with open(out / "results.csv", newline="") as f:
    assert [(r["method"], r["valid_seen/success_mean"]) for r in csv.DictReader(f)] == [
        (results.STUDENT_START, "0.25"), (results.TEACHER, "0.625"), ("opd", "0.5"), ("sage_opd", "0.75")]
  report = (out / "results.md").read_text()
  assert f"| {results.TEACHER} | 1 | 0.625 ± 0.000 |" in report and "Judge accuracy" in report
