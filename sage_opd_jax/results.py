"""Results of a pipeline workdir: the table (markdown + CSV), the plots, the judge's accuracy."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import subprocess
import sys
from typing import Any, Sequence

import jax
import matplotlib

matplotlib.use("Agg")  # Headless: results are written to files, never shown.
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from sage_opd_jax import dagger  # noqa: E402
from sage_opd_jax import files  # noqa: E402
from sage_opd_jax import judge as judge_lib  # noqa: E402
from sage_opd_jax import models  # noqa: E402
from sage_opd_jax import provenance  # noqa: E402
from sage_opd_jax import sft_data  # noqa: E402
from sage_opd_jax import train  # noqa: E402
from sage_opd_jax import writers  # noqa: E402

# The columns of the table, per split: (metric key suffix, header).
COLUMNS = (("success", "success"), ("invalid_rate", "invalid"), ("repeated_rate", "repeated"),
           ("mean_turns", "turns"))


TIMINGS = "timings.jsonl"  # One line per stage attempt: name, wall seconds, commit (finished=False if it raised).
STUDENT_START = "student (warm start, no distillation)"  # The table row every method starts from.
TEACHER = "teacher"  # The table row of the teacher every method distils from.


def record_stage_time(root: pathlib.Path, stage: str, seconds: float, finished: bool = True) -> None:
  """Appends a stage attempt's wall time and the commit it ran at, so that a pipeline resumed
  any number of times sums them all and its report names the code that made each number.

  `finished=False` records an attempt that raised (its stage resumes on the next run): its
  time was spent too, but the stage did not finish at that commit.
  """
  row = {"stage": stage, "seconds": round(float(seconds), 1), "commit": code_commit()}
  with open(pathlib.Path(root) / TIMINGS, "a", encoding="utf-8") as f:
    f.write(json.dumps(row if finished else {**row, "finished": False}) + "\n")


def _timing_rows(root: pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(root) / TIMINGS
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def stage_times(root: pathlib.Path) -> dict[str, float]:
  """{stage: wall seconds} summed over every recorded attempt, those that raised included."""
  times: dict[str, float] = {}
  for row in _timing_rows(root):
    times[row["stage"]] = times.get(row["stage"], 0.0) + row["seconds"]
  return times


def _raised_note(root: pathlib.Path) -> str:
  raised = sum(not row.get("finished", True) for row in _timing_rows(root))
  return f" ({raised} that raised included)" if raised else ""


def stage_commits(root: pathlib.Path) -> dict[str, list[str]]:
  """{commit: the stages that finished at it}, in order; "unrecorded" for ledgers older than commits."""
  commits: dict[str, list[str]] = {}
  for row in _timing_rows(root):
    if not row.get("finished", True):
      continue
    commits.setdefault(row.get("commit", "unrecorded"), []).append(row["stage"])
  return commits


def padded_vocab_size(tokenizer_dir: str, multiple: int = 64) -> int:
  """The tokenizer's size rounded up, so the embedding shards evenly over a mesh."""
  size = len(models.load_tokenizer(tokenizer_dir))
  return -(-size // multiple) * multiple


def judge_accuracy_stage(config: ml_collections.ConfigDict, demos_dir: pathlib.Path, workdir: pathlib.Path
                         ) -> dict[str, float]:
  """The (SFT'd) teacher's judge accuracy on the judge examples of held-out games."""
  tokenizer = models.load_tokenizer(config.tokenizer_dir)
  teacher = train.load_model(config.student, None, config.seed)
  examples = sft_data.read_judge_examples(demos_dir, sft_data.judge_window(config.judge), config.sft.thoughts)
  metrics = judge_lib.judge_accuracy(teacher, tokenizer, examples, jax.random.PRNGKey(config.seed),
                                     history_turns=config.judge.history_turns,
                                     show_admissible=config.judge.show_admissible,
                                     transcript=judge_lib.judge_mode(config.judge.mode).asks_in_transcript,
                                     max_new_tokens=config.judge.max_new_tokens,
                                     enable_thinking=config.judge.enable_thinking,
                                     acting_thinking=config.sampling.enable_thinking)
  writer = writers.MetricWriter(workdir)
  writer.write(0, metrics)
  writer.close()
  return metrics


def _final_eval(run_dir: pathlib.Path) -> dict[str, float]:
  """The last row holding eval metrics of a run's metrics.jsonl."""
  rows = writers.rows_with(run_dir, "eval/")
  if not rows:
    raise ValueError(f"{run_dir}/metrics.jsonl has no eval rows: the run has not been evaluated.")
  return {k: v for k, v in rows[-1].items() if isinstance(v, float)}


def _finished(run_dir: pathlib.Path) -> bool:
  """A training run counts once exported (its evals so far are partial); an eval-only folder at once."""
  if not (run_dir / "metrics.jsonl").exists():
    return False
  return writers.exported(run_dir) or not (run_dir / "checkpoints").exists()


def _curve(run_dir: pathlib.Path, key: str) -> tuple[list[int], list[float]]:
  rows = [r for r in writers.read_metrics(run_dir) if key in r]
  last = {r["step"]: r[key] for r in rows}  # A resumed run rewrites steps: keep the last.
  steps = sorted(last)
  return steps, [last[s] for s in steps]


def collect_runs(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """{method: [run dirs, one per seed]} under `root/runs`."""
  runs: dict[str, list[pathlib.Path]] = {}
  for run_dir in sorted((root / "runs").glob("*/seed*")):
    runs.setdefault(run_dir.parent.name, []).append(run_dir)
  return runs


def table_rows(runs: dict[str, list[pathlib.Path]], splits: Sequence[str], temperature: float = 0.0
               ) -> list[dict[str, Any]]:
  """One row per method: mean and std over seeds of each split's columns."""
  rows = []
  for method, dirs in runs.items():
    finals = [_final_eval(d) for d in dirs]
    row: dict[str, Any] = {"method": method, "seeds": len(dirs)}
    for split in splits:
      for suffix, _ in COLUMNS:
        key = f"eval/{split}/t{temperature:g}/{suffix}"
        values = [f[key] for f in finals if key in f]
        if values:
          row[f"{split}/{suffix}"] = (float(np.mean(values)), float(np.std(values)))
    rows.append(row)
  return rows


_TIME_PARTS = ("rollout", "teacher", "judge", "update")  # The loop's phases, as `train` times them.


def time_table(runs: dict[str, list[pathlib.Path]]) -> str:
  """Median seconds per update of each phase and in all, over every update of every seed.

  The medians leave out the first updates' compilations. "/ opd" is each method's total
  against opd's: the price of the judge in the loop as it really ran.
  """
  medians = {}
  for method, dirs in runs.items():
    rows = [r for d in dirs for r in writers.read_metrics(d) if "time/update" in r]
    if rows:
      medians[method] = {part: float(np.median([r.get(f"time/{part}", 0.0) for r in rows])) for part in _TIME_PARTS}
      medians[method]["total"] = float(np.median([r.get("time/data", 0.0) + r["time/update"] for r in rows]))
  if not medians:
    return ""
  lines = ["| method | " + " | ".join(_TIME_PARTS) + " | total | / opd |", "|" + "---|" * (len(_TIME_PARTS) + 3)]
  for method, m in medians.items():
    ratio = f"{m['total'] / medians['opd']['total']:.2f}x" if "opd" in medians else "–"
    lines.append(f"| {method} | " + " | ".join(f"{m[part]:.2f}" for part in _TIME_PARTS)
                 + f" | {m['total']:.2f} | {ratio} |")
  return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], splits: Sequence[str]) -> str:
  headers = ["method", "seeds"] + [f"{split} {name}" for split in splits for _, name in COLUMNS]
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in rows:
    cells = [row["method"], str(row["seeds"])]
    for split in splits:
      for suffix, _ in COLUMNS:
        mean_std = row.get(f"{split}/{suffix}")
        cells.append("–" if mean_std is None else f"{mean_std[0]:.3f} ± {mean_std[1]:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _seed_mean(dirs: Sequence[pathlib.Path], key: str) -> tuple[list[int], np.ndarray] | None:
  """`key` against updates, averaged over the seeds that logged it (None if none did)."""
  curves = [c for c in (_curve(d, key) for d in dirs) if c[0]]
  if not curves:
    return None
  steps = curves[0][0]
  return steps, np.asarray([c[1][: len(steps)] for c in curves if len(c[1]) >= len(steps)]).mean(0)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _plot(runs: dict[str, list[pathlib.Path]], key: str, ylabel: str, path: pathlib.Path,
          start: pathlib.Path | None = None) -> None:
  """Mean over seeds of `key` against updates, per method; `start` (an eval folder) is update 0."""
  origin = _curve(start, key) if start is not None and (start / "metrics.jsonl").exists() else ([], [])
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (method, dirs) in enumerate(runs.items()):
    if (curve := _seed_mean(dirs, key)) is None:
      continue
    steps, values = curve
    if origin[0] and steps[0] > 0:  # Every method starts from the same student.
      steps, values = [0, *steps], np.concatenate([[origin[1][-1]], values])
    # Methods often tie on a few dozen games: hollow markers, each smaller than the last, keep every
    # tied method visible.
    ax.plot(steps, values, marker=_MARKERS[i % len(_MARKERS)], markersize=max(11 - 1.5 * i, 3), fillstyle="none",
            linestyle=("-", "--", ":", "-.")[i % 4], label=method)
  ax.set_xlabel("updates")
  ax.set_ylabel(ylabel)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save_figure(fig, path)


def _save_figure(fig: Any, path: pathlib.Path) -> None:
  """Writes `fig` as a PNG to `path` whole (`files.write_atomically`: two sweeps rewriting one report leave one
  of their plots, never a mix) and closes it."""
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  files.write_atomically(path, png.getvalue())


_LABELS = ("skip", "weak", "strong")


def _plot_label_mix(runs: dict[str, list[pathlib.Path]], path: pathlib.Path) -> None:
  """The judge's Skip / Weak / Strong fractions against updates (seed means), a panel per judged method."""
  mixes = {}
  for method, dirs in runs.items():
    curves = [_seed_mean(dirs, f"judge/{label}_frac") for label in _LABELS]
    if all(c is not None for c in curves):
      length = min(len(c[0]) for c in curves)
      mixes[method] = (curves[0][0][:length], [c[1][:length] for c in curves])
  fig, axes = plt.subplots(1, max(len(mixes), 1), figsize=(4 * max(len(mixes), 1), 3.2), sharey=True, squeeze=False)
  for ax, (method, (steps, fractions)) in zip(axes[0], mixes.items()):
    ax.stackplot(steps, *fractions, labels=[label.capitalize() for label in _LABELS], alpha=0.85)
    ax.set_title(method, fontsize=9)
    ax.set_xlabel("updates")
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("fraction of judged turns")
  if mixes:
    axes[0][0].legend(fontsize=7, loc="lower left")
  else:
    axes[0][0].text(0.5, 0.5, "no judged run yet", ha="center", va="center", transform=axes[0][0].transAxes)
  fig.tight_layout()
  _save_figure(fig, path)


@functools.cache
def code_commit() -> str:
  """This package's checkout's commit when first asked, wherever the run was started from
  ("unknown" outside git). `pipeline.run` asks at its start: a checkout that moves on during a
  long run does not relabel the stages that the run's imported code made."""
  return git_commit(pathlib.Path(__file__).resolve().parent)


def git_commit(path: pathlib.Path) -> str:
  """The short commit of the checkout holding `path`, "+dirty" if a tracked file differs from it."""
  def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=path)
  try:
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
      return "unknown"
    return head.stdout.strip() + ("+dirty" if git("diff", "--quiet", "HEAD").returncode else "")
  except OSError:
    return "unknown"


SOURCE = "source.json"  # In a results_dir: the config and the workdir its files came from.


def _workdir_id(root: pathlib.Path) -> str:
  """A hash of the workdir's absolute path: which workdir wrote a folder, without naming the machine's paths."""
  return hashlib.sha256(str(pathlib.Path(root).resolve()).encode()).hexdigest()[:16]


def _config_arg() -> str:
  """The command line's config file as given (an absolute path by its name only), "" if none."""
  args = sys.argv[1:]
  given = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), "")
  if not given and "--config" in args[:-1]:
    given = args[args.index("--config") + 1]
  return pathlib.Path(given).name if pathlib.Path(given).is_absolute() else given


def _results_dir_owner(results_dir: pathlib.Path) -> dict[str, str] | None:
  """Whose results `results_dir` holds: None if it is empty or missing, {} if its files do not say."""
  if not results_dir.is_dir() or not any(results_dir.iterdir()):
    return None
  source = results_dir / SOURCE
  return json.loads(source.read_text(encoding="utf-8")) if source.exists() else {}


def sweep_root(root: pathlib.Path, sweep: str) -> pathlib.Path:
  """Where a pipeline's method runs (`runs/`) and report (`results/`) go: the workdir itself, or
  `sweeps/<sweep>` for a sweep from the same teacher and student (`config.pipeline.sweep`)."""
  return pathlib.Path(root) / "sweeps" / sweep if sweep else pathlib.Path(root)


def write_results(root: pathlib.Path, config: ml_collections.ConfigDict, *,
                  results_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes `root/results/{results.md, results.csv, *.png}`, and the CSV and plots to `results_dir`.

  The table holds every finished run (so it can be written after each method), the
  warm-start student every method starts from (`root/student_eval`), the teacher's own
  success and its judge accuracy. The wall time is the sum of every recorded stage attempt
  (`record_stage_time`), however many times the pipeline was resumed.

  Args:
    root: the pipeline's workdir.
    config: the pipeline's config (eval splits, decoding mode, `pipeline.sweep`: the runs and
      the report are those of `sweep_root`).
    results_dir: also copy `results.csv` and the plots there (e.g. docs/results/alfworld_cpu), with
      a `source.json` naming the config file and the workdir (its name and a hash of its path). A
      sweep's go to `<results_dir>_<sweep>` beside it, except the controlled-teacher study's, whose
      CSV and plots of every eta go to `results_dir` itself. The markdown report stays in the workdir.
      A folder whose files another workdir wrote (or that does not say) is kept, with a warning:
      a variant run of a config must not replace the results committed for it.
  """
  sweep = config.pipeline.sweep if "pipeline" in config else ""
  runs_root = sweep_root(root, sweep)
  if config.teacher.kind == "expert" and sweep:  # The controlled-teacher study: every eta's sweep of the workdir.
    write_control_results(root, config, results_dir=results_dir)
    results_dir = None  # Its CSV and plots cover every eta; one eta's report stays in its sweep.
  elif results_dir is not None and sweep:
    results_dir = pathlib.Path(results_dir).with_name(f"{pathlib.Path(results_dir).name}_{sweep}")
  out = runs_root / "results"
  out.mkdir(parents=True, exist_ok=True)
  splits = list(config.env.eval_splits)
  # Only finished runs (evaluated to the end), so the table can be written after every method.
  runs = {m: kept for m, dirs in collect_runs(runs_root).items() if (kept := [d for d in dirs if _finished(d)])}
  rows = table_rows(runs, splits)
  # Above the methods: the start they share and the teacher they distil from.
  given = {name: [root / folder] for name, folder in ((STUDENT_START, "student_eval"), (TEACHER, "teacher_eval"))
           if writers.rows_with(root / folder, "eval/")}
  rows = table_rows(given, splits) + rows
  table = io.StringIO()
  fields = ["method", "seeds"] + [f"{s}/{c}_{stat}" for s in splits for c, _ in COLUMNS for stat in ("mean", "std")]
  w = csv.DictWriter(table, fieldnames=fields)
  w.writeheader()
  for row in rows:
    flat = {"method": row["method"], "seeds": row["seeds"]}
    for s in splits:
      for c, _ in COLUMNS:
        if f"{s}/{c}" in row:
          flat[f"{s}/{c}_mean"], flat[f"{s}/{c}_std"] = row[f"{s}/{c}"]
    w.writerow(flat)
  files.write_atomically(out / "results.csv", table.getvalue())
  curve_split = splits[-1]  # The held-out one (valid_unseen, ScienceWorld's test).
  success_png = f"{curve_split}_success.png"
  _plot(runs, f"eval/{curve_split}/t0/success", f"{curve_split} success (greedy)", out / success_png,
        start=root / "student_eval")
  _plot_label_mix(runs, out / "judge_label_mix.png")
  files.write_atomically(out / "results.md", _report(root, config, runs, rows, splits, success_png=success_png))
  if results_dir is not None:
    _copy_results(root, out, pathlib.Path(results_dir), ("results.csv", success_png, "judge_label_mix.png"))
  print(markdown_table(rows, splits))
  return out


def _copy_results(root: pathlib.Path, out: pathlib.Path, results_dir: pathlib.Path, names: Sequence[str]) -> None:
  """Copies `out/<names>` into `results_dir` with its source.json, unless another workdir's files are there."""
  owner = _results_dir_owner(results_dir)
  if owner is not None and owner.get("workdir_sha256") != _workdir_id(root):
    whose = (f"workdir {owner.get('workdir')!r} (config {owner.get('config') or 'not recorded'})" if owner
             else "an unnamed workdir")
    logging.warning("Not writing %s: it holds the results of %s, not this workdir's (%s, results in %s). "
                    "Delete it, or set config.pipeline.results_dir, to write them.", results_dir, whose, root, out)
    return
  results_dir.mkdir(parents=True, exist_ok=True)
  for name in names:
    files.write_atomically(results_dir / name, (out / name).read_bytes())
  source = {"config": _config_arg(), "workdir": pathlib.Path(root).resolve().name,
            "workdir_sha256": _workdir_id(root), "commit": code_commit()}
  files.write_atomically(results_dir / SOURCE, json.dumps(source, indent=2) + "\n")


def _pending_line(config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]]) -> list[str]:
  """A line naming the pipeline's methods with fewer finished seeds than planned (a partial table)."""
  if "pipeline" not in config:
    return []
  done = {row["method"]: row["seeds"] for row in rows}
  seeds = len(config.pipeline.seeds)
  pending = [f"{m} ({done.get(m, 0)}/{seeds} seeds)" for m in config.pipeline.methods if done.get(m, 0) < seeds]
  return [f"**Partial:** not finished yet: {', '.join(pending)}.", ""] if pending else []


def _teacher_caption(root: pathlib.Path, given: str) -> str:
  """How the evaluated teacher was made: its SFT (or the `given` checkpoint), and its DAgger rounds if any ran."""
  start = f"the given checkpoint `{given}`" if given else "SFT on acting and judging"
  if given and writers.exported(root / "teacher"):  # pipeline.teacher_steps > 0 from the given one.
    start += " after SFT on acting and judging"
  rounds = dagger.round_manifests(root)
  if not rounds:
    return f"Teacher ({start}):"
  parts = []
  for whose, player in (("it", "teacher"), ("the student", "student")):
    played = [r for r in rounds if r.get("player", "teacher") == player]
    if played:
      parts.append(f"{sum(r['corrections'] for r in played):,} expert corrections at the states {whose} reached in "
                   f"{sum(r['games'] for r in played):,} train games {whose} played")
  return (f"Teacher ({start}, then {len(rounds)} DAgger round{'s' * (len(rounds) > 1)}: "
          f"{' and '.join(parts)}):")


def _report(root: pathlib.Path, config: ml_collections.ConfigDict, runs: dict[str, list[pathlib.Path]],
            rows: Sequence[dict[str, Any]], splits: Sequence[str], success_png: str) -> str:
  teacher = {}
  teacher_eval = root / "teacher_eval"
  if (teacher_eval / "metrics.jsonl").exists():
    for row in writers.read_metrics(teacher_eval):
      teacher.update({k: v for k, v in row.items() if k != "step"})
  times = stage_times(root)
  out = sweep_root(root, config.pipeline.sweep if "pipeline" in config else "") / "results"  # Where this report goes.
  start = root / "student_eval"  # Every run evaluates the same games as the start they share.
  games = _final_eval(start) if _finished(start) else {}
  counts = [f"{int(games[key])} {split}" for split in splits if (key := f"eval/{split}/t0/episodes") in games]
  on_games = f" on {' and '.join(counts)} games" if counts else ""
  if counts and config.env.task_types:  # A subset of task types is part of what the rates mean.
    on_games += f" of {', '.join(config.env.task_types)}"
  lines = [
      "# Results", "",
      f"Command: `python -m sage_opd_jax.main {' '.join(sys.argv[1:])}`  ",
      f"Config: [{provenance.RECORD}]({os.path.relpath(root / provenance.RECORD, out)}) (the flattened config of "
      "these numbers; each stage's folder records its own, and a rerun must match it).  ",
      f"Report written at commit `{code_commit()}`; wall time of the recorded stage attempts "
      f"{sum(times.values()) / 3600:.2f} h{_raised_note(root)}; "
      f"decoding {'constrained to admissible actions' if config.sampling.constrained else 'free (the paper’s)'}.  ",
      "Stages finished at commit " + "; ".join(
          f"`{commit}`: {len(stages)} ({', '.join(stages[:3])}{', ...' if len(stages) > 3 else ''})"
          for commit, stages in stage_commits(root).items()) + ".", "",
      f"Success rate, invalid- and repeated-action rates and mean turns (greedy eval{on_games}), mean ± std "
      "over seeds:", "",
      markdown_table(rows, splits), "",
      *_pending_line(config, rows),
      (f"Teacher: the environment's expert (a controlled study, `config.teacher.kind='expert'`): eps_on="
       f"{config.teacher.expert.eps_on:g}, eps_off={config.teacher.expert.eps_off:g}, eta="
       f"{config.teacher.expert.eta:g}; judge `{config.judge.mode}`." if config.teacher.kind == "expert"
       else f"{_teacher_caption(root, config.teacher.hf_dir)} the `{TEACHER}` row above."),
  ]
  if "judge_eval/accuracy" in teacher:
    lines += ["", f"Judge accuracy on held-out games' judge examples: {teacher['judge_eval/accuracy']:.3f} "
              f"({int(teacher['judge_eval/count'])} examples)."]
  if timing := time_table(runs):
    lines += ["", "Seconds per update (median over the updates of every seed; `total` is the batch and the update):",
              "", timing]
  if times:
    lines += ["", "Wall time per stage (minutes): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + "."]
  lines += ["", "CSV: [results.csv](results.csv)", "",
            f"![{success_png[:-4].replace('_', ' ')}]({success_png})", "![judge label mix](judge_label_mix.png)", ""]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The controlled-teacher study (configs/alfworld_control.py): every eta's sweep of one workdir.

CONTROL = "control"  # <workdir>/control/: the study's table, CSV and plots.


def control_rows(root: pathlib.Path, splits: Sequence[str]) -> list[dict[str, Any]]:
  """One row per (eta, method) over the workdir's sweeps run with the expert teacher: final success
  per seed on each split, and the judge's label mix and oracle agreement over every update of every seed."""
  rows = []
  for sweep_dir in sorted((pathlib.Path(root) / "sweeps").glob("*")):
    for method, dirs in collect_runs(sweep_dir).items():
      dirs = [d for d in dirs if _finished(d)]
      recorded = [json.loads((d / provenance.RECORD).read_text(encoding="utf-8"))["config"] for d in dirs]
      if not dirs or any(r.get("teacher.kind") != "expert" for r in recorded):
        continue
      eta = float(recorded[0]["teacher.expert.eta"])
      # The study's sweeps are named as configs/alfworld_control.py names them; a run under another name (a probe
      # at the same eta, `--config.pipeline.sweep=...`) is shown, paired and plotted as a series of its own.
      label = method if sweep_dir.name == f"eta{eta:g}" else f"{method} ({sweep_dir.name})"
      row: dict[str, Any] = {"eta": eta, "method": method, "label": label, "seeds": len(dirs), "sweep": sweep_dir.name}
      finals = [_final_eval(d) for d in dirs]
      for split in splits:
        # Keyed by seed so that a method's margin over OPD pairs runs that shared their games' draws.
        row[f"{split}/by_seed"] = {d.name: f[f"eval/{split}/t0/success"] for d, f in zip(dirs, finals)
                                   if f"eval/{split}/t0/success" in f}
        row[f"{split}/success"] = list(row[f"{split}/by_seed"].values())
      train_rows = [r for d in dirs for r in writers.read_metrics(d) if "judge/skip_frac" in r]
      for key in [f"judge/{label}_frac" for label in _LABELS] + ["judge/oracle_accuracy", "teacher/misdirected_frac"]:
        values = [r[key] for r in train_rows if key in r]
        if values:
          row[key] = float(np.mean(values))
      rows.append(row)
  return sorted(rows, key=lambda r: (r["label"], r["eta"]))


def control_margins(rows: Sequence[dict[str, Any]], splits: Sequence[str], reference: str = "opd"
                    ) -> dict[tuple[float, str], dict[str, tuple[float, float, int]]]:
  """Each method's success minus the reference method's of the same sweep, paired by seed: {(eta, label):
  {split: (mean, std, seeds paired)}}. The paper's claims are about these margins (does SAGE-OPD's grow
  with eta; does each ablation sit below it), and pairing removes what the seeds share."""
  references = {r["sweep"]: r for r in rows if r["method"] == reference}
  margins = {}
  for r in rows:
    if r["method"] == reference or (ref := references.get(r["sweep"])) is None:
      continue
    for split in splits:
      mine, theirs = r[f"{split}/by_seed"], ref[f"{split}/by_seed"]
      diffs = [mine[seed] - theirs[seed] for seed in mine if seed in theirs]
      if diffs:
        margins.setdefault((r["eta"], r["label"]), {})[split] = (float(np.mean(diffs)), float(np.std(diffs)),
                                                                  len(diffs))
  return margins


def _plot_control_success(rows: Sequence[dict[str, Any]], splits: Sequence[str], start: dict[str, float],
                          path: pathlib.Path) -> None:
  """Success against eta, a panel per split: per method the seed mean, its band the seeds' min to max."""
  fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.8), sharey=True, squeeze=False)
  labels = list(dict.fromkeys(r["label"] for r in rows))
  for ax, split in zip(axes[0], splits):
    for i, label in enumerate(labels):
      points = [(r["eta"], r[f"{split}/success"]) for r in rows if r["label"] == label and r[f"{split}/success"]]
      if not points:
        continue
      etas = [e for e, _ in points]
      ax.plot(etas, [np.mean(v) for _, v in points], marker=_MARKERS[i % len(_MARKERS)], fillstyle="none",
              linestyle=("-", "--", ":", "-.")[i % 4], label=label)
      ax.fill_between(etas, [min(v) for _, v in points], [max(v) for _, v in points], alpha=0.15)
    if (key := f"eval/{split}/t0/success") in start:
      ax.axhline(start[key], color="gray", linestyle=":", label="student start")
    ax.set_title(split, fontsize=9)
    ax.set_xlabel("eta (misdirection rate off the expert's path)")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("success (greedy)")
  if axes[0][0].get_legend_handles_labels()[0]:
    axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  _save_figure(fig, path)


def _plot_control_labels(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """The expert-belief judge's Skip / Weak / Strong mix per eta (over the judged methods' updates of the study's
  own sweeps, not a probe's), and its agreement with the oracle."""
  rows = [r for r in rows if r["label"] == r["method"]]
  etas = sorted({r["eta"] for r in rows if "judge/skip_frac" in r})
  fig, ax = plt.subplots(figsize=(5, 3.6))
  bottom = np.zeros(len(etas))
  for label in _LABELS:
    values = np.array([np.mean([r[f"judge/{label}_frac"] for r in rows if r["eta"] == e and "judge/skip_frac" in r])
                       for e in etas])
    ax.bar([str(e) for e in etas], values, bottom=bottom, label=label.capitalize(), alpha=0.85)
    bottom += values
  accuracy = [np.mean([r["judge/oracle_accuracy"] for r in rows if r["eta"] == e and "judge/oracle_accuracy" in r])
              for e in etas]
  ax.plot([str(e) for e in etas], accuracy, color="black", marker="o", label="agreement with the oracle")
  ax.set_xlabel("eta")
  ax.set_ylabel("fraction of turns")
  ax.set_ylim(0, 1.05)
  if etas:
    ax.legend(fontsize=7, loc="lower left")
  else:
    ax.text(0.5, 0.5, "no judged run yet", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  _save_figure(fig, path)


def write_control_results(root: pathlib.Path, config: ml_collections.ConfigDict, *,
                          results_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes `root/control/{control.md, control.csv, success_vs_eta.png, judge_labels_vs_eta.png}`, and the CSV and
  plots to `results_dir` (e.g. docs/results/alfworld_control), from every finished run of every eta's sweep."""
  root = pathlib.Path(root)
  splits = list(config.env.eval_splits)
  rows = control_rows(root, splits)
  out = root / CONTROL
  out.mkdir(parents=True, exist_ok=True)
  start_dir = root / "student_eval"
  start = _final_eval(start_dir) if writers.rows_with(start_dir, "eval/") else {}
  _plot_control_success(rows, splits, start, out / "success_vs_eta.png")
  _plot_control_labels(rows, out / "judge_labels_vs_eta.png")
  label_keys = [f"judge/{label}_frac" for label in _LABELS] + ["judge/oracle_accuracy", "teacher/misdirected_frac"]
  margins = control_margins(rows, splits)
  table = io.StringIO()
  w = csv.writer(table)
  w.writerow(["eta", "method", "seeds", *[f"{s}/success_{stat}" for s in splits for stat in ("mean", "std")],
              *[f"{s}/minus_opd_{stat}" for s in splits for stat in ("mean", "std")], *label_keys])
  for r in rows:
    margin = margins.get((r["eta"], r["label"]), {})
    w.writerow([r["eta"], r["label"], r["seeds"],
                *[f"{x:.4f}" for s in splits for x in ((np.mean(r[f"{s}/success"]), np.std(r[f"{s}/success"]))
                                                      if r[f"{s}/success"] else (np.nan, np.nan))],
                *[cell for s in splits for cell in ((f"{margin[s][0]:.4f}", f"{margin[s][1]:.4f}") if s in margin
                                                    else ("", ""))],
                *[f"{r[k]:.4f}" if k in r else "" for k in label_keys]])
  files.write_atomically(out / "control.csv", table.getvalue())
  lines = ["# Controlled teacher: success against eta", "",
           "Greedy success after the last update, mean ± std over seeds; the expert-belief judge's label mix and "
           "its agreement with the oracle's labels over every update. Student start: " + ", ".join(
               f"{s} {start[f'eval/{s}/t0/success']:.3f}" for s in splits if f"eval/{s}/t0/success" in start) + ".",
           "", "| eta | method | seeds | " + " | ".join(splits) + " | skip / weak / strong | judge = oracle |",
           "|" + "---|" * (len(splits) + 5)]
  for r in sorted(rows, key=lambda r: (r["eta"], r["label"])):
    cells = [f"{np.mean(r[f'{s}/success']):.3f} ± {np.std(r[f'{s}/success']):.3f}" if r[f"{s}/success"] else "–"
             for s in splits]
    mix = " / ".join(f"{r[f'judge/{label}_frac']:.2f}" for label in _LABELS) if "judge/skip_frac" in r else "–"
    agree = f"{r['judge/oracle_accuracy']:.3f}" if "judge/oracle_accuracy" in r else "–"
    lines.append(f"| {r['eta']:g} | {r['label']} | {r['seeds']} | " + " | ".join(cells) + f" | {mix} | {agree} |")
  if margins:
    lines += ["", "Success minus OPD's in the same sweep, paired by seed (mean ± std over the paired seeds):", "",
              "| eta | method | seeds paired | " + " | ".join(splits) + " |", "|" + "---|" * (len(splits) + 3)]
    for (eta, method), margin in sorted(margins.items()):
      paired = max(n for _, _, n in margin.values())
      lines.append(f"| {eta:g} | {method} | {paired} | " + " | ".join(
          f"{margin[s][0]:+.3f} ± {margin[s][1]:.3f}" if s in margin else "–" for s in splits) + " |")
  lines += ["", "![success against eta](success_vs_eta.png)", "![judge labels against eta](judge_labels_vs_eta.png)",
            ""]
  files.write_atomically(out / "control.md", "\n".join(lines))
  if results_dir is not None:
    _copy_results(root, out, pathlib.Path(results_dir), ("control.csv", "success_vs_eta.png",
                                                          "judge_labels_vs_eta.png"))
  return out
