"""Shared defaults for every sage_opd_jax run; other configs start from `get_config()`.

Run (the tiny offline default, as the README's main job):

  python -m sage_opd_jax.main --config=configs/base.py --workdir=workdirs/base

Any field can be overridden on the command line, e.g. `--config.loss.alpha=0.25`.
An unknown key is an error, and `sage_opd_jax.config.validate` checks values and
combinations before anything compiles.
"""

import ml_collections

def tiny_model(**overrides) -> ml_collections.ConfigDict:
  """A Qwen3-shaped decoder small enough for CPU tests and the quickstart."""
  model = ml_collections.ConfigDict(
      dict(
          arch="qwen3",  # Architecture family: qwen3 | qwen2 | llama.
          vocab_size=512,  # Overwritten by the tokenizer's size when one is built.
          hidden_size=64,  # Residual width D.
          intermediate_size=192,  # SwiGLU hidden width.
          num_layers=2,  # Decoder blocks.
          num_heads=4,  # Query heads.
          num_kv_heads=2,  # Key/value heads (GQA).
          head_dim=16,  # Per-head width.
          rope_theta=10_000.0,  # RoPE base.
          rms_norm_eps=1e-6,  # RMSNorm epsilon.
          qk_norm=True,  # Qwen3's per-head q/k RMSNorm.
          qkv_bias=False,  # Qwen2's q/k/v projection bias.
          tie_embeddings=True,  # Share the embedding with the LM head.
          max_position_embeddings=2048,  # Longest sequence the model is used at.
          param_dtype="float32",  # Stored parameter dtype.
          dtype="float32",  # Compute dtype.
          remat=False,  # Rematerialise each block in the backward pass.
          attention_chunk=0,  # Queries per rematerialised attention block (bounds the score buffer); 0 = no bound.
          mlp_chunk=0,  # Positions per rematerialised MLP chunk (bounds the gate and up activations); 0 = no bound.
          scan_unroll=8,  # Layers per layer-scan step: unrolled trains faster on CPU, compiles slower.
      )
  )
  model.update(overrides)
  return model


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = "distill"  # pipeline | collect_demos | sft | distill | evaluate | export.
  config.method = "sage_opd"  # A row of docs/method.md's table: a name registered in sage_opd_jax.losses.
  config.seed = 0  # Seeds the train-state rng and the task order.
  config.compilation_cache_dir = "~/.cache/sage_opd_jax/xla"  # Persistent XLA compilation cache; '' = off.
  # Keys ("a.b,c") a rerun may change from the config its workdir recorded (sage_opd_jax/provenance.py).
  config.allow_changed = ""

  config.env = ml_collections.ConfigDict()
  config.env.name = "alfworld"  # Registered environment name (sage_opd_jax.envs.make).
  config.env.data_dir = ""  # ALFWorld json_2.1.1 parent; empty means $ALFWORLD_DATA.
  config.env.train_split = "train"  # Split the student's rollouts draw tasks from.
  config.env.eval_splits = ("valid_seen", "valid_unseen")  # Splits evaluated every eval.
  config.env.task_types = ()  # Restrict to these task types; empty means all.
  config.env.max_turns = 30  # Turn limit of an episode.
  # ALFWorld: "There is the <object N>." before each list that shows the task's object (a legibility aid for
  # controlled experiments, envs/alfworld.py's with_object_hint).
  config.env.object_hint = False
  config.env.history_turns = 2  # k: past (observation, action) pairs in the acting prompt.
  config.env.show_admissible = True  # List the admissible actions with every observation.
  config.env.num_workers = 2  # Env worker processes.
  config.env.step_timeout_s = 60.0  # A worker call slower than this is killed and fails the episode.

  config.tokenizer_dir = ""  # HF tokenizer directory shared by student and teacher.

  config.demos = ml_collections.ConfigDict()
  config.demos.split = "train"  # Split the collect_demos stage plays with the expert.
  config.demos.limit = 0  # Games to play (the split's seeded order); 0 means all.
  config.demos.max_turns = 50  # The expert's turn limit (more than the student's: it explores).
  config.demos.judge_states = 2  # States per won episode that yield judge examples.
  config.demos.game_timeout_s = 120.0  # A game (with its judge examples) slower than this is killed.
  config.demos.search_order = "prior"  # ALFWorld expert's receptacle search: prior (fixed per room) | shuffled.
  # The pipeline's expert episodes per train game, pass k (> 1) in demos/<split>_pass<k> with seed + k - 1 and
  # no judge examples; the teacher trains on every pass, the student's warm start on the first.
  config.demos.passes = 1

  config.sft = ml_collections.ConfigDict()
  config.sft.demos_dir = ""  # A collect_demos output folder (demos.jsonl, judge.jsonl).
  config.sft.max_demos = 0  # Train on at most this many demonstrations; 0 means all.
  config.sft.judge_examples = False  # Also train on judge examples (a teacher that acts and judges).
  config.sft.max_judge_examples = 0  # Train on at most this many judge examples; 0 means all.
  config.sft.thoughts = "none"  # Expert <think> text: none | subgoal | subgoal_take (ALFWorld's task subgoals).
  # Per demo, copies with the task's object renamed to a class the episode never shows (ALFWorld;
  # sft_data.copies_with_renamed_objects). The pipeline gives them to the teacher's SFT, and to the student's
  # only with pipeline.student_copies.
  config.sft.renamed_copies = 0
  # Per demo, copies with the room's receptacles of each class renumbered (ALFWorld;
  # sft_data.copies_with_renumbered_receptacles). Like renamed_copies, the teacher's SFT (pipeline.student_copies).
  config.sft.renumbered_copies = 0
  config.sft.extra_demos_dirs = ()  # More demo folders (expert passes, DAgger corrections): their demos only.

  config.student = ml_collections.ConfigDict()
  config.student.hf_dir = ""  # Load the student from this HF directory; empty means `model`.
  config.student.model = tiny_model()  # Architecture when built from scratch.
  # Sequence positions per chunk of the student's LM head in the loss (sft, loss.estimator='sampled'): the
  # update never holds [B, S, V] logits. 0: all at once (the exact estimators need them whole).
  config.student.loss_chunk = 0

  config.teacher = ml_collections.ConfigDict()
  # model: a trained teacher (hf_dir or model). expert: the env's expert as the teacher, with its reliability
  # set by teacher.expert (sage_opd_jax/expert_teacher.py; a controlled study, needs constrained decoding).
  config.teacher.kind = "model"
  config.teacher.expert = ml_collections.ConfigDict()
  config.teacher.expert.eps_on = 0.05  # Mass off the peak action on turns still on the expert's path.
  config.teacher.expert.eps_off = 0.05  # Mass off the peak action after the student left the expert's path.
  config.teacher.expert.eta = 0.0  # Chance that an off-path turn's peak is a fixed wrong admissible action.
  config.teacher.expert.seed = 0  # Seeds the misdirection draws and the wrong actions.
  # On a turn where the expert's `go to` is a step of its search (it has not seen what it looks for): "peak"
  # puts 1 - eps on that one receptacle, "spread" spreads it evenly over every receptacle its search could
  # equally visit next (the env's `expert_search`), which its fixed visiting order alone tells apart.
  config.teacher.expert.search = "peak"
  # Where eps goes: "actions" spreads it evenly over the other admissible actions, so a wrong verb with one
  # action (take, put) gets eps / (n - 1) and one with many (go to) many times that; "verbs" spreads it evenly
  # over the other actions' verbs, then evenly over each verb's actions.
  config.teacher.expert.eps_over = "actions"
  config.teacher.hf_dir = ""  # Load the teacher from this HF directory; empty means `model`.
  config.teacher.model = tiny_model(hidden_size=128, intermediate_size=384, num_layers=4)  # Teacher architecture.
  config.teacher.score_chunk = 256  # Sequence positions per chunk of the teacher's LM head.
  # [ours] Distil towards nu_tau (proportional to nu^(1/tau)): every teacher statistic of the loss
  # (E1, E2, E6) is nu_tau's. 1: the teacher as it is; < 1 sharpens it towards its greedy policy.
  config.teacher.temperature = 1.0
  config.teacher.top_k = 0  # loss.estimator='full': teacher tokens kept per position (E2/E10); 0: all (exact).

  config.sampling = ml_collections.ConfigDict()
  config.sampling.temperature = 1.0  # Rollout temperature.
  config.sampling.top_k = 0  # 0 disables top-k.
  config.sampling.top_p = 1.0  # 1.0 disables nucleus sampling.
  config.sampling.max_new_tokens = 64  # Response budget per turn.
  config.sampling.constrained = False  # Restrict actions to the admissible ones (a token trie).
  config.sampling.free_thought = False  # Constrained: leave <think> free, constrain after <action>.
  # Free thought's budget: a response still thinking after this many tokens (or with only room left for
  # <action> and its longest admissible action) is forced into <action> and an admissible action; 0: none.
  config.sampling.max_thought_tokens = 0
  # Qwen3's thinking switch for acting, passed to the chat template: off, the generation prompt holds an empty
  # think block and the response is the action alone. Needs <think> and </think> as tokens of their own.
  config.sampling.enable_thinking = True
  # Never sample ids past the tokenizer's, nor keep them in the teacher's top-k (Qwen3 pads its embedding to
  # 151,936 rows; 151669-151935 are no token). Off in the CPU configs, whose results were made without it.
  config.sampling.mask_unused_ids = False
  # The acting KV cache's smallest length bucket: it grows through the buckets as contexts do, and
  # each bucket compiles the decode loop again (train.max_seq_len: one length, compiled once).
  config.sampling.min_cache_len = 256
  # The smallest width bucket of a turn's prefill chunk (its new prompt or observation tokens): each width
  # compiles the decode loop again; a larger one pads the prefill (cheap next to decoding) for fewer compiles.
  config.sampling.min_chunk_len = 16
  # The smallest (nodes, children per node) of constrained decoding's token tries (`sampling.build_token_trie`,
  # padded to powers of two): likewise, each shape compiles the decode loop again.
  config.sampling.min_trie_shape = (1, 1)

  config.loss = ml_collections.ConfigDict()
  config.loss.estimator = "sampled"  # sampled (E4, PPO-clip on the k1 estimate) | full (E2).
  config.loss.divergence = "reverse_kl"  # reverse_kl | forward_kl | jsd (E10; need full logits).
  config.loss.jsd_beta = 0.5  # GKD's beta for the generalised JSD.
  config.loss.alpha = 0.5  # Intervention weight of a Weak turn (E5).
  config.loss.confidence = "turn_mean_top1"  # turn_mean_top1 | neg_entropy | token_top1 | none (E6).
  config.loss.aggregation = "token_mean"  # token_mean | seq_mean_token_mean.
  config.loss.ppo_clip = 0.2  # Ratio clip epsilon (E4).
  config.loss.dual_clip = 3.0  # Dual-clip constant c for negative advantages (E4).
  config.loss.log_ratio_clamp = 20.0  # |log pi - log pi_old| is clamped to this before exp.
  # pi_old of E4: "current" = stop_gradient(log pi) on the transcript (one update per batch,
  # r = 1 exactly); "batch" = the sampler's behaviour log-probs, which differ where the
  # history window cut the context the student actually saw.
  config.loss.old_logprobs = "current"

  config.judge = ml_collections.ConfigDict()
  # prompt | transcript (section 5 after the transcript) | likelihood | oracle | expert_belief (the expert teacher's).
  config.judge.mode = "prompt"
  config.judge.history_turns = 2  # Past turns shown in the judge prompt.
  config.judge.show_admissible = True  # List turn t's admissible actions in the judge prompt.
  config.judge.max_new_tokens = 4  # The judge answers with one word (with enable_thinking: its thought, then the word).
  # Let the teacher think before its label (Qwen3's thinking mode; judge.mode=prompt only, with a
  # max_new_tokens budget of >= 64 for the thought). Off, the judge's question ends with the chat
  # template's empty think block, so the label is the reply's first token.
  config.judge.enable_thinking = False
  config.judge.likelihood_thresholds = (-0.5, -2.0)  # Mean log-prob above first: Skip; above second: Weak.
  # prompt mode: send the questions to the teacher in calls of similar length (less padded prefill); False: all
  # in one call, one compiled shape per (question count, longest question) bucket. Same greedy answers.
  config.judge.length_bucketing = True

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-4  # Peak learning rate.
  config.optim.schedule = "constant"  # constant | cosine (after warm-up).
  config.optim.warmup_steps = 10  # Linear warm-up steps.
  config.optim.weight_decay = 0.0  # AdamW decoupled weight decay.
  config.optim.b1 = 0.9  # Adam beta1.
  config.optim.b2 = 0.95  # Adam beta2.
  # Adam's epsilon, added to the root of the second moment: a parameter whose gradients are all far below it
  # (the embedding row of a token the batch never holds) steps by less than the learning rate.
  config.optim.eps = 1e-8
  config.optim.grad_clip = 1.0  # Global grad-norm clip.

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 20  # Updates in the distill/sft stage.
  config.train.batch_episodes = 8  # Episodes per update (global, over every device).
  config.train.micro_batches = 1  # Gradient-accumulation micro-batches per update (and the teacher's scoring).
  config.train.max_seq_len = 1024  # Padded length of one episode transcript.
  config.train.log_every = 1  # Steps between metric writes.
  config.train.eval_every = 10  # Steps between evaluations (and one at the end).
  config.train.ckpt_every = 10  # Steps between checkpoints.
  config.train.keep_ckpts = 2  # Checkpoints kept.

  config.eval = ml_collections.ConfigDict()
  config.eval.num_episodes = 16  # Episodes per split per eval (a fixed subset of the split); 0: no eval.
  config.eval.temperatures = (0.0,)  # 0.0 is greedy; docs/method.md's defaults also use 0.4.
  config.eval.num_seeds = 1  # Sampling seeds per temperature above 0.
  config.eval.num_transcripts = 3  # Transcripts written per eval, with judge labels and weights.

  config.mesh = ml_collections.ConfigDict()
  # One axis may be -1: it takes every device the other two leave.
  config.mesh.data = 1  # Data-parallel axis size.
  config.mesh.fsdp = -1  # Parameter-sharded (FSDP) data-parallel axis size.
  config.mesh.tensor = 1  # Tensor-parallel axis size.
  return config
