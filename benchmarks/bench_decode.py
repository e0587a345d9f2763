"""Decode throughput against HF transformers, and multi-turn turn cost with/without prefix reuse.

Usage (from the repo root):
  python benchmarks/bench_decode.py                      # both parts, both model sizes
  python benchmarks/bench_decode.py --part decode --sizes 6m --repeats 5

Part "decode": the same random Qwen3-shaped weights, saved by torch as an HF safetensors
checkpoint and loaded into ours with `load_hf_checkpoint`, generate `--new-tokens` tokens for
a batch of 16 prompts with HF's PyTorch `generate` and with `sampling.sample`, greedy and
sampled (T=1), no EOS, so both produce exactly B x N tokens. Runs alternate HF / ours so that
the machine's load hits both alike; medians are reported (compile time excluded: one warm-up).
Both run single-threaded, so process CPU time is the time an idle core would take: it is the
headline figure on a shared box where wall time swings 2-3x with the others' load.

Part "floor": what bounds the decode speed-up. Per decode step at batch B (CPU ms, median of
`--repeats` loops of 16 steps): the dense matmuls of one step alone (q/k/v/o, MLP, LM head;
the model's own weights), in XLA and in torch, and our whole bare step (`model(tok, cache=)`
then `sampling.greedy_token`, the KV cache at several lengths, half full). HF's own step time
is the decode part's B / (HF tok/CPU-s).

Part "turns": B episodes of `--turns` turns (a fixed header, then per turn `--obs` new
observation tokens and a `--resp`-token greedy response), timing each turn's `generate`:
  * reuse, full history: `EpisodeCache` appends only the new observation;
  * no reuse, full history: every turn re-encodes its whole context (`reuse=False`);
  * reuse, window k: history window of the last k turns (a slide re-encodes the window).
Each episode runs once untimed (to compile every shape) and once timed.

Threads: on the shared 2-core box (load average > 10 while others run tests) both frameworks
run fastest single-threaded (multi-threaded XLA was 2.5x and 2-thread torch 20x slower per
step there), so by default XLA runs single-threaded (XLA_FLAGS, unless already set) and torch
with `--torch-threads 1`.

On an NVIDIA GPU (JAX with CUDA): `--torch-device cuda --sizes 6m 27m 0.6b`; read the wall
columns (the host mostly waits there), and the turns part times turns in wall seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# Must precede the jax import (see the module docstring); an XLA_FLAGS already set wins.
os.environ.setdefault("XLA_FLAGS",
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from sage_opd_jax import models, sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from qwen3_reference import SIZES, VOCAB, save_hf_qwen3, timed, torch_device  # pylint: disable=g-import-not-at-top,wrong-import-position

def _hf_generate(model, input_ids, new_tokens: int, do_sample: bool):
  import torch  # pylint: disable=g-import-not-at-top

  with torch.inference_mode():
    return model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=do_sample,
        temperature=1.0 if do_sample else None, top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None, eos_token_id=None, pad_token_id=0)


def _hf_and_ours(size: str, device):
  """The same random weights as HF's torch model (on `device`) and as ours; and their count."""
  with tempfile.TemporaryDirectory() as path:
    hf_model = save_hf_qwen3(size, path).eval().to(device)
    ours = models.load_hf_checkpoint(path, dtype="float32")
  return hf_model, ours, sum(p.numel() for p in hf_model.parameters())


def bench_decode(size: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                 device) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  hf_model, ours, num_params = _hf_and_ours(size, device)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, VOCAB, size=(batch, prompt_len))
  input_ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
  print(f"\n## decode {size}: {num_params / 1e6:.1f}M params, batch {batch}, prompt "
        f"{prompt_len}, {new_tokens} new tokens, torch threads {torch.get_num_threads()}")

  for mode, temperature in (("greedy", 0.0), ("sampled T=1", 1.0)):
    config = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=temperature)

    def ours_run(seed):
      return sampling.sample(ours, prompts.tolist(), jax.random.key(seed), config)

    def hf_run():
      return _hf_generate(hf_model, input_ids, new_tokens, do_sample=temperature > 0)

    ours_out, hf_out = ours_run(0), hf_run()   # warm-up (and compile)
    hf_t, ours_t = [], []
    for r in range(repeats):
      hf_t.append(timed(hf_run))
      ours_t.append(timed(lambda r=r: ours_run(r)))
    tokens = batch * new_tokens
    hf_cpu, ours_cpu = (statistics.median(t[1] for t in ts) for ts in (hf_t, ours_t))
    hf_wall, ours_wall = (statistics.median(t[0] for t in ts) for ts in (hf_t, ours_t))
    line = (f"| {size} | {mode} | {tokens / hf_cpu:6.0f} | {tokens / ours_cpu:6.0f} | "
            f"**{hf_cpu / ours_cpu:.2f}x** | {tokens / hf_wall:6.0f} | {tokens / ours_wall:6.0f} | "
            f"{hf_wall / ours_wall:.2f}x |")
    if temperature == 0.0:
      agree = np.mean(hf_out[:, prompt_len:].cpu().numpy() == ours_out.tokens)
      line += f" greedy tokens equal to HF's: {agree:.1%}"
    print(line, flush=True)


_FLOOR_STEPS = 16


def _cpu_ms_per_step(fn, repeats: int) -> float:
  """Median CPU ms of one of `_FLOOR_STEPS` steps run by `fn` (after one warm-up call)."""
  fn()
  times = [timed(fn)[1] for _ in range(repeats)]
  return statistics.median(times) / _FLOOR_STEPS * 1e3


def _xla_matmul_step(model, batch: int):
  """A jitted loop of the dense matmuls of decode steps only (no attention, norms, sampling)."""
  layers = model.layers.unstacked()
  embed = model.embed[...]

  @jax.jit
  def run(x_BxD):
    def step(_, x_BxD):
      for p in layers:
        q_BxNxH = jnp.einsum("bd,dnh->bnh", x_BxD, p["q_proj"])
        kv_BxKxH = (jnp.einsum("bd,dkh->bkh", x_BxD, p["k_proj"])
                    + jnp.einsum("bd,dkh->bkh", x_BxD, p["v_proj"]))
        x_BxD = x_BxD + jnp.einsum("bnh,nhd->bd", q_BxNxH, p["o_proj"]) + kv_BxKxH.mean()
        hidden_BxF = (jax.nn.silu(x_BxD @ p["gate_proj"]) * (x_BxD @ p["up_proj"]))
        x_BxD = x_BxD + hidden_BxF @ p["down_proj"]
      logits_BxV = jnp.einsum("bd,vd->bv", x_BxD, embed)
      return x_BxD + 1e-6 * logits_BxV[:, :x_BxD.shape[1]]
    return jax.lax.fori_loop(0, _FLOOR_STEPS, step, x_BxD)

  x_BxD = jnp.ones((batch, model.config.hidden_size), jnp.float32) * 0.01
  return lambda: jax.block_until_ready(run(x_BxD))


def _torch_matmul_step(hf_model, batch: int):
  """The same dense matmuls with the HF model's torch weights (`F.linear`, as HF runs them)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  layers = hf_model.model.layers
  head = hf_model.lm_head.weight
  x0 = torch.full((batch, hf_model.config.hidden_size), 0.01, device=hf_model.device)

  def run():
    x = x0
    with torch.inference_mode():
      for _ in range(_FLOOR_STEPS):
        for layer in layers:
          a, m = layer.self_attn, layer.mlp
          q = F.linear(x, a.q_proj.weight)
          kv = F.linear(x, a.k_proj.weight) + F.linear(x, a.v_proj.weight)
          x = x + F.linear(q, a.o_proj.weight) + kv.mean()
          x = x + F.linear(F.silu(F.linear(x, m.gate_proj.weight)) * F.linear(
              x, m.up_proj.weight), m.down_proj.weight)
        x = x + 1e-6 * F.linear(x, head)[:, :x.shape[1]]
    return x

  return run


def _ours_bare_step(model, batch: int, cache_len: int):
  """A jitted loop of our greedy decode steps on a half-full cache of `cache_len` slots."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, cache, token_Bx1):
    model = nnx.merge(graphdef, state)
    layer_params = model.layers.unstacked()

    def step(_, carry):
      token_Bx1, cache = carry
      logits_Bx1xV, cache = model(token_Bx1, cache=cache, layer_params=layer_params)
      return sampling.greedy_token(logits_Bx1xV[:, 0])[:, None], cache

    return jax.lax.fori_loop(0, _FLOOR_STEPS, step, (token_Bx1, cache))

  cache = models.init_cache(model.config, batch, cache_len)
  cache = cache.replace(lengths=jnp.full((batch,), cache_len // 2, jnp.int32))
  token_Bx1 = jnp.ones((batch, 1), jnp.int32)
  return lambda: jax.block_until_ready(run(state, cache, token_Bx1))


def bench_floor(size: str, batch: int, cache_lens: list[int], repeats: int, device) -> None:
  hf_model, ours, _ = _hf_and_ours(size, device)
  xla_mm, torch_mm = _xla_matmul_step(ours, batch), _torch_matmul_step(hf_model, batch)
  steps = [_ours_bare_step(ours, batch, n) for n in cache_lens]
  # Alternate the measured functions, so that the others' load hits them alike.
  rounds = [[], []] + [[] for _ in cache_lens]
  for _ in range(repeats):
    for times, fn in zip(rounds, [xla_mm, torch_mm] + steps):
      times.append(_cpu_ms_per_step(fn, 1))
  med = [statistics.median(t) for t in rounds]
  print(f"| {size} | {med[0]:.2f} | {med[1]:.2f} | "
        + " | ".join(f"{m:.2f}" for m in med[2:]) + " |", flush=True)


def _turn_clock() -> float:
  # CPU seconds on the shared CPU box (see the docstring); on an accelerator the host mostly
  # waits, so wall seconds are the cost.
  return time.process_time() if jax.default_backend() == "cpu" else time.perf_counter()


def _run_episode(model, batch, header, obs, resp, history_turns, reuse) -> list[float]:
  """Plays one episode of len(obs) turns; returns each turn's `generate` seconds."""
  config = sampling.SamplingConfig(max_new_tokens=resp, temperature=0.0)
  episodes = sampling.EpisodeCache(model, batch, reuse=reuse)
  turns: list[list[list[int]]] = [[] for _ in range(batch)]
  times = []
  for t, obs_t in enumerate(obs):
    contexts = [sampling.windowed_context(header[e], turns[e] + [obs_t[e]], history_turns)
                for e in range(batch)]
    start = _turn_clock()
    out = episodes.generate(contexts, jax.random.key(t), config)
    times.append(_turn_clock() - start)
    for e in range(batch):
      turns[e].append(obs_t[e] + out.tokens[e, :out.lengths[e]].tolist())
  return times


def bench_turns(size: str, batch: int, header_len: int, obs_len: int, resp: int, num_turns: int,
                windows: list[int], no_reuse: bool) -> None:
  with tempfile.TemporaryDirectory() as path:
    num_params = sum(p.numel() for p in save_hf_qwen3(size, path).parameters())
    model = models.load_hf_checkpoint(path, dtype="float32")
  rng = np.random.default_rng(1)
  header = rng.integers(1, VOCAB, size=(batch, header_len)).tolist()
  obs = rng.integers(1, VOCAB, size=(num_turns, batch, obs_len)).tolist()
  print(f"\n## turns {size}: {num_params / 1e6:.1f}M params, batch {batch}, header "
        f"{header_len}, +{obs_len} obs and {resp} response tokens per turn, {num_turns} turns "
        f"(full context at the last turn: {header_len + num_turns * (obs_len + resp)} tokens)")
  modes = [("reuse, full history", None, True)]
  if no_reuse:
    modes.append(("no reuse, full history", None, False))
  modes += [(f"reuse, window k={k}", k, True) for k in windows]
  for name, history_turns, reuse in modes:
    _run_episode(model, batch, header, obs, resp, history_turns, reuse)   # compile
    times = _run_episode(model, batch, header, obs, resp, history_turns, reuse)
    first, last = statistics.median(times[:3]), statistics.median(times[-3:])
    print(f"| {size} | {name} | {times[0]:.3f} | {times[-1]:.3f} | {times[-1] / times[0]:.2f} | "
          f"{last / first:.2f} |", flush=True)
    print("  per-turn s: " + " ".join(f"{x:.2f}" for x in times), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("decode", "floor", "turns", "both"), default="both",
                      help="both = decode and turns; floor runs only when asked")
  parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=["6m", "27m"],
                      help="model sizes for the decode part")
  parser.add_argument("--turn-sizes", nargs="+", choices=tuple(SIZES), default=["6m"],
                      help="model sizes for the turns part")
  parser.add_argument("--torch-device", choices=("cpu", "cuda"), default="cpu",
                      help="HF's device; on an accelerator read the wall-time columns")
  parser.add_argument("--torch-threads", type=int, default=1,
                      help="HF's intra-op threads; 1 is fastest on a shared, oversubscribed box")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--turns", type=int, default=30)
  parser.add_argument("--header", type=int, default=48)
  parser.add_argument("--obs", type=int, default=24)
  parser.add_argument("--resp", type=int, default=24)
  parser.add_argument("--window", type=int, nargs="+", default=[2, 3],
                      help="history windows k for the turns part")
  parser.add_argument("--skip-no-reuse", action="store_true",
                      help="turns part: leave out the (slow) no-reuse baseline")
  parser.add_argument("--cache-lens", type=int, nargs="+", default=[128, 512, 2048],
                      help="cache slots of the bare decode steps in the floor part")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)
  device = torch_device(args.torch_device)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, torch threads {args.torch_threads}, "
        f"load average {os.getloadavg()[0]:.1f}")
  if args.part in ("decode", "both"):
    print("| size | mode | HF tok/CPU-s | ours tok/CPU-s | speed-up (CPU) | HF tok/wall-s | "
          "ours tok/wall-s | speed-up (wall) |")
    for size in args.sizes:
      bench_decode(size, args.batch, args.prompt_len, args.new_tokens, args.repeats, device)
  if args.part == "floor":
    print("| size | XLA matmuls ms/step | torch matmuls ms/step | "
          + " | ".join(f"ours step @{n} slots" for n in args.cache_lens) + " |")
    for size in args.sizes:
      bench_floor(size, args.batch, args.cache_lens, args.repeats, device)
  if args.part in ("turns", "both"):
    print("| size | mode | turn 1 s | last turn s | ratio | ratio of medians (last 3 / "
          "first 3) |")
    for size in args.turn_sizes:
      bench_turns(size, args.batch, args.header, args.obs, args.resp, args.turns, args.window,
                  not args.skip_no_reuse)
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
