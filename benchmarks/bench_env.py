"""ALFWorld engine speed: resets and steps with and without the engine caches.

Everything is measured in one run, on the same games, side by side:

  shipped   `AlfworldEnv(grounding_cache=False, parse_memo=False)`: TextWorld as shipped.
  cold      both caches on, the grounding cache's folder empty (grounds, writes entries).
  cached    a new env on the now-filled folder: groundings come from disk.
  step      the games' walkthrough steps, shipped vs with the parse memo, and with
            `facts=True` (what the expert needs).

Each env gets one untimed warm-up reset on another game first (it loads fast_downward's
library, and fills the parse memo with the grammar's common snippets, as any long-lived
worker's would be).

  python benchmarks/bench_env.py --games 8 [--split valid_unseen] [--data_dir ...]

`--all_walkthroughs` instead plays every game's own walkthrough in the split through the
adapter (caches on) and reports how many win: a whole-split check of the adapter.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, Callable

from sage_opd_jax.envs.alfworld import AlfworldEnv
from sage_opd_jax.envs.base import Task


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - start, out


def _walkthrough_step_times(env: AlfworldEnv, task: Task) -> list[float]:
  _, info = env.reset(task)
  return [_timed(env.step, action)[0] for action in info.extra["walkthrough"]]


def play_all_walkthroughs(split: str, data_dir: str | None) -> None:
  env = AlfworldEnv(data_dir=data_dir)
  start, lost = time.perf_counter(), []
  tasks = env.tasks(split)
  for task in tasks:
    _, info = env.reset(task)
    results = [env.step(action) for action in info.extra["walkthrough"]]
    if not (results and results[-1].info.won):
      lost.append(task.task_id)
  won = len(tasks) - len(lost)
  print(f"{split}: {won}/{len(tasks)} walkthroughs won in {time.perf_counter() - start:.0f} s")
  for task_id in lost:
    print(f"  not won: {task_id}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--games", type=int, default=8, help="games to time (the split's first, seed 0)"
  )
  parser.add_argument("--split", default="valid_unseen")
  parser.add_argument("--data_dir", default=None, help="holds json_2.1.1/; default $ALFWORLD_DATA")
  parser.add_argument("--all_walkthroughs", action="store_true", help="see the module doc")
  args = parser.parse_args()
  if args.all_walkthroughs:
    play_all_walkthroughs(args.split, args.data_dir)
    return

  with tempfile.TemporaryDirectory() as cache_dir:
    shipped = AlfworldEnv(data_dir=args.data_dir, grounding_cache=False, parse_memo=False)
    cold = AlfworldEnv(data_dir=args.data_dir, cache_dir=cache_dir)
    tasks = shipped.tasks(args.split)[: args.games]
    warmup = shipped.tasks("valid_seen")[0]
    for env in (shipped, cold):
      env.reset(warmup)

    times: dict[str, list[float]] = {
      "shipped": [], "cold": [], "cached": [], "step_shipped": [], "step": [], "step_facts": [],
    }
    for task in tasks:
      times["shipped"].append(_timed(shipped.reset, task)[0])
      times["cold"].append(_timed(cold.reset, task)[0])

    cached = AlfworldEnv(data_dir=args.data_dir, cache_dir=cache_dir)
    with_facts = AlfworldEnv(data_dir=args.data_dir, cache_dir=cache_dir, facts=True)
    for env in (cached, with_facts):
      env.reset(warmup)
    for task in tasks:
      times["cached"].append(_timed(cached.reset, task)[0])
      times["step_shipped"] += _walkthrough_step_times(shipped, task)
      times["step"] += _walkthrough_step_times(cached, task)
      times["step_facts"] += _walkthrough_step_times(with_facts, task)
    if cached.cache.misses:
      raise RuntimeError(f"The cached env regrounded {cached.cache.misses} times: a cache miss.")

  print(f"{len(tasks)} {args.split} games, {len(times['step'])} walkthrough steps")
  print(f"{'what':<34}{'median s':>10}{'min s':>8}{'max s':>8}")
  for name, label in (
    ("shipped", "reset, shipped"),
    ("cold", "reset, caches on, cold"),
    ("cached", "reset, caches on, cached"),
    ("step_shipped", "step, shipped"),
    ("step", "step, parse memo"),
    ("step_facts", "step, parse memo, facts=True"),
  ):
    values = times[name]
    print(f"{label:<34}{statistics.median(values):>10.3f}{min(values):>8.3f}{max(values):>8.3f}")
  median = {name: statistics.median(values) for name, values in times.items()}
  print(f"cached reset speed-up: {median['shipped'] / median['cached']:.1f}x; "
        f"step speed-up: {median['step_shipped'] / median['step']:.1f}x")


if __name__ == "__main__":
  main()
