"""XLA's own per-device memory of the paper config's compiled programs, for abstract inputs: nothing is allocated.

Usage (from the repo root):
  # The paper config (configs/alfworld_paper.py) at Qwen3 shapes: the student update of each size and the
  # Qwen3-8B teacher's scoring, 40,960-token rows, on its mesh over 8 devices (fake CPU devices here):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_memory.py --paper --json mem.json
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_memory.py --paper --sizes 0.6b \\
      --teacher ''                                     # one student size, no teacher
  # One micro-batch's update on one device, the memory settings one at a time (0.6b, 1 x 4096):
  python benchmarks/bench_memory.py
  python benchmarks/bench_memory.py --size 27m --batch 8 --seq 256 --vocab 8192

No weights are made and no step runs: each program is lowered for ShapeDtypeStruct inputs with their
shardings and compiled for the default backend (`jax.jit(...).lower(...).compile()`), then
`memory_analysis()` reports one device's buffers. What decides whether a program fits a device is
arguments (its shard of params, Adam moments and batch) + temporaries (activations kept for the backward
pass, gradients, workspace); the update's outputs alias the donated state, the teacher's scores are
small. XLA:CPU assigns buffers differently from XLA:GPU or TPU, so treat the figures as estimates.

`--paper` builds everything from `configs/alfworld_paper.py` (its `train.max_seq_len`, `train.batch_episodes`
and `micro_batches`, its mesh with `fsdp=-1`, the student's `remat`, `attention_chunk`, `mlp_chunk`,
`scan_unroll` and `loss_chunk`, bf16 compute on float32 parameters, `optim`, the `sage_opd` loss over
`env.max_turns` turns; the teacher in bf16 with `teacher.score_chunk`), with the Qwen3 shapes of
`qwen3_reference.SIZES` in place of the checkpoints. The student update is `train.train`'s
(`update.make_loss_fns` + `make_update_fn` + `jit_update`) on a rollout batch's loss keys; the teacher's is
`teacher.make_scorer` over the whole rollout batch in `train.micro_batches` row groups, as
`train.DistillSource` scores it.

Without `--paper`: one device, the update of `bench_train.sft_update` (token cross-entropy, clipping,
AdamW), as configured (no remat, full attention), with `remat=True` (each block recomputed in the backward
pass), plus `attention_chunk` (queries in blocks: a B x N x chunk x S score buffer, not B x N x S x S), and
plus `student.loss_chunk` (`losses.chunked_token_logprobs`: the LM head over that many positions at a time,
not the row's whole [S, V] float32 logits).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import alfworld_paper  # pylint: disable=g-import-not-at-top,wrong-import-position
from qwen3_reference import SIZES  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import update as update_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax.models import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 2.0 ** 30
QWEN3_VOCAB = 151_936  # Qwen3's embedding rows; the tokenizer's ids end at 151,668.
QWEN3_TOKENS = 151_669
UNTIED = ("8b",)  # Qwen3-8B has its own output projection; the smaller Qwen3 models tie it to the embedding.
DEVICE_GB = {"H100": 80, "H200": 141}  # Memory per device of the cards the paper scale targets, in GB.

# The rollout batch's keys the sage_opd update reads (`update.loss_keys`): token-level [B, S], per turn [B, T].
_INT_TOKEN_KEYS = ("tokens", "attention_mask", "turn_ids", "positions", "segments", "reach")
_FLOAT_TOKEN_KEYS = ("behaviour_logprobs",) + teacher_lib.STAT_KEYS
_TURN_KEYS = {"labels": jnp.int32, "response_lengths": jnp.int32, "valid": jnp.bool_, "repeated": jnp.bool_,
              "intervened": jnp.bool_}


def memory_gib(compiled) -> dict[str, float]:
  """One device's argument, output, aliased and temporary buffers of a compiled program, in GiB."""
  stats = compiled.memory_analysis()
  return {"arguments": stats.argument_size_in_bytes / GIB, "outputs": stats.output_size_in_bytes / GIB,
          "aliased": stats.alias_size_in_bytes / GIB, "temporaries": stats.temp_size_in_bytes / GIB}


def compiled_memory(lowered_fn) -> dict[str, float]:
  """`memory_gib` of `lowered_fn()`'s compile, with the seconds lowering and compiling took."""
  start = time.perf_counter()
  compiled = lowered_fn().compile()
  return dict(memory_gib(compiled), compile_s=time.perf_counter() - start)


def qwen3_shape(section, size: str) -> None:
  """Sets `section.model` (a config's student or teacher) to Qwen3-`size`'s architecture; runtime fields stay."""
  section.model.update(vocab_size=QWEN3_VOCAB, tie_embeddings=size not in UNTIED, rope_theta=1_000_000.0,
                       max_position_embeddings=40_960, **SIZES[size])


def abstract_sharded(tree, shardings):
  """`tree`'s ShapeDtypeStruct leaves carrying the NamedShardings of `shardings` (same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def paper_student_update(config, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Compiled memory of `train.train`'s update for `config`'s student, on a full rollout batch."""
  model_config = models.ModelConfig.from_dict(config.student.model.to_dict())
  model = sharding.abstract_model(model_config)
  turns = config.env.max_turns
  tx = update_lib.make_optimizer(config.optim)
  state = jax.eval_shape(lambda: update_lib.init_train_state(model, tx, config.seed))
  loss_fn, totals_fn = update_lib.make_loss_fns(train.loss_options(config, config.method, turns),
                                                config.student.loss_chunk)
  update = update_lib.jit_update(
      update_lib.make_update_fn(nnx.graphdef(model), tx, loss_fn, totals_fn, micro_batches=config.train.micro_batches),
      sharding.state_shardings(state, mesh), sharding.batch_sharding(mesh))
  rows, seq = config.train.batch_episodes, config.train.max_seq_len
  batch = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32) for k in _INT_TOKEN_KEYS}
  batch.update({k: jax.ShapeDtypeStruct((rows, seq), jnp.float32) for k in _FLOAT_TOKEN_KEYS})
  batch.update({k: jax.ShapeDtypeStruct((rows, turns), dtype) for k, dtype in _TURN_KEYS.items()})
  return compiled_memory(lambda: update.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32)))


def paper_teacher_scoring(config, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Compiled memory of `teacher.make_scorer` for `config`'s teacher over a whole rollout batch."""
  model = sharding.abstract_model(models.ModelConfig.from_dict(config.teacher.model.to_dict()))
  graphdef, state = nnx.split(model)
  state = abstract_sharded(state, sharding.state_shardings(state, mesh))
  rows, seq = config.train.batch_episodes, config.train.max_seq_len
  row_sharding = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=row_sharding)
  packing = {k: tokens for k in teacher_lib.PACKING_KEYS}
  scorer = teacher_lib.make_scorer(graphdef, chunk_size=config.teacher.score_chunk, top_k=0,
                                   temperature=config.teacher.temperature,
                                   vocab_limit=QWEN3_TOKENS if config.sampling.mask_unused_ids else 0, mesh=mesh,
                                   micro_batches=config.train.micro_batches)
  return compiled_memory(lambda: scorer.lower(state, tokens, tokens, packing=packing))


def paper_config(size: str, teacher: str, seq: int):
  """`configs/alfworld_paper.py:<size>` with Qwen3 shapes in place of its checkpoints."""
  config = alfworld_paper.get_config(size)
  qwen3_shape(config.student, size)
  qwen3_shape(config.teacher, teacher or "8b")
  if seq:
    config.train.max_seq_len = seq
  return config


def fits(total_gib: float) -> str:
  """Which cards' memory holds `total_gib` per device (as GB: the cards' sizes are decimal)."""
  cards = [card for card, gb in DEVICE_GB.items() if total_gib * GIB <= gb * 1e9]
  return ", ".join(cards) if cards else "neither"


def run_paper(args) -> list[dict]:
  devices = jax.devices()
  if len(devices) < 8 and devices[0].platform == "cpu":
    raise ValueError(f"--paper compiles for the paper's 8-device mesh; jax sees {len(devices)} CPU device(s). "
                     "Run it with XLA_FLAGS=--xla_force_host_platform_device_count=8.")
  rows = []
  jobs = [("student update", size, size) for size in args.sizes.split(",") if size]
  if args.teacher:
    jobs.append(("teacher scoring", args.teacher, jobs[0][1] if jobs else "0.6b"))
  print("| program | model | arguments GiB | temporaries GiB | arguments + temporaries GiB | fits | compile s |")
  print("|---|---|---:|---:|---:|---|---:|", flush=True)
  for program, model, student in jobs:
    config = paper_config(student, args.teacher, args.seq)
    mesh = train.mesh_from_config(config.mesh)
    measure = paper_student_update if program == "student update" else paper_teacher_scoring
    m = measure(config, mesh)
    total = m["arguments"] + m["temporaries"]
    rows.append(dict(m, program=program, model=f"Qwen3-{model.upper()}", total=total, fits=fits(total),
                     mesh=dict(mesh.shape), seq=config.train.max_seq_len, rows=config.train.batch_episodes,
                     micro_batches=config.train.micro_batches, loss_chunk=config.student.loss_chunk,
                     score_chunk=config.teacher.score_chunk))
    print(f"| {program} | Qwen3-{model.upper()} | {m['arguments']:.2f} | {m['temporaries']:.2f} | {total:.2f} | "
          f"{fits(total)} | {m['compile_s']:.0f} |", flush=True)
  return rows


def run_variants(args) -> list[dict]:
  dims = SIZES[args.size]
  mesh = bench_train.one_device_mesh()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.size} layers, vocab {args.vocab}, "
        f"B {args.batch} x S {args.seq}, {args.dtype} compute, float32 params", flush=True)
  print("| variant | arguments GiB | temporaries GiB | arguments + temporaries GiB | compile s |")
  print("|---|---:|---:|---:|---:|")
  chunked = {"remat": True, "attention_chunk": args.attention_chunk}
  rows = []
  for name, overrides, loss_chunk in (
      ("as configured", {}, 0), ("remat", {"remat": True}, 0),
      (f"remat + attention_chunk {args.attention_chunk}", chunked, 0),
      (f"remat + attention_chunk {args.attention_chunk} + loss_chunk {args.loss_chunk}", chunked, args.loss_chunk)):
    model_config = models.ModelConfig(
        vocab_size=args.vocab, max_position_embeddings=max(args.seq, 4096), dtype=args.dtype,
        param_dtype="float32", **SIZES[args.size], **overrides)
    model = sharding.abstract_model(model_config)
    update, tx, _ = bench_train.sft_update(model, mesh, loss_chunk=loss_chunk)
    state = jax.eval_shape(lambda: update_lib.init_train_state(model, tx, seed=0))  # pylint: disable=cell-var-from-loop
    arrays = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
              for k in ("tokens", "attention_mask", "turn_ids")}
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    m = compiled_memory(lambda: update.lower(state, arrays, learning_rate))  # pylint: disable=cell-var-from-loop
    total = m["arguments"] + m["temporaries"]
    rows.append(dict(m, variant=name, total=total))
    print(f"| {name} | {m['arguments']:.2f} | {m['temporaries']:.2f} | {total:.2f} | {m['compile_s']:.0f} |",
          flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--paper", action="store_true",
                      help="the paper config's student updates and teacher scoring on its 8-device mesh")
  parser.add_argument("--sizes", default=",".join(alfworld_paper.STUDENT_SIZES),
                      help="--paper: student sizes, comma-separated (empty: none)")
  parser.add_argument("--teacher", default="8b", help="--paper: the teacher's size ('': no teacher scoring)")
  parser.add_argument("--seq", type=int, default=0,
                      help="tokens per row (0: the paper config's max_seq_len with --paper, else 4096)")
  parser.add_argument("--size", choices=tuple(SIZES), default="0.6b")
  parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB, help="Qwen3's vocabulary by default")
  parser.add_argument("--batch", type=int, default=1, help="rows per micro-batch on one device")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                      help="compute dtype; parameters stay float32 (the master copy)")
  parser.add_argument("--attention-chunk", type=int, default=1024)
  parser.add_argument("--loss-chunk", type=int, default=512)
  parser.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = parser.parse_args()
  if args.paper:
    print(f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices; "
          "configs/alfworld_paper.py at Qwen3 shapes", flush=True)
    rows = run_paper(args)
  else:
    args.seq = args.seq or 4096
    rows = run_variants(args)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
  main()
