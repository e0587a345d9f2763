"""Long-prompt work of the loop: the prompted judge's pre-fill and the teacher's scoring forward.

Both run a teacher over hundreds of tokens per row, where causal attention is most of the
cost on a CPU. Shapes are those of the ALFWorld CPU pipeline's teacher
(`configs/alfworld_cpu.py`: D 256, F 768, 4 layers, 4 / 2 heads of 64, its word-level
vocabulary of ~1.3k) with random weights, so the figures do not depend on a trained model:

  * judge: `--prompts` random prompts of `--min-len` to `--max-len` tokens (the judge's are
    ~450-650 on ALFWorld) answered greedily in 4 tokens, sent as `judge.ask_teacher` sends
    them: cut into calls by `judge.length_groups`, each one `sampling.sample`;
  * scoring: `teacher.score_batch` of B x S transcripts (the loss's teacher statistics).

One untimed call of each compiles every shape; then medians of `--repeats` wall times. To
compare two versions, run this file from each checkout in turn (it uses only those APIs):

  python benchmarks/bench_prefill.py [--prompts 128] [--score-batch 8] [--score-seq 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

from sage_opd_jax import judge
from sage_opd_jax import models
from sage_opd_jax import sampling
from sage_opd_jax import teacher

# configs/alfworld_cpu.py's teacher, with the vocabulary its tokenizer gave (1,294 words,
# rounded up to a multiple of 64).
TEACHER = dict(vocab_size=1344, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
               num_kv_heads=2, head_dim=64, max_position_embeddings=1024, scan_unroll=8)


def _median_wall(fn, repeats: int) -> float:
  fn()  # Compiles every shape.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prompts", type=int, default=128, help="judge prompts (one update's turns)")
  parser.add_argument("--min-len", type=int, default=450)
  parser.add_argument("--max-len", type=int, default=660)
  parser.add_argument("--score-batch", type=int, default=8)
  parser.add_argument("--score-seq", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  model = models.Transformer(models.ModelConfig(**TEACHER), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  lengths = rng.integers(args.min_len, args.max_len + 1, size=args.prompts)
  prompts = [rng.integers(3, TEACHER["vocab_size"], size=n).tolist() for n in lengths]
  groups = judge.length_groups(lengths.tolist())
  greedy = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0, eos_ids=(1,), pad_id=0)

  def ask():
    for call, group in enumerate(groups):
      sampling.sample(model, [prompts[i] for i in group], jax.random.key(call), greedy)

  tokens = rng.integers(3, TEACHER["vocab_size"], size=(args.score_batch, args.score_seq))
  mask = np.ones_like(tokens)
  mask[1::2, args.score_seq * 3 // 4:] = 0  # Half the rows right-padded, as transcripts are.

  def score():
    jax.block_until_ready(teacher.score_batch(model, tokens, mask, chunk_size=256))

  judge_s = _median_wall(ask, args.repeats)
  score_s = _median_wall(score, args.repeats)
  padded = sum(len(g) * sampling.bucket_length(int(lengths[g].max())) for g in groups)
  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
  print("| work | shape | wall s (median) | real tokens / s |")
  print("|---|---|---:|---:|")
  print(f"| judge pre-fill + 4 greedy tokens | {args.prompts} prompts of {lengths.min()}-{lengths.max()} "
        f"tokens in {len(groups)} calls ({padded} padded positions) | {judge_s:.2f} | "
        f"{lengths.sum() / judge_s:,.0f} |")
  print(f"| teacher scoring | {args.score_batch} x {args.score_seq} | {score_s:.2f} | "
        f"{mask.sum() / score_s:,.0f} |")


if __name__ == "__main__":
  main()
