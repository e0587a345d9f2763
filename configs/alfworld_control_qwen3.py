"""The controlled-teacher study with a pretrained Qwen3 student (accelerator scale).

`configs/alfworld_control.py`'s study (the env's expert as the teacher, its reliability off the
expert's path set by eta, the teacher's own judge, pick_and_place_simple, 40 updates of 8 episodes, a
15-turn cap) with the student of `configs/alfworld_paper.py`: a Qwen3 checkpoint with Qwen3's tokenizer,
thinking mode, bf16 compute and its memory settings. No teacher checkpoint: the teacher is the expert.
The CPU study's from-scratch student does not read the observation or its history well enough to be
lifted by a correct teacher (docs/results.md, "Controlled teacher"); a pretrained one is the positive
control that study lacks. One pipeline per eta into one workdir (the demos and warm start are shared):

  for eta in 0 0.25 0.5 0.75; do
    python -m sage_opd_jax.main --config=configs/alfworld_control_qwen3.py:$eta \\
        --config.student.hf_dir=/ckpt/Qwen3-0.6B --config.tokenizer_dir=/ckpt/Qwen3-0.6B \\
        --workdir=/runs/alfworld_control_qwen3
  done

The positive control alone: `:0` with `--config.pipeline.methods="('opd','sage_opd')"`. Check the warm
start's greedy success (`<workdir>/student_eval`) first: the study needs room above it. The CPU
rehearsal of this config (tiny random Qwen3 checkpoints with the real tokenizer) is in
tests/test_rehearsal.py.
"""

import ml_collections

from configs import alfworld_control
from configs import alfworld_paper


def get_config(eta: str = "0") -> ml_collections.ConfigDict:
  config = alfworld_paper.get_config("0.6b", config_name="alfworld_control_qwen3")
  study = alfworld_control.get_config(eta)
  # The study's teacher, judge and knob, as the CPU study sets them.
  config.teacher.kind = study.teacher.kind
  config.teacher.expert = study.teacher.expert
  config.judge.mode = study.judge.mode
  config.required_keys = ("student.hf_dir", "tokenizer_dir")
  # The expert teacher scores admissible actions only: decoding is constrained to them, after a thought of at
  # most 32 tokens (a subgoal such as "put soapbottle 3 in cabinet" is 8 of Qwen3's tokens; a longer
  # thought is closed for the student, and the expert's law charges every token past its own).
  config.sampling.constrained = True
  config.sampling.free_thought = True
  config.sampling.max_thought_tokens = 32
  # The thought, </think>, <action> and the longest action (18 tokens on real games).
  config.sampling.max_new_tokens = 64
  config.sft.thoughts = study.sft.thoughts  # The warm start thinks the expert's subgoal, which the teacher scores.
  config.sft.renumbered_copies = 0
  # 40 updates at the warm start's SFT rate: the paper's 1e-6 is set for 200 updates of 64 episodes.
  config.optim.learning_rate = 1e-5
  # The CPU study's games, turn cap and budget (its targets are stated for 40 updates of 8 episodes).
  config.env.task_types = study.env.task_types
  config.env.max_turns = study.env.max_turns
  config.env.history_turns = study.env.max_turns  # The whole history.
  # 15 turns of Qwen3 tokens: the first prompt is 210-480 tokens on real games, an observation 100-370.
  config.train.max_seq_len = 8192
  config.train.batch_episodes = study.train.batch_episodes
  # One micro-batch of 8 rows. A Qwen3-0.6B update at 8,192-token rows compiles to 0.84 GiB of arguments and 2.96 of
  # temporaries a device with one row each on 8 devices (docs/reproducing.md), so all 8 rows fit one 80 GB device.
  config.train.micro_batches = 1
  config.train.eval_every = study.train.eval_every
  config.train.ckpt_every = study.train.ckpt_every
  config.eval.num_episodes = study.eval.num_episodes  # Every pick game: 35 of valid_seen, 24 of valid_unseen.
  config.eval.temperatures = study.eval.temperatures
  config.eval.num_seeds = 1
  p = config.pipeline
  # A weak start on purpose: the study measures how far a teacher lifts it. 20 updates at the paper's SFT rate
  # teach the response format and subgoal thoughts; `student_eval` says where it starts.
  p.student_steps = 20
  p.distill_steps = study.pipeline.distill_steps
  p.methods = study.pipeline.methods
  p.seeds = study.pipeline.seeds
  p.heldout_games = study.pipeline.heldout_games
  p.sweep = study.pipeline.sweep
  p.results_dir = ""  # Written into <workdir>/control/ only.
  return config
