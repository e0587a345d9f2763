"""The paper config rehearsed on CPU: its whole pipeline with tiny random Qwen3 models.

`configs/alfworld_paper.py` as it is, but for the model sizes, the budgets, the game counts and the
mesh (`CHANGED` lists every field it changes; tests/test_rehearsal.py checks that nothing else
differs). It decodes freely, as the paper config does: its random student writes no admissible
action, so each of its turns is Strong by rule and SAGE-OPD's judge is asked in the judge-accuracy
stage only (docs/reproducing.md has the command that times the judge in the loop). Its checkpoints
are its own: a Qwen3-architecture student and a larger teacher, randomly initialised with Qwen3's
vocabulary of 151,936, written in Hugging Face format (`models.save_hf_checkpoint`), each shipping
Qwen3's real tokenizer (`tokenization.build_qwen3_tokenizer`), as a downloaded Qwen3 folder does.
Everything else is the paper's (its chat template, thinking mode and judge mode, bf16 compute, remat
and chunked attention, the history window) on real ALFWorld games ($ALFWORLD_DATA) over a data x
fsdp x tensor = 2 x 2 x 2 mesh of 8 devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m sage_opd_jax.main \\
      --config=configs/alfworld_rehearsal.py:workdirs/rehearsal_checkpoints --workdir=workdirs/rehearsal

The argument is where the checkpoints go (made on first use, reused after; default
~/.cache/sage_opd_jax/rehearsal). It exercises the paper's pipeline, not what it measures: the
models are random. Most of its time goes to compiling each stage's programs and to the
151,936-wide LM head (docs/reproducing.md has the measured figures).

`:<checkpoints>,control` rehearses `configs/alfworld_control_qwen3.py` (eta 0.5) the same way: the
controlled-teacher study with a Qwen3 student, the env's expert as its teacher (no teacher checkpoint;
decoding constrained to the admissible actions after a free thought).
"""

import os
import pathlib

import ml_collections

from configs import alfworld_control_qwen3
from configs import alfworld_paper
from configs import base

# The rehearsal's models: Qwen3's vocabulary and layout (tied embeddings like Qwen3-0.6B, untied
# like Qwen3-8B), a few hundred kilobytes of layers. Head counts divide over the tensor axis.
# Widths are small because the 151,936-wide LM head is most of every step's work (it scales with them).
STUDENT = base.tiny_model(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, rope_theta=1_000_000.0, max_position_embeddings=4096)
TEACHER = base.tiny_model(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0, tie_embeddings=False,
                          max_position_embeddings=4096)

# Every field the rehearsal sets, and why; any other field is the paper config's.
CHANGED = {
    # Model sizes: its own checkpoints (the teacher's folder is the tokenizer's, as in the paper's command).
    "student.hf_dir": "checkpoints", "teacher.hf_dir": "checkpoints", "tokenizer_dir": "checkpoints",
    # The learning rate a tiny random model needs to pick up the response format in a few SFT updates.
    "pipeline.sft_learning_rate": "model size",
    # Budgets: tokens, turns, updates, chunk sizes scaled to the shorter rows, worker processes.
    "env.max_turns": "budget", "env.num_workers": "budget", "sampling.max_new_tokens": "budget",
    "sampling.min_cache_len": "budget", "sampling.min_chunk_len": "budget",
    "sampling.min_trie_shape": "budget",
    "train.batch_episodes": "budget", "train.micro_batches": "budget",
    "train.max_seq_len": "budget", "train.eval_every": "budget", "train.ckpt_every": "budget",
    "teacher.score_chunk": "budget", "student.loss_chunk": "budget", "student.model.attention_chunk": "budget",
    "teacher.model.attention_chunk": "budget", "student.model.mlp_chunk": "budget",
    "pipeline.student_steps": "budget", "pipeline.distill_steps": "budget", "pipeline.methods": "budget",
    "pipeline.seeds": "budget", "eval.temperatures": "budget", "eval.num_seeds": "budget",
    # Game counts.
    "demos.limit": "games", "pipeline.heldout_games": "games", "eval.num_episodes": "games",
    # The mesh: every axis above 1.
    "mesh.data": "mesh", "mesh.fsdp": "mesh", "mesh.tensor": "mesh",
}


def make_checkpoints(out_dir: str | os.PathLike) -> tuple[str, str]:
  """-> (student, teacher) HF folders under `out_dir`, made once (seeded: the same weights every time)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from sage_opd_jax import models  # pylint: disable=g-import-not-at-top
  from sage_opd_jax import tokenization  # pylint: disable=g-import-not-at-top
  from sage_opd_jax.models import sharding  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out_dir).expanduser()
  tokenizer = AutoTokenizer.from_pretrained(tokenization.build_qwen3_tokenizer(out / "qwen3_tokenizer"))
  folders = []
  for seed, (name, model) in enumerate((("student", STUDENT), ("teacher", TEACHER))):
    folder = out / name
    folders.append(str(folder))
    if (folder / "model.safetensors").exists():
      continue
    partial = out / f"{name}.partial"  # Written aside, then renamed: a killed run leaves no half checkpoint.
    config = models.ModelConfig.from_dict(dict(model.to_dict(), param_dtype="bfloat16", dtype="bfloat16"))
    models.save_hf_checkpoint(sharding.create_model(config, None, seed), partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
  return folders[0], folders[1]


# The paper configs a rehearsal can run, by the name after the argument's comma.
PAPER_CONFIGS = {"": lambda: alfworld_paper.get_config("0.6b"),
                 "control": lambda: alfworld_control_qwen3.get_config("0.5")}


def get_config(arg: str = "~/.cache/sage_opd_jax/rehearsal") -> ml_collections.ConfigDict:
  out_dir, _, which = arg.partition(",")
  if which not in PAPER_CONFIGS:
    raise ValueError(f"alfworld_rehearsal: configs/alfworld_rehearsal.py:<checkpoints>[,control], got {which!r} "
                     "after the comma.")
  config = PAPER_CONFIGS[which]()
  config.student.hf_dir, teacher = make_checkpoints(out_dir)
  if config.teacher.kind == "model":
    config.teacher.hf_dir = teacher
  config.tokenizer_dir = config.teacher.hf_dir or config.student.hf_dir  # Both ship Qwen3's tokenizer.
  # Under the paper's 10 warm-up updates (the first at rate 0), 3 updates at this peak rate teach it to
  # open a turn with <think>.
  config.pipeline.sft_learning_rate = 6e-2

  # Multi-turn within the token budget: Qwen3's tokens for the first prompt are 210-480 on real games,
  # for an observation with its admissible actions 100-370 (median 170), for a response at most 24;
  # 1,024 tokens hold 4 turns of most games.
  config.env.max_turns = 4
  config.env.num_workers = 2
  # A response's budget: room for a short thought, </think> and the longest action (18 tokens). The random
  # student mostly writes all 24 tokens, none an action.
  config.sampling.max_new_tokens = 24
  config.train.batch_episodes = 4  # One episode per data x fsdp shard.
  config.train.micro_batches = 1
  config.train.max_seq_len = 1024
  # One prefill width, that of the longest first prompt (480 tokens), and one KV-cache length, a whole
  # transcript's plus that width: each width and length compiles the decode loop again.
  config.sampling.min_chunk_len = 512
  config.sampling.min_cache_len = config.train.max_seq_len + config.sampling.min_chunk_len
  # Decoding constrained to the admissible actions (the judge's timing command in docs/reproducing.md), one
  # trie shape: the largest that real games' admissible actions build here (256 nodes, 16 children).
  config.sampling.min_trie_shape = (256, 16)
  config.train.eval_every = 100  # Once, after the last update.
  config.train.ckpt_every = 1
  config.teacher.score_chunk = config.student.loss_chunk = 256  # Several chunks per row, as at paper scale.
  config.student.model.attention_chunk = config.teacher.model.attention_chunk = 256
  config.student.model.mlp_chunk = 256
  config.pipeline.student_steps = 3
  config.pipeline.distill_steps = 1  # One iteration of each method (a longer run measures iteration times).
  config.pipeline.methods = ("sft", "opd", "sage_opd")
  config.pipeline.seeds = (0,)
  config.eval.temperatures = (0.0,)
  config.eval.num_seeds = 1

  config.demos.limit = 6  # The expert wins most: 4 demonstrations or more for a batch of 4.
  config.pipeline.heldout_games = 1
  config.eval.num_episodes = 2

  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  return config
