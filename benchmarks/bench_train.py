"""Train-step throughput against HF PyTorch, fraction of the matmul peak, and SAGE-OPD vs OPD.

Usage (from the repo root):
  python benchmarks/bench_train.py                         # every part, default sizes
  python benchmarks/bench_train.py --part step --sizes 27m --repeats 5 --batch 8 --seq 256
  python benchmarks/bench_train.py --part step peak --sizes 27m --repeats 7 --micro-batches 2   # docs/benchmarks.md
  ALFWORLD_DATA=... python benchmarks/bench_train.py --part iteration --games alfworld
  python benchmarks/bench_train.py --part iteration --variants "sage_opd, transcript judge"

Part "step": one random Qwen3-shaped model per size, built by transformers
(`Qwen3ForCausalLM`, tied embeddings) and saved as an HF checkpoint, then loaded into ours
with `load_hf_checkpoint`, so both start from the same weights. Each framework takes full
optimiser steps on the same [B, S] batch with the same loss, token cross-entropy over the
response mask (our `sft` loss through `update.make_loss_fns`; in torch
`F.cross_entropy(logits[:, :-1], tokens[:, 1:])` weighted by the mask, summed / mask.sum()),
fp32, grad-norm clipping 1.0 then AdamW. Ours is `update.make_update_fn` under
`update.jit_update` (donated state) on a 1-device mesh, its layer scan unrolled by
`--scan-unroll` (as `configs/base.py`'s `tiny_model` does); torch runs with
`torch.set_num_threads(--torch-threads)`. Steps alternate torch / ours so the machine's load
hits both alike; the median of `--repeats` steps per framework is reported (one warm-up
step each first: compile time excluded). With `--micro-batches N` both accumulate the gradients
of N equal slices of the batch before the one optimiser step (ours: `make_update_fn(micro_batches=N)`,
`config.train.micro_batches`; torch: N forward/backward passes, each loss over the whole mask).

Part "peak": the measured fp32 matmul peak, a jitted `[M, M] @ [M, M]` in JAX and
`torch.matmul` (median of `--repeats`), and the step's model FLOP/s as a fraction of it:

  step FLOPs = 6 * (P_nonembed + D * V) * B * S  +  12 * L * N * H * B * S^2

P_nonembed are the parameters outside the embedding table; D * V is the (tied) LM head
matmul; the second term is the attention scores and values (QK^T and PV, forward 4 N H S^2
per row and layer, backward twice that) over the full S x S square, which is what both
implementations compute (a causal mask, not a causal skip). Elementwise work (norms, RoPE,
softmax, SwiGLU, the optimiser) is not counted.

Part "iteration": one SAGE-OPD iteration against one OPD iteration through the trainer's
own pieces: `train.DistillSource.batch` (rollout with the `RolloutEngine`, teacher scoring,
the judge for SAGE) and the jitted update, with random student and teacher of the given
sizes on the same tasks and seeds. `sampling.constrained=True` restricts actions to the
admissible ones: a random student's free text is never an admissible action, and every
invalid action is Strong by rule (E5) without asking the judge, so without it the judge would
not run. Iterations alternate OPD / SAGE-OPD after one untimed warm-up each (compiles).
"sage_opd, no admissible list" asks the same judge without the admissible-actions line
(`judge.show_admissible=False`, as configs/alfworld_cpu.py sets it). "sage_opd, transcript judge"
asks that question after the scored transcript instead (`judge.mode='transcript'`, also
without the list): one packed forward per batch instead of a prompt per turn.
With `--one-call-judge` a fourth variant runs the prompted judge as it was before length
bucketing (`judge.length_bucketing=False`: every judge prompt in one sampler call), for a
before/after comparison in the same run; both judges give the same answers.

On an NVIDIA GPU (JAX with CUDA): `--part step peak --torch-device cuda --sizes 27m 0.6b`; both
run fp32 with TF32 matmuls (XLA's default there, and torch's with `--torch-device cuda`), and
the peak is the TF32 matmul's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.nnx as nnx  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import update as update_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax.models import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, str(REPO / "benchmarks"))
from qwen3_reference import SIZES, VOCAB, save_hf_qwen3, timed, torch_device  # pylint: disable=g-import-not-at-top,wrong-import-position

FIXTURE_DATA = REPO / "tests" / "fixtures" / "alfworld"
ONE_CALL = "sage_opd, one-call judge (before)"
NO_LIST = "sage_opd, no admissible list"
TRANSCRIPT = "sage_opd, transcript judge"


def one_device_mesh() -> jax.sharding.Mesh:
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _optim_config():
  optim = base.get_config().optim
  optim.warmup_steps = 0  # A non-zero learning rate from the first step, as in torch.
  return optim


# ------------------------------------------------------------------------------------------
# Part "step" and "peak".
# ------------------------------------------------------------------------------------------


def step_flops(size: str, batch: int, seq: int) -> tuple[int, int, float]:
  """(all params, non-embedding params, model FLOPs of one train step); see the docstring."""
  d = SIZES[size]
  D, F, L, N, K, H = (d["hidden_size"], d["intermediate_size"], d["num_layers"], d["num_heads"],
                      d["num_kv_heads"], d["head_dim"])
  per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D + 2 * H
  non_embed = L * per_layer + D
  total = non_embed + VOCAB * D
  tokens = batch * seq
  flops = 6 * (non_embed + D * VOCAB) * tokens + 12 * L * N * H * batch * seq * seq
  return total, non_embed, float(flops)


def _sft_batch(batch: int, seq: int) -> dict[str, np.ndarray]:
  """Random tokens, no padding; the first quarter is the prompt, the rest is turn 1."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, VOCAB, size=(batch, seq)).astype(np.int32)
  turn_ids = np.zeros((batch, seq), np.int32)
  turn_ids[:, seq // 4:] = 1
  return {"tokens": tokens, "attention_mask": np.ones((batch, seq), np.int32), "turn_ids": turn_ids}


def sft_update(model: nnx.Module, mesh: jax.sharding.Mesh, micro_batches: int = 1, loss_chunk: int = 0):
  """`train`'s jitted update with the `sft` loss (token cross-entropy), clipping and AdamW, on a
  state replicated over `mesh`; returns it, its optimiser and the state's sharding. `loss_chunk`:
  `student.loss_chunk` (0: the whole logits)."""
  tx = update_lib.make_optimizer(_optim_config())
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated,
                                jax.eval_shape(lambda: update_lib.init_train_state(model, tx, seed=0)))
  config = base.get_config()
  config.teacher.model.vocab_size = model.config.vocab_size
  loss_fn, totals_fn = update_lib.make_loss_fns(train.loss_options(config, "sft", None), loss_chunk)
  update = update_lib.jit_update(
      update_lib.make_update_fn(nnx.graphdef(model), tx, loss_fn, totals_fn, micro_batches=micro_batches),
      state_sharding, sharding.batch_sharding(mesh))
  return update, tx, state_sharding


def _ours_step_fn(path: str, arrays: dict[str, np.ndarray], scan_unroll: int, micro_batches: int):
  """Our jitted update on a 1-device mesh; returns a no-argument step closure and the state."""
  mesh = one_device_mesh()
  model = models.load_hf_checkpoint(path, dtype="float32", mesh=mesh, scan_unroll=scan_unroll)
  update, tx, state_sharding = sft_update(model, mesh, micro_batches)
  state = jax.device_put(update_lib.init_train_state(model, tx, seed=0), state_sharding)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in arrays.items()}, sharding.batch_sharding(mesh))
  holder = {"state": state, "loss": None}
  learning_rate = np.float32(_optim_config().learning_rate)
  del model

  def step():
    holder["state"], metrics = update(holder["state"], batch, learning_rate)
    holder["loss"] = float(metrics["loss"])  # Blocks until the step is done.

  return step, holder


def _torch_step_fn(model, arrays: dict[str, np.ndarray], micro_batches: int):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  device = model.device

  optim = _optim_config()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=optim.eps,
                          weight_decay=optim.weight_decay, foreach=True)
  tokens = torch.as_tensor(arrays["tokens"], dtype=torch.long, device=device)
  attention_mask = torch.as_tensor(arrays["attention_mask"], dtype=torch.long, device=device)
  # Token s is trained when turn_ids[s] > 0; it is predicted by the logits at s - 1.
  mask = torch.as_tensor(arrays["turn_ids"][:, 1:] > 0, dtype=torch.float32, device=device)
  holder = {"loss": None}

  rows = tokens.shape[0] // micro_batches

  def step():
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    # Gradients accumulate over the micro-batches; each one's loss is over the whole batch's mask.
    for i in range(0, tokens.shape[0], rows):
      logits = model(input_ids=tokens[i:i + rows], attention_mask=attention_mask[i:i + rows]).logits
      nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[i:i + rows, 1:].reshape(-1),
                            reduction="none").view_as(mask[i:i + rows])
      micro_loss = (nll * mask[i:i + rows]).sum() / mask.sum()
      micro_loss.backward()
      loss += micro_loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    opt.step()
    holder["loss"] = float(loss)

  return step, holder


def bench_step(size: str, batch: int, seq: int, repeats: int, scan_unroll: int,
               device, micro_batches: int) -> dict[str, float]:
  """Prints one table row; returns the median wall and CPU seconds per step of both."""
  with tempfile.TemporaryDirectory() as path:
    torch_model = save_hf_qwen3(size, path).to(device)
    num_torch = sum(p.numel() for p in torch_model.parameters())
    arrays = _sft_batch(batch, seq)
    ours, ours_out = _ours_step_fn(path, arrays, scan_unroll, micro_batches)
  torch_step, torch_out = _torch_step_fn(torch_model, arrays, micro_batches)
  total, non_embed, flops = step_flops(size, batch, seq)
  if total != num_torch:
    raise ValueError(f"step_flops counts {total} params for {size}, torch has {num_torch}.")
  compile_s = timed(ours)[0]
  timed(torch_step)
  first = (ours_out["loss"], torch_out["loss"])
  ours_t, torch_t = [], []
  for _ in range(repeats):
    torch_t.append(timed(torch_step))
    ours_t.append(timed(ours))
  tokens = batch * seq
  ours_wall, torch_wall = (statistics.median(t[0] for t in ts) for ts in (ours_t, torch_t))
  ours_cpu, torch_cpu = (statistics.median(t[1] for t in ts) for ts in (ours_t, torch_t))
  shape = f"{batch}x{seq}" + (f" in {micro_batches}" if micro_batches > 1 else "")
  print(f"| {size} | {total / 1e6:.2f}M ({non_embed / 1e6:.2f}M non-emb) | {shape} | "
        f"{tokens / torch_wall:7.0f} | {tokens / ours_wall:7.0f} | **{torch_wall / ours_wall:.2f}x** | "
        f"{torch_wall:.3f} | {ours_wall:.3f} | {torch_cpu:.2f} | {ours_cpu:.2f} | {flops / 1e9:.1f} | "
        f"{compile_s:.1f} | {min(t[0] for t in torch_t) / min(t[0] for t in ours_t):.2f}x | "
        f"{torch_cpu / ours_cpu:.2f}x |", flush=True)
  print(f"  first-step loss ours {first[0]:.4f} torch {first[1]:.4f} (same weights and batch); "
        f"per-step wall s ours {[round(t[0], 3) for t in ours_t]} torch "
        f"{[round(t[0], 3) for t in torch_t]}", flush=True)
  return {"ours_wall": ours_wall, "ours_cpu": ours_cpu, "torch_wall": torch_wall, "torch_cpu": torch_cpu}


def matmul_peak(m: int, repeats: int, device) -> dict[str, float]:
  """Median fp32 FLOP/s of JAX (jitted) and torch [m, m] @ [m, m]: per wall and per CPU second."""
  import torch  # pylint: disable=g-import-not-at-top

  a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (m, m), jnp.float32)
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  ta, tb = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
  torch.matmul(ta, tb)
  jax_t, torch_t = [], []
  for _ in range(repeats):
    jax_t.append(timed(lambda: mm(a, b).block_until_ready()))
    torch_t.append(timed(lambda: torch.matmul(ta, tb)))
  flops = 2.0 * m ** 3
  return {"jax_wall": flops / statistics.median(t[0] for t in jax_t),
          "jax_cpu": flops / statistics.median(t[1] for t in jax_t),
          "torch_wall": flops / statistics.median(t[0] for t in torch_t),
          "torch_cpu": flops / statistics.median(t[1] for t in torch_t)}


# ------------------------------------------------------------------------------------------
# Part "iteration".
# ------------------------------------------------------------------------------------------


def _iteration_config(method: str, judge_mode: str, tokenizer_dir: str, data_dir: str, split: str, args):
  from sage_opd_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  config = base.get_config()
  config.stage = "distill"
  config.method = method
  config.tokenizer_dir = tokenizer_dir
  vocab = -(-len(models.load_tokenizer(tokenizer_dir)) // 64) * 64
  config.student.model = base.tiny_model(vocab_size=vocab, **SIZES[args.student])
  config.teacher.model = base.tiny_model(vocab_size=vocab, **SIZES[args.teacher])
  config.env.data_dir = data_dir
  config.env.train_split = split
  config.env.max_turns = args.max_turns
  config.env.history_turns = 2
  config.env.num_workers = 2
  config.judge.mode = judge_mode
  config.sampling.constrained = True
  config.sampling.max_new_tokens = args.max_new_tokens
  config.train.batch_episodes = args.episodes
  config.train.max_seq_len = args.max_seq_len
  config.eval.num_episodes = 0
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  return config_lib.validate(config)


def bench_iteration(args) -> None:
  from sage_opd_jax import tokenization  # pylint: disable=g-import-not-at-top
  from sage_opd_jax.envs import alfworld  # pylint: disable=g-import-not-at-top
  from sage_opd_jax.envs import base as env_base  # pylint: disable=g-import-not-at-top

  if args.games == "fixture":
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    import make_alfworld_fixture  # pylint: disable=g-import-not-at-top

    make_alfworld_fixture.write_games()
    data_dir, split = str(FIXTURE_DATA), "valid_seen"
  else:
    data_dir, split = os.environ.get("ALFWORLD_DATA", ""), "train"
    if not data_dir:
      raise ValueError(f"--games=alfworld: {alfworld.missing_data_message('nothing: ALFWORLD_DATA is unset')}")
  with tempfile.TemporaryDirectory() as tokenizer_dir:
    tokenization.build_alfworld_tokenizer(data_dir, tokenizer_dir)
    # name -> (method, judge mode): the prompted judge of docs/method.md, and the likelihood judge
    # that reads the teacher's scores already computed for the loss (no extra teacher call).
    variants = {"opd": ("opd", "prompt"), "sage_opd": ("sage_opd", "prompt"),
                NO_LIST: ("sage_opd", "prompt"), TRANSCRIPT: ("sage_opd", "transcript"),
                "sage_opd likelihood judge": ("sage_opd", "likelihood")}
    if args.one_call_judge:
      variants[ONE_CALL] = ("sage_opd", "prompt")
    if args.variants:
      unknown = sorted(set(args.variants) - set(variants))
      if unknown:
        raise ValueError(f"--variants {unknown}: not among {sorted(variants)}.")
      variants = {name: variants[name] for name in ["opd", *args.variants] if name in variants}
    configs = {name: _iteration_config(method, mode, tokenizer_dir, data_dir, split, args)
               for name, (method, mode) in variants.items()}
    config = configs["opd"]
    tokenizer = models.load_tokenizer(tokenizer_dir)
    mesh = train.mesh_from_config(config.mesh)
    student = train.load_model(config.student, mesh, config.seed)
    teacher = train.load_model(config.teacher, mesh, config.seed + 1)
    env = env_base.make(config.env.name, **train.env_kwargs(config))
    tasks = list(env.tasks(split))
    env.close()
    if len(tasks) < args.episodes:
      # The fixture split has 2 games: repeat them so that the batch is full.
      tasks = (tasks * -(-args.episodes // len(tasks)))[: args.episodes]
    tx = update_lib.make_optimizer(config.optim)
    learning_rate = update_lib.learning_rates(config.optim, config.train.num_steps)[0]
    graphdef = nnx.graphdef(student)
    state, state_sharding = update_lib.place_state(update_lib.init_train_state(student, tx, config.seed), mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    engine = train.make_rollout_engine(config, tokenizer)
    try:
      sources, updates = {}, {}
      for name, cfg in configs.items():
        sources[name] = train.DistillSource(cfg, tokenizer, teacher, engine, tasks, batch_sharding)
        if name == ONE_CALL:
          sources[name].judge_config = dataclasses.replace(sources[name].judge_config, length_bucketing=False)
        if name in (NO_LIST, TRANSCRIPT):
          sources[name].judge_config = dataclasses.replace(sources[name].judge_config, show_admissible=False)
        loss_fn, totals_fn = update_lib.make_loss_fns(train.loss_options(cfg, cfg.method, cfg.env.max_turns))
        updates[name] = update_lib.jit_update(
            update_lib.make_update_fn(graphdef, tx, loss_fn, totals_fn, micro_batches=1),
            state_sharding, batch_sharding)
      rows: dict[str, list[dict[str, float]]] = {m: [] for m in configs}
      for it in range(args.iterations + 1):
        for name in configs:
          # Every variant plays the same tasks with the same student weights and keys.
          start = time.perf_counter()
          arrays, metrics, _ = sources[name].batch(0, nnx.merge(graphdef, state.params))
          update_start = time.perf_counter()
          new_state, train_metrics = updates[name](
              jax.tree.map(jnp.copy, state), {k: arrays[k] for k in update_lib.loss_keys(arrays)}, learning_rate)
          jax.block_until_ready(train_metrics)
          del new_state
          end = time.perf_counter()
          row = {k[len("time/"):]: v for k, v in metrics.items() if k.startswith("time/")}
          row.update(update=end - update_start, total=end - start,
                     turns=float(arrays["valid"].shape[1]), load=os.getloadavg()[0],
                     judge_prompts=float(metrics.get("judge/num_prompts", 0.0)))
          row.update({k: v for k, v in metrics.items() if k.startswith("judge/")})
          if it > 0:
            rows[name].append(row)
          print(f"  iteration {it} {name}: " + ", ".join(
              f"{k} {v:.2f}" for k, v in row.items() if not k.startswith("judge/")), flush=True)
    finally:
      engine.close()
  print("| method | rollout s | teacher s | judge s | update s | total s | / OPD | load (1 min) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  medians = {}
  for name, name_rows in rows.items():
    med = {k: statistics.median(r.get(k, 0.0) for r in name_rows)
           for k in ("rollout", "teacher", "judge", "update", "total", "load")}
    medians[name] = med
    print(f"| {name} | {med['rollout']:.2f} | {med['teacher']:.2f} | {med['judge']:.2f} | "
          f"{med['update']:.2f} | {med['total']:.2f} | {med['total'] / medians['opd']['total']:.2f}x | "
          f"{med['load']:.1f} |")
  for name in [n for n in rows if n != "opd"]:
    print(f"{name} / opd iteration: **{medians[name]['total'] / medians['opd']['total']:.2f}x** "
          f"(medians of {args.iterations})")
    print("  last judge metrics: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[name][-1].items()
                                               if k.startswith("judge/")))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", nargs="+", choices=("step", "peak", "iteration"),
                      default=["step", "peak", "iteration"])
  parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=["6m", "27m"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--micro-batches", type=int, default=1,
                      help="step part: both frameworks accumulate gradients over this many micro-batches")
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--torch-device", choices=("cpu", "cuda"), default="cpu",
                      help="torch's device for the step and peak parts")
  parser.add_argument("--scan-unroll", type=int, default=8,
                      help="step part: our ModelConfig.scan_unroll (8 unrolls both sizes fully)")
  parser.add_argument("--matmul", type=int, default=2048, help="M of the [M, M] @ [M, M] peak matmul")
  parser.add_argument("--games", choices=("fixture", "alfworld"), default="fixture",
                      help="iteration part: the test fixture's games or ALFWorld's train split")
  parser.add_argument("--student", choices=tuple(SIZES), default="6m")
  parser.add_argument("--teacher", choices=tuple(SIZES), default="27m")
  parser.add_argument("--episodes", type=int, default=4)
  parser.add_argument("--max-turns", type=int, default=6)
  parser.add_argument("--max-new-tokens", type=int, default=24)
  parser.add_argument("--max-seq-len", type=int, default=1024)
  parser.add_argument("--iterations", type=int, default=3)
  parser.add_argument("--one-call-judge", action="store_true",
                      help="iteration part: also run the prompted judge in one sampler call (before bucketing)")
  parser.add_argument("--variants", nargs="+", default=None,
                      help="iteration part: only these variants by name (OPD always runs, as the baseline)")
  args = parser.parse_args()
  if args.micro_batches < 1 or args.batch % args.micro_batches:
    parser.error(f"--micro-batches {args.micro_batches} must be >= 1 and divide --batch {args.batch}")
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.torch_threads)
  device = torch_device(args.torch_device)
  load_start = os.getloadavg()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, torch {torch.__version__} threads "
        f"{torch.get_num_threads()}, load average at start {load_start}", flush=True)
  steps = {}
  if "step" in args.part:
    print("| size | params | B x S | torch tok/s | ours tok/s | ours / torch | torch s/step | "
          "ours s/step | torch CPU s | ours CPU s | GFLOP/step | compile s | min-step ratio | CPU-s ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
      steps[size] = bench_step(size, args.batch, args.seq, args.repeats, args.scan_unroll, device,
                               args.micro_batches)
  if "peak" in args.part:
    peak = matmul_peak(args.matmul, args.repeats, device)
    print(f"matmul peak fp32 [{args.matmul}]^2 @ [{args.matmul}]^2: JAX {peak['jax_wall'] / 1e9:.1f} "
          f"GFLOP/wall-s ({peak['jax_cpu'] / 1e9:.1f} per CPU-s), torch {peak['torch_wall'] / 1e9:.1f} "
          f"GFLOP/wall-s ({peak['torch_cpu'] / 1e9:.1f} per CPU-s)", flush=True)
    print("| size | ours GFLOP/s | ours / JAX peak (wall) | ours / JAX peak (CPU) | torch GFLOP/s | "
          "torch / torch peak (wall) | torch / torch peak (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size, t in steps.items():
      flops = step_flops(size, args.batch, args.seq)[2]
      print(f"| {size} | {flops / t['ours_wall'] / 1e9:.1f} | **{flops / t['ours_wall'] / peak['jax_wall']:.0%}** | "
            f"{flops / t['ours_cpu'] / peak['jax_cpu']:.0%} | {flops / t['torch_wall'] / 1e9:.1f} | "
            f"{flops / t['torch_wall'] / peak['torch_wall']:.0%} | {flops / t['torch_cpu'] / peak['torch_cpu']:.0%} |",
            flush=True)
  if "iteration" in args.part:
    bench_iteration(args)
  print(f"load average at start {load_start}, at the end {os.getloadavg()}")


if __name__ == "__main__":
  main()
