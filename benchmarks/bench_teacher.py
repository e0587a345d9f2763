"""Teacher scoring: the chunked LM head against one unchunked [B, S, V] head, side by side.

For a batch of B rows of S tokens and a V-token vocabulary, both variants run the same trunk
(`hidden_states`) and the same statistics; they differ only in how much of the head's output
exists at once. Reported per variant: XLA's temporary-buffer size for the compiled function
(its peak scratch memory, from `compiled.memory_analysis()`), the compile time, and the median
wall time of the scoring call (after one warm-up).

The unchunked variant is `teacher.score_tokens` with chunk_size = S (one chunk).

  python benchmarks/bench_teacher.py [--batch 8] [--seq 1024] [--vocab 32768] [--chunks 128,256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sage_opd_jax import models
from sage_opd_jax import teacher


def _measure(graphdef, state, tokens, mask, chunk_size: int, repeats: int) -> dict[str, float]:
  scorer = jax.jit(lambda st, t, m: teacher.score_tokens(graphdef, st, t, m, chunk_size=chunk_size))
  start = time.perf_counter()
  compiled = scorer.lower(state, tokens, mask).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp_mib = memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan")
  jax.block_until_ready(compiled(state, tokens, mask))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, tokens, mask))
    times.append(time.perf_counter() - start)
  return dict(temp_mib=temp_mib, compile_s=compile_s, run_s=statistics.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--chunks", default="128,256")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  config = models.ModelConfig.from_dict(dict(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_layers=args.layers,
      num_heads=4, num_kv_heads=2, head_dim=args.hidden // 4))
  graphdef, state = nnx.split(models.Transformer(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
  mask = jnp.ones((args.batch, args.seq), jnp.int32)
  full_logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
  print(f"device={jax.devices()[0].device_kind} B={args.batch} S={args.seq} V={args.vocab} "
        f"D={args.hidden} L={args.layers}; one [B,S,V] float32 logits array = {full_logits_mib:.0f} MiB")
  print(f"{'variant':>16} {'temp MiB':>10} {'compile s':>10} {'score s':>9} {'tok/s':>9}")
  for chunk in [args.seq] + [int(c) for c in args.chunks.split(",")]:
    r = _measure(graphdef, state, tokens, mask, chunk, args.repeats)
    name = "unchunked" if chunk == args.seq else f"chunk={chunk}"
    print(f"{name:>16} {r['temp_mib']:>10.0f} {r['compile_s']:>10.2f} {r['run_s']:>9.3f} "
          f"{args.batch * args.seq / r['run_s']:>9.0f}")


if __name__ == "__main__":
  main()
