"""Paper scale on ALFWorld: a Qwen3-8B teacher distilled into a Qwen3 student on TPU or GPU.

  # Single host (e.g. 8 GPUs or a v5e-8): one process, FSDP over every local device.
  python -m sage_opd_jax.main --config=configs/alfworld_paper.py:sage_opd,0.6b \\
      --config.teacher.hf_dir=/ckpt/Qwen3-8B --config.student.hf_dir=/ckpt/Qwen3-0.6B \\
      --config.tokenizer_dir=/ckpt/Qwen3-8B --workdir=/runs/alfworld_sage_opd_0.6b

  # Multi-host pod: the same command on every host; `jax.distributed.initialize()` joins
  # them (the launcher sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES, or SLURM does).
  ... --config.mesh.data=-1 --config.mesh.fsdp=8

The argument is `<method>,<student size>`: a row of docs/method.md's table and one of 0.6b, 1.7b,
4b. Weights come from local Hugging Face directories (`huggingface-cli download Qwen/Qwen3-8B
--local-dir /ckpt/Qwen3-8B`); teacher and student share Qwen3's tokenizer. See
docs/reproducing.md for memory and which parts have been run versus shape-checked.
"""

import ml_collections

from configs import base

# Qwen3 student sizes: the hf_dir must hold the matching checkpoint.
STUDENT_SIZES = ("0.6b", "1.7b", "4b")


def parse_arg(arg: str, config_name: str) -> tuple[str, str]:
  """`<method>,<student size>` -> (method, size); the errors name `configs/<config_name>.py`."""
  parts = arg.split(",")
  if len(parts) != 2 or not all(parts):
    raise ValueError(f"{config_name}: the argument is '<method>,<student size>' (e.g. "
                     f"configs/{config_name}.py:sage_opd,0.6b), got {arg!r}; sizes: {STUDENT_SIZES}.")
  method, size = parts
  if size not in STUDENT_SIZES:
    raise ValueError(f"{config_name}: student size {size!r} must be one of {STUDENT_SIZES}.")
  return method, size


def get_config(arg: str = "sage_opd,0.6b", config_name: str = "alfworld_paper") -> ml_collections.ConfigDict:
  method, size = parse_arg(arg, config_name)
  config = base.get_config()
  # No default can stand in for these: base.py's tiny random models are not Qwen3 (validate names the unset ones).
  config.required_keys = ("teacher.hf_dir", "student.hf_dir", "tokenizer_dir")
  config.stage = "distill"
  config.method = method
  config.env.max_turns = 50  # Our paper-scale turn limit (docs/method.md, defaults).
  config.env.history_turns = 3
  config.env.num_workers = 16
  config.teacher.hf_dir = ""  # Required: a local Qwen3-8B directory.
  config.student.hf_dir = ""  # Required: a local Qwen3-{size} directory.
  config.tokenizer_dir = ""  # Required: Qwen3's tokenizer (e.g. the teacher's directory).
  config.teacher.score_chunk = 512  # [B, 512, 151936] float32 logits at a time, not [B, S, V].
  # How the checkpoints run (train.RUNTIME_FIELDS; their architecture is the config.json's).
  config.teacher.model.update(
      dtype="bfloat16", param_dtype="bfloat16",  # 16.4 GB of Qwen3-8B weights, not 32.8.
      attention_chunk=1024)  # [rows, 32, 1024, S] scores at a time, not [rows, 32, S, S].
  config.student.model.update(
      dtype="bfloat16", param_dtype="float32",  # bf16 matmuls on a float32 master copy.
      # One 4k row's step: 96.4 GiB without remat (every layer keeps its [16, S, S] scores for
      # the backward pass), 17.5 GiB with both (benchmarks/bench_memory.py; docs/benchmarks.md).
      remat=True, attention_chunk=1024)
  config.sampling.temperature = 1.0
  config.sampling.max_new_tokens = 512  # Room for <think> before <action>.
  config.sampling.enable_thinking = True  # Qwen3 thinks in <think>...</think> before its <action>.
  config.sampling.mask_unused_ids = True  # Qwen3's embedding rows 151669-151935 are no token.
  config.optim.learning_rate = 1e-6
  config.optim.warmup_steps = 10
  config.optim.grad_clip = 1.0
  config.optim.weight_decay = 0.0
  config.train.num_steps = 200
  config.train.batch_episodes = 64  # 64 episodes x group 1.
  config.train.micro_batches = 8
  config.train.max_seq_len = 4096  # Max 4k tokens per episode.
  config.train.eval_every = 20
  config.train.ckpt_every = 10
  config.eval.num_episodes = 134  # All of valid_unseen (and 134 of valid_seen's 140).
  config.eval.temperatures = (0.0, 0.4)
  config.eval.num_seeds = 3
  config.mesh.data = 1
  config.mesh.fsdp = -1  # Every device: params, grads and Adam moments sharded (ZeRO-3).
  config.mesh.tensor = 1
  return config
