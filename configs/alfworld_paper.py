"""Paper scale on ALFWorld: a Qwen3-8B teacher distilled into a Qwen3 student on TPU or GPU.

The whole table (demonstrations, the student's warm start, teacher evaluation and judge accuracy,
every method x seed, the results) from one command; every stage resumes:

  # Single host (e.g. 8 GPUs or a v5e-8): one process, FSDP over every local device.
  python -m sage_opd_jax.main --config=configs/alfworld_paper.py:0.6b \\
      --config.teacher.hf_dir=/ckpt/Qwen3-8B --config.student.hf_dir=/ckpt/Qwen3-0.6B \\
      --config.tokenizer_dir=/ckpt/Qwen3-8B --workdir=/runs/alfworld_paper_0.6b

  # One row of the table on its own (from the pipeline's student and its demonstrations):
  ... --config.stage=distill --config.method=sage_opd --config.seed=1 --workdir=/runs/sage_opd_0.6b_seed1

  # Multi-host (the sft, distill, evaluate and export stages): the same command on every host, plus
  # --coordinator_address, --num_processes and --process_id (SLURM and TPU pods: detected);
  # docs/reproducing.md.
  ... --config.mesh.data=-1 --config.mesh.fsdp=8

The argument is the student size, one of 0.6b, 1.7b, 4b. Weights come from local Hugging Face
directories (`huggingface-cli download Qwen/Qwen3-8B --local-dir /ckpt/Qwen3-8B`); teacher and
student share Qwen3's tokenizer. See docs/reproducing.md for the stages, memory and which parts
have been run versus shape-checked.
"""

import ml_collections

from configs import alfworld_cpu
from configs import base

# Qwen3 student sizes: the hf_dir must hold the matching checkpoint.
STUDENT_SIZES = ("0.6b", "1.7b", "4b")
# Every row of docs/method.md's table, in its order.
METHODS = ("sft", "opd", "sage_opd", "sage_opd_no_intervention", "sage_opd_no_confidence", "sage_opd_no_norm",
           "opd_two_rollout")


def parse_arg(arg: str, config_name: str) -> str:
  """`<student size>` -> size; the errors name `configs/<config_name>.py` and the sizes."""
  if "," in arg:  # The form of one method per command, before the config ran the whole table.
    method, _, size = arg.partition(",")
    raise ValueError(f"{config_name}: the argument is '<student size>' (e.g. configs/{config_name}.py:"
                     f"{size or '0.6b'}), which runs every method of the table; got {arg!r}. One method alone: "
                     f"--config.stage=distill --config.method={method or 'sage_opd'}.")
  if arg not in STUDENT_SIZES:
    raise ValueError(f"{config_name}: student size {arg!r} (configs/{config_name}.py:<student size>) must be one "
                     f"of {STUDENT_SIZES}.")
  return arg


def get_config(arg: str = "0.6b", config_name: str = "alfworld_paper") -> ml_collections.ConfigDict:
  parse_arg(arg, config_name)
  config = base.get_config()
  # No default can stand in for these: base.py's tiny random models are not Qwen3 (validate names the unset ones).
  config.required_keys = ("teacher.hf_dir", "student.hf_dir", "tokenizer_dir")
  config.stage = "pipeline"
  config.method = "sage_opd"  # The row that --config.stage=distill runs.
  config.env.max_turns = 50  # Our paper-scale turn limit (docs/method.md, defaults).
  # The whole history: every turn acts on the transcript's prefix. A 3-turn window, trained exactly in packed
  # segments, costs 3.5x the tokens per episode (sage_opd_jax/rollout.py, measured on real games).
  config.env.history_turns = 50
  config.env.num_workers = 16
  config.teacher.hf_dir = ""  # Required: a local Qwen3-8B directory.
  config.student.hf_dir = ""  # Required: a local Qwen3-{size} directory.
  config.tokenizer_dir = ""  # Required: Qwen3's tokenizer (e.g. the teacher's directory).
  config.teacher.score_chunk = 512  # [B, 512, 151936] float32 logits at a time, not [B, S, V].
  config.student.loss_chunk = 512  # Likewise in the student's loss: not [rows, 40960, 151936] (24.9 GB a row).
  # How the checkpoints run (train.RUNTIME_FIELDS; their architecture is the config.json's).
  config.teacher.model.update(
      dtype="bfloat16", param_dtype="bfloat16",  # 16.4 GB of Qwen3-8B weights, not 32.8.
      attention_chunk=1024)  # One [rows, 32, 1024, 1024] score tile at a time, not [rows, 32, S, S].
  config.student.model.update(
      dtype="bfloat16", param_dtype="float32",  # bf16 matmuls on a float32 master copy.
      # One 4k row's step on one device: 76.1 GiB without remat (every layer keeps its attention scores
      # for the backward pass), 16.1 GiB with both (benchmarks/bench_memory.py; docs/benchmarks.md).
      remat=True, attention_chunk=1024,
      # One block's MLP over 1,024 positions at a time, not a whole row's [40960, 2, F] gate and up (3 GiB
      # each in float32 for 4B).
      mlp_chunk=1024,
      # One layer per step of the layer scan (base.py unrolls 8 for CPU speed): with 8, XLA recomputed the 8
      # layers' blocks side by side in the backward pass, and the 4B update at 40,960 tokens needed 180 GiB a
      # device, 41 GiB with 1 (benchmarks/bench_memory.py, docs/reproducing.md).
      scan_unroll=1)
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
  # Tokens per episode (transcript), = Qwen3's max_position_embeddings: 50 turns at the 512-token cap are 36.7k
  # with the measured observations (4,096 held 5). `context_cut_rate` reports the episodes it ends.
  config.train.max_seq_len = 40960
  config.train.eval_every = 20
  config.train.ckpt_every = 10
  config.eval.num_episodes = 140  # Every game of valid_seen (140) and valid_unseen (134).
  config.eval.temperatures = (0.0, 0.4)
  config.eval.num_seeds = 3
  config.mesh.data = 1
  config.mesh.fsdp = -1  # Every device: params, grads and Adam moments sharded (ZeRO-3).
  config.mesh.tensor = 1
  config.pipeline = alfworld_cpu.pipeline_config(
      # The teacher as given (a Qwen3-8B checkpoint); > 0: that many SFT updates on the
      # demonstrations and judge examples first.
      teacher_steps=0,
      # The student's warm start: SFT updates from the given checkpoint on every train demonstration
      # (0: the checkpoint as given).
      student_steps=200, student_demos=0,
      sft_learning_rate=1e-5,  # A pretrained model's SFT rate; the CPU configs' 1e-3 trains from scratch.
      distill_steps=200,  # Every method x seed, from the same warm start (`sft` on demonstrations).
      methods=METHODS, seeds=(0, 1, 2),
      heldout_games=40,  # valid_seen games whose judge examples measure the judge's accuracy.
  )
  return config
