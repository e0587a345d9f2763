r"""Accelerator rehearsal: the paper config's distill loop at Qwen3 shapes, offline, on one GPU or TPU.

OPD, then SAGE-OPD, a few updates each of `configs/alfworld_paper.py` with a random Qwen3-0.6B-shaped
student and a random Qwen3-1.7B-shaped teacher (Qwen3's real tokenizer, real ALFWorld train games,
constrained decoding so that random weights still play admissible actions and the judge is asked),
then a decode benchmark at batch 64. It prints, and writes to OUT/rehearsal.json:
peak device memory, rollout decode tokens/s, teacher scoring tokens/s, the update's step time and
MFU, the SAGE-OPD/OPD iteration ratio, and decode's share of the memory-bandwidth roofline (bytes
of weights and KV cache a decode step reads / the card's bandwidth, against the measured step).
Rates and the ratio leave out the seconds XLA spends compiling (or loading) programs during a step
(`jax.monitoring`'s backend-compile events): a step that meets a new bucketed shape compiles it once.
About 8 minutes on one H100 or H200 (estimate: it has not run on one yet; docs/benchmarks.md).

1. Prepare, on a machine with the network and the ALFWorld games (ALFWORLD_DATA set); everything a
   bare accelerator machine lacks lands in ASSETS, which travels with the working tree:

     python benchmarks/accelerator_rehearsal.py --prepare --assets workdirs/rehearsal_assets

   (64 train games, Qwen3's tokenizer built offline, the ALFWorld word-level tokenizer for --tiny,
   the wheels of alfworld, textworld, ml_collections and their pure-Python dependencies, and
   TextWorld's compiled PDDL planner; about 35 MB. With `run`, carry workdirs/rehearsal_assets.)
2. On the accelerator (no network), from the repository root:

     pip install --no-index --find-links workdirs/rehearsal_assets/wheels \
         -r workdirs/rehearsal_assets/wheels/requirements.txt
     PYTHONPATH=$PWD:$PWD/workdirs/rehearsal_assets/site python benchmarks/accelerator_rehearsal.py \
         --assets workdirs/rehearsal_assets --out workdirs/rehearsal

   JAX there must import with this repository's flax (pip install -e ".[cuda]" or ".[tpu]").
3. The same loop at tiny shapes on CPU, to check the script end to end (about 3-5 CPU minutes):

     PYTHONPATH=$PWD python benchmarks/accelerator_rehearsal.py --assets workdirs/rehearsal_assets \
         --out workdirs/rehearsal_tiny --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen3's published shapes (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B).
QWEN3_VOCAB = 151936
QWEN3 = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128),
}
# Dense bf16 peak FLOP/s and memory bandwidth (B/s) from the vendors' data sheets, by device_kind substring.
CARDS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "TPU v6": (918e12, 1.64e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5": (197e12, 0.819e12),  # v5e ("TPU v5 lite").
    "TPU v4": (275e12, 1.2e12),
}
WHEELS = ("alfworld==0.4.2", "textworld==1.7.0", "ml_collections==1.1.0", "tatsu==5.8.3", "hashids", "mementos",
          "more_itertools", "networkx", "termcolor", "prompt_toolkit", "wcwidth", "tensorboardX")


def prepare(assets: pathlib.Path, games: int, wheels: bool) -> None:
  """Copies games, builds both tokenizers and downloads the wheels into `assets`."""
  from sage_opd_jax import tokenization  # pylint: disable=g-import-not-at-top

  source = pathlib.Path(os.environ.get("ALFWORLD_DATA", "")) / "json_2.1.1" / "train"
  if not source.is_dir():
    raise FileNotFoundError(f"{source} is not a folder: set ALFWORLD_DATA to the folder holding json_2.1.1/.")
  target = assets / "alfworld" / "json_2.1.1" / "train"
  trials = sorted(p.parent for p in source.glob("*/*/game.tw-pddl"))[:: max(1, 1465 // games)][:games]
  for trial in trials:
    dest = target / trial.parent.name / trial.name
    if not dest.exists():
      shutil.copytree(trial, dest)
  print(f"{len(trials)} games in {target}")
  print("Qwen3 tokenizer:", tokenization.build_qwen3_tokenizer(assets / "qwen3_tokenizer"))
  print("ALFWorld tokenizer:", tokenization.build_alfworld_tokenizer(assets / "alfworld", assets / "alfworld_tokenizer"))
  if wheels:
    out = assets / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.11", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_27_x86_64",
                    "--implementation", "cp", "-d", str(out), *WHEELS], check=True)
    (out / "requirements.txt").write_text("\n".join(WHEELS) + "\n")
    # TextWorld's PDDL planner ships as an sdist with a C++ build: its compiled package (CPython 3.11,
    # linux x86_64) travels as it is installed here, on PYTHONPATH.
    import fast_downward  # pylint: disable=g-import-not-at-top

    site = assets / "site"
    shutil.rmtree(site / "fast_downward", ignore_errors=True)
    shutil.copytree(pathlib.Path(fast_downward.__file__).parent, site / "fast_downward",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if shutil.which("strip"):  # Its debug symbols are 32 of its 33 MB, and the working tree may carry 64.
      subprocess.run(["strip", "--strip-unneeded", str(site / "fast_downward" / "libdownward.so")], check=True)


def rehearsal_config(method: str, assets: pathlib.Path, args: argparse.Namespace):
  """`configs/alfworld_paper.py`'s config for `method` at Qwen3 shapes with random weights (or tiny ones)."""
  from configs import alfworld_paper, base  # pylint: disable=g-import-not-at-top

  config = alfworld_paper.get_config("0.6b")
  config.required_keys = ()  # Random weights: no checkpoint folders.
  config.stage, config.method = "distill", method
  config.env.data_dir = str(assets / "alfworld")
  config.env.train_split = "train"
  config.env.num_workers = args.workers
  config.sampling.constrained = True  # Random weights never write an admissible action unconstrained.
  config.sampling.free_thought = False  # Constrained from the first token, thought and all.
  config.eval.num_episodes = 0
  config.env.eval_splits = ("train",)  # Only train games travel; no eval runs.
  config.train.num_steps = args.steps
  config.train.ckpt_every = 10 * args.steps  # One forced save, after the last update.
  config.train.log_every = 1
  config.compilation_cache_dir = ""
  if args.tiny:
    config.tokenizer_dir = str(assets / "alfworld_tokenizer")
    from sage_opd_jax import models  # pylint: disable=g-import-not-at-top

    vocab = -(-len(models.load_tokenizer(config.tokenizer_dir)) // 64) * 64
    config.student.model = base.tiny_model(vocab_size=vocab)
    config.teacher.model = base.tiny_model(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_layers=4)
    config.teacher.score_chunk = 128
    config.env.max_turns, config.sampling.max_new_tokens = 4, 16
    config.train.batch_episodes, config.train.micro_batches, config.train.max_seq_len = 4, 1, 1024
  else:
    config.tokenizer_dir = str(assets / "qwen3_tokenizer")
    config.sampling.enable_thinking = False  # Random weights would think until max_new_tokens every turn.
    shape = dict(vocab_size=QWEN3_VOCAB, rope_theta=1_000_000.0, max_position_embeddings=40960, tie_embeddings=True)
    config.student.model.update(**QWEN3["0.6b"], **shape)
    config.teacher.model.update(**QWEN3["1.7b"], **shape)
    config.train.batch_episodes = args.batch
    config.env.max_turns = args.max_turns
    config.train.max_seq_len = 4096  # 20 turns of constrained actions fit; the paper's 40,960 is not 8 minutes.
  return config


_COMPILE_S = [0.0]  # Seconds XLA spent compiling (or loading) programs so far.


def _count_compile(event: str, seconds: float, **_) -> None:
  # XLA's compile only: the tracing events nest (a jitted call traced inside another), so adding them double counts.
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILE_S[0] += seconds


class StepSpy:
  """Wraps `train.DistillSource.batch` (and the rollout and scoring in it) to record, per update, the
  decode tokens and time, the scored rows, and the compile seconds inside each, to leave them out."""

  def __init__(self, train_module):
    self.steps: list[dict[str, float]] = []
    self.compile_marks: list[float] = []
    self._batch = train_module.DistillSource.batch
    self._phase_compile = {"rollout": 0.0, "teacher": 0.0}

  def timed(self, phase, fn):
    def wrapper(*args, **kwargs):
      before = _COMPILE_S[0]
      try:
        return fn(*args, **kwargs)
      finally:
        self._phase_compile[phase] += _COMPILE_S[0] - before
    return wrapper

  def __call__(self, source, step, student):
    self.compile_marks.append(_COMPILE_S[0])
    self._phase_compile = {"rollout": 0.0, "teacher": 0.0}
    arrays, metrics, rollout = self._batch(source, step, student)
    self.steps.append(dict(decode_tokens=float(arrays["response_lengths"].sum()),
                           decode_s=rollout.stats.model_s - self._phase_compile["rollout"],
                           teacher_compile_s=self._phase_compile["teacher"],
                           scored_tokens=float(arrays["attention_mask"].sum()),
                           scored_positions=float(arrays["tokens"].size)))
    return arrays, metrics, rollout


def run_method(method: str, assets: pathlib.Path, out: pathlib.Path, args) -> dict[str, float]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sage_opd_jax import train, writers  # pylint: disable=g-import-not-at-top

  config = rehearsal_config(method, assets, args)
  workdir = out / method
  shutil.rmtree(workdir, ignore_errors=True)
  from sage_opd_jax import rollout as rollout_lib  # pylint: disable=g-import-not-at-top

  spy = StepSpy(train)
  start = time.perf_counter()
  patches = [(train.DistillSource, "batch", lambda source, step, student: spy(source, step, student)),
             (rollout_lib.RolloutEngine, "run", spy.timed("rollout", rollout_lib.RolloutEngine.run)),
             (train.teacher_lib, "score_batch", spy.timed("teacher", train.teacher_lib.score_batch))]
  originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
  for owner, name, value in patches:
    setattr(owner, name, value)
  try:
    train.train(config, workdir)
  finally:
    for owner, name, value in originals:
      setattr(owner, name, value)
  spy.compile_marks.append(_COMPILE_S[0])
  wall = time.perf_counter() - start
  rows = [r for r in writers.read_metrics(workdir) if "train/loss" in r]
  warm = slice(1, None) if len(rows) > 1 else slice(None)  # The first update compiles.

  def median(values):
    return float(statistics.median(list(values)[warm]))

  s, b = config.train.max_seq_len, config.train.batch_episodes
  compile_s = list(np.diff(spy.compile_marks))  # Per update: its data, update and checkpoint.
  return dict(
      wall_s=wall,
      iteration_s=median([r["time/data"] + r["time/update"] for r in rows]),
      # Without the programs compiled (or loaded) during the step: what a long run's iteration costs.
      iteration_net_s=median([r["time/data"] + r["time/update"] - c for r, c in zip(rows, compile_s)]),
      compile_s=median(compile_s),
      rollout_s=median([r["time/rollout"] for r in rows]),
      teacher_s=median([r["time/teacher"] for r in rows]),
      judge_s=median([r.get("time/judge", 0.0) for r in rows]),
      update_s=median([r["time/update"] for r in rows]),
      decode_tokens_per_s=median([x["decode_tokens"] / max(x["decode_s"], 1e-9) for x in spy.steps]),
      teacher_tokens_per_s=median([x["scored_tokens"] / (r["time/teacher"] - x["teacher_compile_s"])
                                   for x, r in zip(spy.steps, rows)]),
      teacher_positions_per_s=median([x["scored_positions"] / (r["time/teacher"] - x["teacher_compile_s"])
                                      for x, r in zip(spy.steps, rows)]),
      update_flops=update_flops(config.student.model, b, s),
      first_update_s=rows[0]["time/update"], steps=len(rows))


def param_count(model: dict) -> int:
  d, f, v, l = model["hidden_size"], model["intermediate_size"], model["vocab_size"], model["num_layers"]
  q, kv = model["num_heads"] * model["head_dim"], model["num_kv_heads"] * model["head_dim"]
  per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d + (2 * model["head_dim"] if model["qk_norm"] else 0)
  return l * per_layer + v * d * (1 if model["tie_embeddings"] else 2) + d


def update_flops(model, batch: int, seq: int) -> float:
  """Model FLOPs of one update: 6 N per token plus causal attention (6 S H hd per token and layer), over B x S."""
  attention = 6 * model["num_layers"] * seq * model["num_heads"] * model["head_dim"]
  return float(batch * seq * (6 * param_count(model) + attention))


def decode_roofline(args, bandwidth: float | None) -> dict[str, float]:
  """Per-step decode time at batch `args.decode_batch` (the difference of two lengths), against its byte floor."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from sage_opd_jax import models, sampling  # pylint: disable=g-import-not-at-top
  from sage_opd_jax.models import sharding  # pylint: disable=g-import-not-at-top

  fields = (base.tiny_model(vocab_size=512) if args.tiny else
            base.tiny_model(**QWEN3["0.6b"], vocab_size=QWEN3_VOCAB, rope_theta=1e6, max_position_embeddings=40960,
                            dtype="bfloat16", param_dtype="bfloat16")).to_dict()
  config = models.ModelConfig.from_dict(fields)
  model = sharding.create_model(config, sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]), seed=0)
  batch, prompt = args.decode_batch, args.decode_prompt
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, config.vocab_size, prompt).tolist() for _ in range(batch)]
  times = {}
  for new in (args.decode_short, args.decode_long):
    sampler = sampling.SamplingConfig(max_new_tokens=new, temperature=1.0, pad_id=0)  # No stop: every step runs.
    for attempt in range(3):  # The first call compiles; the faster of the other two counts.
      start = time.perf_counter()
      out = sampling.EpisodeCache(model, batch, min_len=prompt + args.decode_long + 1).generate(
          prompts, jax.random.PRNGKey(attempt), sampler)
      if attempt:
        times[new] = min(times.get(new, float("inf")), time.perf_counter() - start)
    assert int(out.lengths.min()) == new, out.lengths
  step_s = (times[args.decode_long] - times[args.decode_short]) / (args.decode_long - args.decode_short)
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx_state(model)))
  context = prompt + (args.decode_short + args.decode_long) / 2  # Mean cached length over the timed steps.
  kv = batch * context * config.num_layers * 2 * config.num_kv_heads * config.head_dim * np.dtype(
      config.jnp_dtype).itemsize
  result = dict(decode_batch=batch, decode_step_ms=1e3 * step_s, decode_tokens_per_s=batch / step_s,
                decode_bytes_per_step=float(params + kv), weight_bytes=float(params), kv_bytes=float(kv))
  if bandwidth:
    result["roofline_share"] = (params + kv) / bandwidth / step_s
  return result


def nnx_state(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return nnx.state(model, nnx.Param)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--assets", type=pathlib.Path, default=REPO / "workdirs" / "rehearsal_assets")
  parser.add_argument("--out", type=pathlib.Path, default=REPO / "workdirs" / "rehearsal")
  parser.add_argument("--prepare", action="store_true", help="Fill --assets (needs the network and ALFWORLD_DATA).")
  parser.add_argument("--games", type=int, default=64, help="--prepare: train games to copy.")
  parser.add_argument("--no-wheels", action="store_true", help="--prepare: skip the wheel download.")
  parser.add_argument("--tiny", action="store_true", help="base.py's tiny models and the ALFWorld tokenizer (CPU).")
  parser.add_argument("--methods", nargs="+", default=["opd", "sage_opd"])
  parser.add_argument("--steps", type=int, default=3, help="Updates per method (the first compiles).")
  parser.add_argument("--batch", type=int, default=64, help="Episodes per update at Qwen3 shapes.")
  parser.add_argument("--max-turns", type=int, default=20, help="Turn limit at Qwen3 shapes (the paper's is 50).")
  parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
  parser.add_argument("--decode-batch", type=int, default=64)
  parser.add_argument("--decode-prompt", type=int, default=1024)
  parser.add_argument("--decode-short", type=int, default=32)
  parser.add_argument("--decode-long", type=int, default=160)
  parser.add_argument("--peak-tflops", type=float, default=None, help="Override the card's bf16 peak.")
  parser.add_argument("--bandwidth-gbs", type=float, default=None, help="Override the card's memory bandwidth.")
  args = parser.parse_args()
  if args.prepare:
    prepare(args.assets, args.games, wheels=not args.no_wheels)
    return
  if args.tiny:
    args.decode_batch, args.decode_prompt, args.decode_short, args.decode_long = 8, 64, 16, 112

  import jax  # pylint: disable=g-import-not-at-top

  jax.monitoring.register_event_duration_secs_listener(_count_compile)
  device = jax.local_devices()[0]
  card = next((spec for name, spec in CARDS.items() if name.lower() in device.device_kind.lower()), (None, None))
  peak = args.peak_tflops * 1e12 if args.peak_tflops else card[0]
  bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else card[1]
  args.out.mkdir(parents=True, exist_ok=True)
  report = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__, "tiny": args.tiny,
            "peak_flops": peak, "bandwidth": bandwidth, "methods": {}}
  for method in args.methods:
    report["methods"][method] = result = run_method(method, args.assets, args.out, args)
    if peak:
      result["update_mfu"] = result["update_flops"] / result["update_s"] / peak
    print(method, json.dumps(result, indent=1), flush=True)
  if {"opd", "sage_opd"} <= set(report["methods"]):
    report["sage_opd_over_opd"] = (report["methods"]["sage_opd"]["iteration_net_s"]
                                   / report["methods"]["opd"]["iteration_net_s"])
  report["decode"] = decode_roofline(args, bandwidth)
  stats = device.memory_stats() or {}
  report["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None
  (args.out / "rehearsal.json").write_text(json.dumps(report, indent=1) + "\n")
  print(json.dumps({k: v for k, v in report.items() if k != "methods"}, indent=1))


if __name__ == "__main__":
  main()
