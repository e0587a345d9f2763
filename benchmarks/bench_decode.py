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
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from sage_opd_jax import models, sampling  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = {
    # ~6M and ~27M parameters (tied embeddings, vocabulary 8192), Qwen3 layout.
    "6m": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
               num_kv_heads=2, head_dim=64),
    "27m": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                num_kv_heads=4, head_dim=64),
}
VOCAB = 8192


def _save_hf_qwen3(size: str, path: str) -> int:
  """Writes a random HF Qwen3 checkpoint with torch; returns its parameter count."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  dims = SIZES[size]
  config = transformers.Qwen3Config(
      vocab_size=VOCAB, hidden_size=dims["hidden_size"],
      intermediate_size=dims["intermediate_size"], num_hidden_layers=dims["num_layers"],
      num_attention_heads=dims["num_heads"], num_key_value_heads=dims["num_kv_heads"],
      head_dim=dims["head_dim"], tie_word_embeddings=True, max_position_embeddings=4096,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
      pad_token_id=0)
  model = transformers.Qwen3ForCausalLM(config).eval()
  model.save_pretrained(path, safe_serialization=True)
  return sum(p.numel() for p in model.parameters())


def _hf_generate(model, input_ids, new_tokens: int, do_sample: bool):
  import torch  # pylint: disable=g-import-not-at-top

  with torch.inference_mode():
    return model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=do_sample,
        temperature=1.0 if do_sample else None, top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None, eos_token_id=None, pad_token_id=0)


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, this process's CPU seconds) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def bench_decode(size: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as path:
    num_params = _save_hf_qwen3(size, path)
    hf_model = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = models.load_hf_checkpoint(path, dtype="float32")
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, VOCAB, size=(batch, prompt_len))
  input_ids = torch.as_tensor(prompts, dtype=torch.long)
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
      hf_t.append(_timed(hf_run))
      ours_t.append(_timed(lambda r=r: ours_run(r)))
    tokens = batch * new_tokens
    hf_cpu, ours_cpu = (statistics.median(t[1] for t in ts) for ts in (hf_t, ours_t))
    hf_wall, ours_wall = (statistics.median(t[0] for t in ts) for ts in (hf_t, ours_t))
    line = (f"| {size} | {mode} | {tokens / hf_cpu:6.0f} | {tokens / ours_cpu:6.0f} | "
            f"**{hf_cpu / ours_cpu:.2f}x** | {tokens / hf_wall:6.0f} | {tokens / ours_wall:6.0f} | "
            f"{hf_wall / ours_wall:.2f}x |")
    if temperature == 0.0:
      agree = np.mean(hf_out[:, prompt_len:].numpy() == ours_out.tokens)
      line += f" greedy tokens equal to HF's: {agree:.1%}"
    print(line, flush=True)


def _run_episode(model, batch, header, obs, resp, history_turns, reuse) -> list[float]:
  """Plays one episode of len(obs) turns; returns each turn's generate CPU seconds."""
  config = sampling.SamplingConfig(max_new_tokens=resp, temperature=0.0)
  episodes = sampling.EpisodeCache(model, batch, reuse=reuse)
  turns: list[list[list[int]]] = [[] for _ in range(batch)]
  times = []
  for t, obs_t in enumerate(obs):
    contexts = [sampling.windowed_context(header[e], turns[e] + [obs_t[e]], history_turns)
                for e in range(batch)]
    cpu = time.process_time()
    out = episodes.generate(contexts, jax.random.key(t), config)
    times.append(time.process_time() - cpu)
    for e in range(batch):
      turns[e].append(obs_t[e] + out.tokens[e, :out.lengths[e]].tolist())
  return times


def bench_turns(size: str, batch: int, header_len: int, obs_len: int, resp: int, num_turns: int,
                window: int) -> None:
  with tempfile.TemporaryDirectory() as path:
    num_params = _save_hf_qwen3(size, path)
    model = models.load_hf_checkpoint(path, dtype="float32")
  rng = np.random.default_rng(1)
  header = rng.integers(1, VOCAB, size=(batch, header_len)).tolist()
  obs = rng.integers(1, VOCAB, size=(num_turns, batch, obs_len)).tolist()
  print(f"\n## turns {size}: {num_params / 1e6:.1f}M params, batch {batch}, header "
        f"{header_len}, +{obs_len} obs and {resp} response tokens per turn, {num_turns} turns "
        f"(full context at the last turn: {header_len + num_turns * (obs_len + resp)} tokens)")
  for name, history_turns, reuse in (("reuse, full history", None, True),
                                     ("no reuse, full history", None, False),
                                     (f"reuse, window k={window}", window, True)):
    _run_episode(model, batch, header, obs, resp, history_turns, reuse)   # compile
    times = _run_episode(model, batch, header, obs, resp, history_turns, reuse)
    first, last = statistics.median(times[:3]), statistics.median(times[-3:])
    print(f"| {size} | {name} | {times[0]:.3f} | {times[-1]:.3f} | {times[-1] / times[0]:.2f} | "
          f"{last / first:.2f} |", flush=True)
    print("  per-turn CPU s: " + " ".join(f"{x:.2f}" for x in times), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("decode", "turns", "both"), default="both")
  parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES),
                      help="model sizes for the decode part")
  parser.add_argument("--turn-sizes", nargs="+", choices=tuple(SIZES), default=["6m"],
                      help="model sizes for the turns part")
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
  parser.add_argument("--window", type=int, default=3)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, torch threads {args.torch_threads}, "
        f"load average {os.getloadavg()[0]:.1f}")
  if args.part in ("decode", "both"):
    print("| size | mode | HF tok/CPU-s | ours tok/CPU-s | speed-up (CPU) | HF tok/wall-s | "
          "ours tok/wall-s | speed-up (wall) |")
    for size in args.sizes:
      bench_decode(size, args.batch, args.prompt_len, args.new_tokens, args.repeats)
  if args.part in ("turns", "both"):
    print("| size | mode | turn 1 CPU s | last turn CPU s | ratio | ratio of medians (last 3 / "
          "first 3) |")
    for size in args.turn_sizes:
      bench_turns(size, args.batch, args.header, args.obs, args.resp, args.turns, args.window)
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
