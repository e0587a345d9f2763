"""Results of a pipeline workdir: the table (markdown + CSV), the plots, the judge's accuracy."""

from __future__ import annotations

import csv
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

from sage_opd_jax import judge as judge_lib  # noqa: E402
from sage_opd_jax import models  # noqa: E402
from sage_opd_jax import sft_data  # noqa: E402
from sage_opd_jax import writers  # noqa: E402
from sage_opd_jax.envs import demos as demos_lib  # noqa: E402

# The columns of the table, per split: (metric key suffix, header).
COLUMNS = (("success", "success"), ("invalid_rate", "invalid"), ("repeated_rate", "repeated"),
           ("mean_turns", "turns"))


def padded_vocab_size(tokenizer_dir: str, multiple: int = 64) -> int:
  """The tokenizer's size rounded up, so the embedding shards evenly over a mesh."""
  size = len(models.load_tokenizer(tokenizer_dir))
  return -(-size // multiple) * multiple


def judge_accuracy_stage(config: ml_collections.ConfigDict, demos_dir: pathlib.Path, workdir: pathlib.Path
                         ) -> dict[str, float]:
  """The (SFT'd) teacher's judge accuracy on the judge examples of held-out games."""
  tokenizer = models.load_tokenizer(config.tokenizer_dir)
  teacher = models.load_hf_checkpoint(config.student.hf_dir)
  examples = [sft_data.JudgeExample.from_demo(ex)
              for ex in demos_lib.load_judge_examples(demos_dir, config.judge.history_turns)]
  metrics = judge_lib.judge_accuracy(teacher, tokenizer, examples, jax.random.PRNGKey(config.seed),
                                     history_turns=config.judge.history_turns,
                                     max_new_tokens=config.judge.max_new_tokens)
  writer = writers.MetricWriter(workdir)
  writer.write(0, metrics)
  writer.close()
  return metrics


def _final_eval(run_dir: pathlib.Path) -> dict[str, float]:
  """The last row holding eval metrics of a run's metrics.jsonl."""
  rows = [r for r in writers.read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]
  if not rows:
    raise ValueError(f"{run_dir}/metrics.jsonl has no eval rows: the run has not been evaluated.")
  return {k: v for k, v in rows[-1].items() if isinstance(v, float)}


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


def _plot(runs: dict[str, list[pathlib.Path]], key: str, ylabel: str, path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, dirs in runs.items():
    curves = [_curve(d, key) for d in dirs]
    curves = [c for c in curves if c[0]]
    if not curves:
      continue
    steps = curves[0][0]
    values = np.asarray([c[1][: len(steps)] for c in curves if len(c[1]) >= len(steps)])
    ax.plot(steps, values.mean(0), marker="o", label=method)
  ax.set_xlabel("updates")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
                          ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def write_results(root: pathlib.Path, config: ml_collections.ConfigDict, *, wall_s: float) -> pathlib.Path:
  """Writes `root/results/{results.md, results.csv, *.png}` and prints the table."""
  out = root / "results"
  out.mkdir(parents=True, exist_ok=True)
  splits = list(config.env.eval_splits)
  runs = collect_runs(root)
  rows = table_rows(runs, splits)
  with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
    fields = ["method", "seeds"] + [f"{s}/{c}_{stat}" for s in splits for c, _ in COLUMNS for stat in ("mean", "std")]
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for row in rows:
      flat = {"method": row["method"], "seeds": row["seeds"]}
      for s in splits:
        for c, _ in COLUMNS:
          if f"{s}/{c}" in row:
            flat[f"{s}/{c}_mean"], flat[f"{s}/{c}_std"] = row[f"{s}/{c}"]
      w.writerow(flat)
  _plot(runs, "eval/valid_unseen/t0/success", "valid_unseen success (greedy)", out / "valid_unseen_success.png")
  _plot(runs, "judge/strong_frac", "Strong fraction of judged turns", out / "judge_label_mix.png")

  teacher = {}
  teacher_eval = root / "teacher_eval"
  if (teacher_eval / "metrics.jsonl").exists():
    for row in writers.read_metrics(teacher_eval):
      teacher.update({k: v for k, v in row.items() if k != "step"})
  lines = [
      "# Results", "",
      f"Command: `python -m sage_opd_jax.main {' '.join(sys.argv[1:])}`  ",
      f"Commit: `{_commit()}`; wall time {wall_s / 60:.1f} min; decoding "
      f"{'constrained to admissible actions' if config.sampling.constrained else 'free (the paper’s)'}.", "",
      "Success rate, invalid- and repeated-action rates and mean turns (greedy eval), mean ± std over seeds:", "",
      markdown_table(rows, splits), "",
      "Teacher (SFT on acting and judging):", "",
      "| split | success | invalid | repeated |", "|---|---|---|---|",
  ]
  for split in splits:
    prefix = f"eval/{split}/t0/"
    if prefix + "success" in teacher:
      lines.append(f"| {split} | {teacher[prefix + 'success']:.3f} | {teacher[prefix + 'invalid_rate']:.3f} | "
                   f"{teacher[prefix + 'repeated_rate']:.3f} |")
  if "judge_eval/accuracy" in teacher:
    lines += ["", f"Judge accuracy on held-out games' judge examples: {teacher['judge_eval/accuracy']:.3f} "
              f"({int(teacher['judge_eval/count'])} examples)."]
  lines += ["", "![valid_unseen success](valid_unseen_success.png)", "![judge label mix](judge_label_mix.png)", ""]
  (out / "results.md").write_text("\n".join(lines), encoding="utf-8")
  print(markdown_table(rows, splits))
  return out
