"""XLA's own memory estimate of one train step, compiled for abstract inputs on this machine.

Usage (from the repo root):
  python benchmarks/bench_memory.py                                  # 0.6b, 1 x 4096, 3 variants
  python benchmarks/bench_memory.py --size 27m --batch 8 --seq 256 --vocab 8192

No weights are made and no step runs: the update of `update.make_update_fn` (token
cross-entropy, clipping, AdamW) is lowered for ShapeDtypeStruct inputs and compiled for one
device of the default backend, then `memory_analysis()` reports its buffers. The figure that
decides whether a step fits is arguments (params, Adam moments, batch) + temporaries (the
activations kept for the backward pass, gradients, workspace); outputs alias the donated
state. On this CPU box it answers "would the paper-scale student's micro-batch fit" before a
TPU or GPU is at hand. Other backends assign buffers differently, so treat it as an estimate.

Variants: the model as configured (`remat` off, full attention), with `remat=True`
(each block recomputed in the backward pass), and with `remat` plus `attention_chunk`
(queries in blocks, so the score buffer is B x N x chunk x S, not B x N x S x S).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position
from qwen3_reference import SIZES  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import update as update_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax.models import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 2.0 ** 30


def step_memory(model_config: models.ModelConfig, batch: int, seq: int) -> dict[str, float]:
  """GiB of the compiled update's argument, output and temporary buffers, and compile seconds."""
  mesh = bench_train.one_device_mesh()
  model = sharding.abstract_model(model_config)
  update, tx, _ = bench_train.sft_update(model, mesh)
  state = jax.eval_shape(lambda: update_lib.init_train_state(model, tx, seed=0))
  arrays = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32)
            for k in ("tokens", "attention_mask", "turn_ids")}
  start = time.perf_counter()
  stats = update.lower(state, arrays).compile().memory_analysis()
  seconds = time.perf_counter() - start
  return {"arguments": stats.argument_size_in_bytes / GIB, "outputs": stats.output_size_in_bytes / GIB,
          "aliased": stats.alias_size_in_bytes / GIB, "temporaries": stats.temp_size_in_bytes / GIB,
          "compile_s": seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=tuple(SIZES), default="0.6b")
  parser.add_argument("--vocab", type=int, default=151_936, help="Qwen3's vocabulary by default")
  parser.add_argument("--batch", type=int, default=1, help="rows per micro-batch on one device")
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                      help="compute dtype; parameters stay float32 (the master copy)")
  parser.add_argument("--attention-chunk", type=int, default=1024)
  args = parser.parse_args()
  dims = SIZES[args.size]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.size} layers, vocab "
        f"{args.vocab}, B {args.batch} x S {args.seq}, {args.dtype} compute, float32 params",
        flush=True)
  print("| variant | arguments GiB | temporaries GiB | arguments + temporaries GiB | compile s |")
  print("|---|---:|---:|---:|---:|")
  for name, overrides in (("as configured", {}), ("remat", {"remat": True}),
                          (f"remat + attention_chunk {args.attention_chunk}",
                           {"remat": True, "attention_chunk": args.attention_chunk})):
    model_config = models.ModelConfig(
        vocab_size=args.vocab, hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"], num_layers=dims["num_layers"],
        num_heads=dims["num_heads"], num_kv_heads=dims["num_kv_heads"], head_dim=dims["head_dim"],
        max_position_embeddings=max(args.seq, 4096), dtype=args.dtype, param_dtype="float32",
        **overrides)
    m = step_memory(model_config, args.batch, args.seq)
    print(f"| {name} | {m['arguments']:.2f} | {m['temporaries']:.2f} | "
          f"{m['arguments'] + m['temporaries']:.2f} | {m['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
