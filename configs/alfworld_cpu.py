"""The CPU mini-reproduction on ALFWorld: tiny teacher and student trained here, every method.

Whole pipeline (tokenizer, demos, teacher, student warm start, methods x seeds, results):

  python -m sage_opd_jax.main --config=configs/alfworld_cpu.py --workdir=workdirs/alfworld_cpu

One method on its own, from the pipeline's teacher and student (e.g. an ablation):

  python -m sage_opd_jax.main --config=configs/alfworld_cpu.py:sage_opd_no_norm \\
      --config.stage=distill --workdir=workdirs/alfworld_cpu/runs/sage_opd_no_norm/seed0 \\
      --config.tokenizer_dir=workdirs/alfworld_cpu/tokenizer \\
      --config.teacher.hf_dir=workdirs/alfworld_cpu/teacher/hf \\
      --config.student.hf_dir=workdirs/alfworld_cpu/student_sft/hf
"""

import ml_collections

from configs import base


def get_config(method: str = "sage_opd") -> ml_collections.ConfigDict:
  config = base.get_config()
  config.stage = "pipeline"
  config.method = method
  config.env.task_types = ("pick_and_place_simple", "look_at_obj_in_light")  # Where a tiny teacher succeeds.
  config.env.max_turns = 30
  # The whole history (k = the turn limit): a tiny model keeps track of the receptacles it has
  # opened only through its context, and acting then sees exactly the SFT transcripts' layout.
  config.env.history_turns = 30
  config.env.num_workers = 2
  # Without the admissible list an episode transcript is ~420 tokens (p90 ~700) and fits
  # max_seq_len; with it every observation costs ~400 more.
  config.env.show_admissible = False

  config.student.model = base.tiny_model(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                                         num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
  config.teacher.model = base.tiny_model(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                                         num_kv_heads=2, head_dim=64, max_position_embeddings=1024)

  config.demos.limit = 0  # Every train game of the chosen task types.
  # SFT batches are length-grouped, so judge samples (~550 tokens, one trained word) fill whole
  # batches: at 3,000 of them acting got ~27% of the teacher's updates and it did not learn to act.
  config.sft.max_judge_examples = 1000
  # The judge's cost is its prefill, and the admissible list is ~27% of a question's tokens
  # (103 of 380 on the train demos). The acting prompt goes without it too, and with constrained
  # decoding every action the judge sees is admissible.
  config.judge.show_admissible = False
  # Bare-action demos left the teacher walking past the task's object (teacher-forced "take"
  # accuracy 3/17 on held-out games); a subgoal thought puts the object a few tokens before the action.
  config.sft.thoughts = "subgoal"
  # The tiny models do not learn to copy an object's instance number from the observation
  # ("take alarmclock 1" for "alarmclock 3"): actions are decoded from the admissible ones (a token
  # trie after <action>; the thought is free). Every result here is constrained decoding.
  config.sampling.constrained = True
  config.sampling.free_thought = True
  # The demos' subgoal thoughts end within 7 tokens of the response's start (`<think>put plate 3 in
  # dresser</think>`): a response still thinking after 12 is forced into <action> and an admissible action.
  config.sampling.max_thought_tokens = 12
  config.train.batch_episodes = 8
  # Also the context budget: a losing episode ends at turn ~20 of 30 when its transcript would outgrow
  # it (eval metric context_cut_rate); 2,048 won the SFT teacher 2 more games of 48 (docs/notes.md).
  config.train.max_seq_len = 1024
  # Each prefill width, KV-cache length and trie shape compiles the decode loop again: with the base's floors
  # a greedy eval of the control's start on valid_unseen compiled it 10 times, with these 2 (docs/results.md).
  # One prefill width: the first prompt and every observation fit 256 tokens (the longest seen 212).
  config.sampling.min_chunk_len = 256
  # One KV-cache length: a whole transcript (max_seq_len) plus a turn's prefill width.
  config.sampling.min_cache_len = config.train.max_seq_len + config.sampling.min_chunk_len
  # One trie shape: the largest the admissible actions of pick_and_place games build (512 nodes, 16 children).
  config.sampling.min_trie_shape = (512, 16)
  # One eval after the last update; with the student_eval stage (step 0) 2 points per curve. Each
  # eval covers every game of the two task types (valid_seen 48, valid_unseen 42): no subset.
  config.train.eval_every = 40
  config.train.ckpt_every = 5
  config.optim.learning_rate = 1e-4
  config.eval.num_episodes = 48
  config.eval.temperatures = (0.0,)

  config.pipeline = pipeline_config(
      # The student's warm start is every demo for 1,000 updates: after 200 updates on 100 demos it
      # won 0/32 games on each eval split, and no method moved it off 0 in 40 updates (docs/notes.md).
      teacher_steps=3000, student_steps=1000, student_demos=0, distill_steps=40,
      # The SFT teacher won 0.458 of valid_seen, under the 0.50 bar; two DAgger rounds of 320 games
      # took it to 0.521 in that run, and a rerun's from 0.396 down to 0.250 (docs/notes.md).
      dagger_rounds=2,
      methods=("sft", "opd", "sage_opd", "sage_opd_no_intervention", "sage_opd_no_confidence",
               "sage_opd_no_norm"),
      seeds=(0, 1, 2), heldout_games=20, results_dir="docs/results/alfworld_cpu",
  )
  return config


def pipeline_config(**values) -> ml_collections.ConfigDict:
  """The budgets of `sage_opd_jax.pipeline` (shared with the quickstart)."""
  p = ml_collections.ConfigDict()
  p.teacher_steps = 3000  # SFT updates of the teacher on demos and judge examples.
  p.student_steps = 200  # SFT updates of the student's warm start.
  p.student_demos = 100  # Demonstrations in the student's warm-start slice; 0: all of them.
  # The student's SFT (warm start and the sft method) also trains on sft.renamed_copies and
  # sft.renumbered_copies; False: the demos as collected, the copies the teacher's alone.
  p.student_copies = False
  p.sft_learning_rate = 1e-3  # Peak learning rate of both SFT stages.
  p.sft_schedule = "cosine"  # Learning-rate schedule of both SFT stages (config.optim.schedule's choices).
  p.distill_steps = 40  # Updates of every method and seed, from the same student.
  p.methods = ("sft", "opd", "sage_opd")  # Rows of the method table (docs/method.md) to run.
  p.seeds = (0, 1, 2)  # Seeds per method.
  p.heldout_split = "valid_seen"  # Split whose judge examples measure the judge's accuracy.
  p.heldout_games = 20  # Games of that split collected for it.
  # Also copy the CSV and plots here (e.g. docs/results/alfworld_cpu); empty: the workdir only. The
  # markdown report is always <workdir>/results/results.md.
  p.results_dir = ""
  p.dagger_rounds = 0  # DAgger rounds of the teacher after its SFT (sage_opd_jax/dagger.py); 0: none.
  # More rounds after those, at the warm-started student's states: the student plays (at
  # sampling.temperature, as in OPD's rollouts), the expert corrects, the teacher trains on it.
  p.dagger_student_rounds = 0
  p.dagger_games = 320  # New train games per round that the teacher plays with the env expert shadowing it.
  p.dagger_temperature = 0.4  # The teacher's sampling temperature in those games (0: greedy).
  p.dagger_steps = 1000  # SFT updates per round on demos, judge examples and every round's corrections.
  p.dagger_learning_rate = 3e-4  # Peak learning rate of those updates (same schedule as the SFT stages).
  p.sweep = ""  # A name: rerun methods x seeds into sweeps/<name>/, same teacher and student (docs/reproducing.md).
  p.update(values)
  return p
