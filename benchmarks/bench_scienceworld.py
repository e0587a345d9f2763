"""ScienceWorld: engine start, reset and step times, and the gold-path expert per task type.

Usage:
  python benchmarks/bench_scienceworld.py --split dev --variations 1

Plays the gold path (`gold_demonstration`) of the first `--variations` variations of
every task type in `--split` and reports wins, turns, invalid steps and times.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sage_opd_jax.envs import scienceworld as sw


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--split", default="dev", choices=sw.SPLITS)
  parser.add_argument("--variations", type=int, default=1)
  parser.add_argument("--task_types", default="", help="comma-separated; default: all")
  args = parser.parse_args()
  start = time.perf_counter()
  env = sw.ScienceWorldEnv(task_types=args.task_types.split(",") if args.task_types else None, max_turns=300)
  print(f"engine start: {time.perf_counter() - start:.2f} s")
  start = time.perf_counter()
  tasks = env.tasks(args.split)
  print(f"listing {len(tasks)} {args.split} tasks of {len({t.task_type for t in tasks})} types: "
        f"{time.perf_counter() - start:.2f} s")
  times, rows = [], []
  for task_type in sorted({t.task_type for t in tasks}):
    for variation in env.variations(task_type, args.split)[:args.variations]:
      task = env.make_task(task_type, variation, args.split)
      t0 = time.perf_counter()
      demo = sw.gold_demonstration(env, task)
      elapsed = time.perf_counter() - t0
      won, turns, invalid = demo.won, len(demo.actions), demo.valid.count(False)
      times.append((elapsed, turns))
      rows.append((task_type, variation, won, turns, invalid))
      print(f"{task_type:50s} var {variation:4d}: won={won} turns={turns} invalid={invalid}")
  env.close()
  wins = sum(r[2] for r in rows)
  print(f"gold path won {wins}/{len(rows)}; mean turns {statistics.mean(r[3] for r in rows):.1f}")
  per_turn = sum(t for t, _ in times) / sum(n for _, n in times)
  print(f"episode (load with gold path, reset, steps): median {statistics.median(t for t, _ in times):.2f} s, "
        f"max {max(t for t, _ in times):.2f} s; {per_turn * 1000:.0f} ms per turn overall")


if __name__ == "__main__":
  main()
