"""Rollout: env time and model time against wall time, with and without the two-group pipeline.

One process, the same 8 ALFWorld games, the same key, side by side:

  sequential   `pipeline_groups=1`: generate for all 8 episodes, then step all 8 envs.
  pipelined    `pipeline_groups=2`: group A generates while group B's env steps run.
  env alone    the pipelined run's actions replayed through the same pool (resets included),
               lockstep, no model: the env time of the batch.
  model alone  the sequential run's time inside `generate` (env and model do not overlap there).

Target: pipelined wall <= 1.2 x max(env alone, model alone). Decoding is constrained to the
admissible actions, so that every step runs the engine (a random model's free text is never
parseable, and the env answers an unparseable turn without the engine). A warm-up run first
compiles every shape and fills the grounding cache, so resets are cached in every timed run.

  export ALFWORLD_DATA="$(../shared/alfworld/unpack)"   # or any folder holding json_2.1.1/ (alfworld-download)
  python benchmarks/bench_rollout.py --episodes 8 --workers 2 --turns 10
"""

from __future__ import annotations

import argparse
import os
import time

import jax
from flax import nnx
from transformers import AutoTokenizer

from sage_opd_jax import models, rollout, sampling, tokenization
from sage_opd_jax.envs import multi_env
from sage_opd_jax.envs.alfworld import AlfworldEnv, missing_data_message


def replay_env_time(engine: rollout.RolloutEngine, batch: rollout.RolloutBatch) -> float:
  """Wall seconds to reset and step the batch's episodes again, lockstep, without a model."""
  pool = engine.pool
  workers = pool.num_workers
  start = time.perf_counter()
  for t in range(-1, int(batch.num_turns.max())):
    per_worker: dict[int, list] = {}
    for e, episode in enumerate(batch.episodes):
      if t >= len(episode.turns):
        continue
      op, arg = ("reset", episode.task) if t < 0 else ("step", episode.turns[t].action)
      per_worker.setdefault(e % workers, []).append((e // workers, ("replay", e), op, arg))
    for w, requests in per_worker.items():
      pool.submit(w, "call", (multi_env.run_requests, dict(
          env_name=engine.env_name, env_kwargs=engine.env_kwargs, requests=requests)))
    pool.gather()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--episodes", type=int, default=8)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--turns", type=int, default=10)
  parser.add_argument("--history", type=int, default=2)
  parser.add_argument("--max_new_tokens", type=int, default=48)
  parser.add_argument("--split", default="valid_seen")
  parser.add_argument("--tokenizer_dir", default=os.path.expanduser("~/.cache/sage_opd_jax/bench_tokenizer"))
  args = parser.parse_args()

  data_dir = os.environ.get("ALFWORLD_DATA")
  if not data_dir:
    raise SystemExit(missing_data_message("nothing: ALFWORLD_DATA is unset"))
  tok = AutoTokenizer.from_pretrained(tokenization.build_alfworld_tokenizer(data_dir, args.tokenizer_dir))
  config = models.ModelConfig.from_dict(dict(
      arch="qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=False))
  model = models.Transformer(config, rngs=nnx.Rngs(0))
  env = AlfworldEnv(data_dir=data_dir)
  tasks = list(env.tasks(args.split)[: args.episodes])
  env.close()

  base_config = rollout.RolloutConfig(max_turns=args.turns, history_turns=args.history,
                                      constrained=True, progress=False)
  sampler = rollout.default_sampling_config(tok, args.max_new_tokens)
  rng = jax.random.key(0)
  with rollout.RolloutEngine(tok, base_config, sampler, env_name="alfworld",
                             env_kwargs={"data_dir": data_dir}, num_workers=args.workers,
                             timeout_s=120.0) as engine:
    runs = {}
    for name, groups in (("sequential", 1), ("pipelined", 2)):
      cfg = rollout.RolloutConfig(**{**base_config.__dict__, "pipeline_groups": groups})
      engine.run(model, tasks, rng, config=cfg)  # Warm-up: compiles, grounding cache.
      compiles = sampling.compile_count()
      runs[name] = engine.run(model, tasks, rng, config=cfg)
      if sampling.compile_count() != compiles:
        print(f"warning: the timed {name} run compiled {sampling.compile_count() - compiles} new shapes")
    env_alone = replay_env_time(engine, runs["pipelined"])

  model_alone = runs["sequential"].stats.model_s
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  print(f"{args.episodes} {args.split} games, {args.workers} env workers, <= {args.turns} turns, "
        f"k={args.history}, constrained, tiny random model ({num_params:,} params)")
  print(f"{'run':<12}{'wall s':>8}{'model s':>9}{'env wait s':>12}{'env busy s':>12}{'turns':>7}{'calls':>7}")
  for name, batch in runs.items():
    s = batch.stats
    print(f"{name:<12}{s.wall_s:>8.2f}{s.model_s:>9.2f}{s.env_wait_s:>12.2f}{s.env_busy_s:>12.2f}"
          f"{s.turns:>7}{s.generate_calls:>7}")
  print(f"env alone (replay of the pipelined run's actions): {env_alone:.2f} s")
  print(f"model alone (sequential run's generate time): {model_alone:.2f} s")
  bound = max(env_alone, model_alone)
  for name, batch in runs.items():
    print(f"{name}: wall / max(env, model) = {batch.stats.wall_s / bound:.2f} (target <= 1.2)")


if __name__ == "__main__":
  main()
