"""Config validation: every run's ConfigDict is checked here before anything compiles.

Unknown keys are already rejected by `ml_collections` (configs are locked and
`config_flags` refuses overrides of missing fields); this module checks values and
combinations, and every error names the offending key.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import ml_collections

from sage_opd_jax import losses
from sage_opd_jax.envs import base as envs_base

STAGES = ("pipeline", "collect_demos", "sft", "distill", "evaluate", "export")
JUDGE_MODES = ("prompt", "transcript", "likelihood", "oracle", "expert_belief")
# The judge modes that sample the teacher's reply, so that it may think before its label
# (config.judge.enable_thinking); the others read one next token or no answer at all.
JUDGE_THINKING_MODES = ("prompt",)
# The least judge.max_new_tokens with judge.enable_thinking: the think block's tags, a thought
# and the label. Qwen3 thinks hundreds of tokens about a judge question; a reply cut inside its
# thought has no label (prompts.UNCLOSED_THINK), so budgets near this floor lose most labels.
JUDGE_THINKING_MIN_TOKENS = 64
TEACHER_KINDS = ("model", "expert")  # config.teacher.kind: a trained model, or the env's expert (expert_teacher.py).
# config.teacher.expert.search: nu peaks on the expert's action everywhere, or spreads over its search's candidates.
SEARCH_BELIEFS = ("peak", "spread")
# config.teacher.expert.eps_over: the off-peak mass evenly over the other admissible actions, or over their verbs.
EPS_OVER = ("actions", "verbs")
# Judge modes that ask the teacher a question, which the expert teacher cannot answer.
MODEL_JUDGE_MODES = ("prompt", "transcript")
SCHEDULES = ("constant", "cosine")
# What fills an expert demo's <think></think> (sft_data): nothing, ALFWorld's subgoal, or the
# subgoal with the task object's take named ("take apple"; envs.alfworld.subgoal_thoughts).
THOUGHTS = ("none", "subgoal", "subgoal_take")
SEARCH_ORDERS = ("prior", "shuffled")  # The ALFWorld expert's (envs.alfworld_expert.ImitableExpert).
DTYPES = ("float32", "bfloat16")
ARCHS = ("qwen3", "qwen2", "llama")
# The demos/sft settings that vary an env's expert or its demonstrations, at the value that leaves
# them as collected: only an env that lists the key in its `EnvSpec.data_options` defines the others.
ENV_DATA_OPTIONS = {"demos.search_order": "prior", "demos.passes": 1, "sft.thoughts": "none",
                    "sft.renamed_copies": 0, "sft.renumbered_copies": 0}


class ConfigError(ValueError):
  """A config value or combination that cannot run; the message names the key."""


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      raise ConfigError(f"config.{key}: missing (no field {part!r}).")
    node = node[part]
  return node


def _one_of(config, key: str, allowed: Iterable[Any]) -> None:
  value = _get(config, key)
  if value not in tuple(allowed):
    raise ConfigError(f"config.{key}={value!r}: must be one of {tuple(allowed)}.")


def _positive(config, key: str, allow_zero: bool = False) -> None:
  value = _get(config, key)
  if not isinstance(value, (int, float)) or (value < 0 if allow_zero else value <= 0):
    raise ConfigError(f"config.{key}={value!r}: must be {'>= 0' if allow_zero else '> 0'}.")


def _in_range(config, key: str, low: float, high: float) -> None:
  value = _get(config, key)
  if not low <= value <= high:
    raise ConfigError(f"config.{key}={value!r}: must lie in [{low}, {high}].")


def loss_options(config: ml_collections.ConfigDict, method: str | None = None) -> losses.LossOptions:
  """`config.loss` as the options of `method` (default `config.method`); a bad one raises naming its key.

  The loss checks its own options (`losses.LossOptions`), so a config is refused exactly when
  the loss would refuse it.
  """
  try:
    return losses.LossOptions.for_method(config.method if method is None else method, **config.loss.to_dict())
  except losses.LossOptionError as e:
    key = "method" if e.field == "method" else f"loss.{e.field}"
    raise ConfigError(f"config.{key}{str(e)[len(e.field):]}") from None


def _check_behaviour_logprobs(config) -> None:
  """`loss.old_logprobs='batch'` only where the sampler's log-probs are log pi_theta's.

  The sampler records the log-probs of the distribution it drew from: after temperature, top-k,
  top-p and the admissible-action mask. The loss's log pi_theta is the model's own over the whole
  vocabulary, renormalised over decoding's support only where the expert teacher supplies that
  support (`student_support`). Anywhere else the PPO ratio would start away from 1 and clip tokens
  that the update never moved.
  """
  if _get(config, "loss.old_logprobs") != "batch":
    return
  processed = [f"config.sampling.{key}={_get(config, f'sampling.{key}')!r}"
               for key, plain in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))
               if _get(config, f"sampling.{key}") != plain]
  if _get(config, "sampling.constrained") and _get(config, "teacher.kind") != "expert":
    processed.append(f"config.sampling.constrained=True with config.teacher.kind={_get(config, 'teacher.kind')!r}")
  if processed:
    raise ConfigError(f"config.loss.old_logprobs='batch' with {', '.join(processed)}: the sampler's log-probs are "
                      "those of the processed distribution, not the model's, so the PPO ratio would not start at 1. "
                      "Use config.loss.old_logprobs='current'.")


def _validate_model(config, prefix: str) -> None:
  # How the model runs: these apply to a checkpoint too (`train.RUNTIME_FIELDS`).
  _one_of(config, f"{prefix}.model.dtype", DTYPES)
  _one_of(config, f"{prefix}.model.param_dtype", DTYPES)
  _positive(config, f"{prefix}.model.scan_unroll")
  _positive(config, f"{prefix}.model.attention_chunk", allow_zero=True)
  _positive(config, f"{prefix}.model.mlp_chunk", allow_zero=True)
  if _get(config, f"{prefix}.hf_dir"):
    return  # The architecture is the HF config.json's, validated when it is read.
  _one_of(config, f"{prefix}.model.arch", ARCHS)
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim"):
    _positive(config, f"{prefix}.model.{field}")
  heads, kv_heads = _get(config, f"{prefix}.model.num_heads"), _get(config, f"{prefix}.model.num_kv_heads")
  if heads % kv_heads:
    raise ConfigError(
        f"config.{prefix}.model.num_heads={heads} is not a multiple of config.{prefix}.model.num_kv_heads={kv_heads}."
    )


def _check_finite(node: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Every float (alone or in a tuple) is finite: `value <= 0` is False for NaN, so no range check catches it."""
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, f"{prefix}{key}.")
    elif any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, (tuple, list))
                                                                      else (value,))):
      raise ConfigError(f"config.{prefix}{key}={value!r}: must be finite.")


def _validate_teacher_kind(config: ml_collections.ConfigDict, spec: envs_base.EnvSpec) -> None:
  """The expert teacher's requirements: an env expert, constrained decoding, a loss and judge it can feed."""
  _one_of(config, "teacher.kind", TEACHER_KINDS)
  mode = _get(config, "judge.mode")
  if _get(config, "teacher.kind") != "expert":
    if mode == "expert_belief":
      raise ConfigError("config.judge.mode='expert_belief' reads the expert teacher's beliefs: it needs "
                        "config.teacher.kind='expert'.")
    return
  for key in ("eps_on", "eps_off"):
    value = _get(config, f"teacher.expert.{key}")
    if not 0.0 <= value < 1.0:
      raise ConfigError(f"config.teacher.expert.{key}={value!r}: must lie in [0, 1).")
  _in_range(config, "teacher.expert.eta", 0.0, 1.0)
  _one_of(config, "teacher.expert.search", SEARCH_BELIEFS)
  _one_of(config, "teacher.expert.eps_over", EPS_OVER)
  why = "config.teacher.kind='expert' "
  if spec.expert is None:
    raise ConfigError(f"{why}needs an env with an expert to name its action at every state; config.env.name="
                      f"{_get(config, 'env.name')!r} has none.")
  if not _get(config, "sampling.constrained"):
    raise ConfigError(f"{why}is a distribution over the turn's admissible actions, so the student's actions must "
                      "be admissible: set config.sampling.constrained=True (unconstrained decoding has no trie to "
                      "score its tokens through).")
  if _get(config, "sft.thoughts") != "none" and not _get(config, "sampling.free_thought"):
    raise ConfigError(f"{why}thinks its demos' thoughts (config.sft.thoughts={_get(config, 'sft.thoughts')!r}), "
                      "which the student writes only with a free thought: set config.sampling.free_thought=True, or "
                      "config.sft.thoughts='none'.")
  if _get(config, "teacher.temperature") != 1.0:
    raise ConfigError(f"{why}sets its sharpness with teacher.expert.eps_on/eps_off: leave "
                      f"config.teacher.temperature at 1.0 (not {_get(config, 'teacher.temperature')!r}).")
  if losses.variant(_get(config, "method")).rollouts > 1:
    raise ConfigError(f"config.method={_get(config, 'method')!r} replaces turns with the teacher's own response, "
                      f"which {why}does not generate: use a one-rollout method.")
  if mode in MODEL_JUDGE_MODES and losses.variant(_get(config, "method")).uses_judge:
    raise ConfigError(f"config.judge.mode={mode!r} asks the teacher a question, which the expert teacher cannot "
                      "answer: use 'expert_belief' (its own judge), 'likelihood' or 'oracle'.")


# Stages whose every file write and model call is process-aware (sage_opd_jax/multihost.py).
MULTI_PROCESS_STAGES = ("sft", "distill", "evaluate", "export")


def check_processes(config: ml_collections.ConfigDict, num_processes: int) -> None:
  """What a run of `num_processes` processes needs; raises `ConfigError` naming the bad key.

  The CLI checks it before the processes join, so that a bad launch fails at once on each process
  rather than after every process has started and joined; the stages check it again with the
  count JAX found (SLURM and TPU pods say it only then).
  """
  if num_processes == 1:
    return
  stage = _get(config, "stage")
  if stage not in MULTI_PROCESS_STAGES:
    raise ConfigError(f"config.stage={stage!r} runs in one process; this run has {num_processes}. Run it alone, "
                      f"then the {', '.join(MULTI_PROCESS_STAGES)} stages on several (docs/reproducing.md).")
  if stage not in ("sft", "distill"):
    return
  batch = _get(config, "train.batch_episodes")
  if batch % num_processes:
    raise ConfigError(f"config.train.batch_episodes={batch} does not divide over the {num_processes} processes of "
                      "this run: each process plays an equal share of the global batch.")
  if stage == "distill" and losses.variant(_get(config, "method")).rollouts == 2:
    # Its teacher answers inside each process's rollout, at points that differ between processes.
    raise ConfigError(f"config.method={_get(config, 'method')!r} replaces turns inside the rollout; it runs in one "
                      f"process only, not the {num_processes} of this run.")


def allowed_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The keys (or sections) of `config.allow_changed`, "a.b,c": what a rerun may change from its workdir's record."""
  return tuple(k.strip() for k in str(config.get("allow_changed", "")).split(",") if k.strip())


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks `config` and returns it; raises `ConfigError` naming the first bad key."""
  _check_finite(config)
  # A config with no usable default for some keys (checkpoint folders) lists them here.
  if missing := [key for key in config.get("required_keys", ()) if not _get(config, key)]:
    raise ConfigError(f"{', '.join(f'config.{key}' for key in missing)} must be set: this config has no default "
                      f"(config.required_keys), e.g. --config.{missing[0]}=/path/to/it.")
  for key in allowed_changes(config):
    _get(config, key)  # An unknown key is named.
  _one_of(config, "stage", STAGES)
  loss_options(config)
  _check_behaviour_logprobs(config)
  env = _get(config, "env.name")
  try:
    spec = envs_base.spec(env)
  except ValueError as e:
    raise ConfigError(f"config.env.name={env!r}: {e}") from None
  _one_of(config, "env.train_split", spec.splits)
  for split in _get(config, "env.eval_splits"):
    if split not in spec.splits:
      raise ConfigError(f"config.env.eval_splits contains {split!r}: must be among {spec.splits}.")
  for key in ("env.max_turns", "env.num_workers", "env.step_timeout_s"):
    _positive(config, key)
  _positive(config, "env.history_turns", allow_zero=True)
  if _get(config, "env.history_turns") == 0 and _get(config, "stage") in ("sft", "pipeline"):
    raise ConfigError("config.env.history_turns=0 with an SFT stage: SFT trains the contexts the rollout acts from "
                      "(sft_data.windowed), and at 0 those are o_t after an empty assistant message, which a "
                      "demonstration does not hold. Use a window of at least 1.")

  _one_of(config, "demos.split", spec.splits)
  _positive(config, "demos.limit", allow_zero=True)
  _positive(config, "demos.max_turns")
  _positive(config, "demos.judge_states", allow_zero=True)
  _positive(config, "demos.game_timeout_s")
  _one_of(config, "demos.search_order", SEARCH_ORDERS)
  _positive(config, "demos.passes")
  _positive(config, "sft.max_demos", allow_zero=True)
  _positive(config, "sft.max_judge_examples", allow_zero=True)
  _one_of(config, "sft.thoughts", THOUGHTS)
  for key in ("sft.renamed_copies", "sft.renumbered_copies"):
    _positive(config, key, allow_zero=True)
  for key, as_collected in ENV_DATA_OPTIONS.items():
    if _get(config, key) != as_collected and key not in spec.data_options:
      raise ConfigError(f"config.{key}={_get(config, key)!r} varies the expert or the demonstrations in a way "
                        f"config.env.name={env!r} does not define: leave it at {as_collected!r}.")
  method = _get(config, "method")
  if _get(config, "stage") == "distill" and not losses.variant(method).needs_teacher:
    raise ConfigError(f"config.method={method!r} with config.stage='distill': this method trains on expert "
                      "demonstrations, not on the student's rollouts, and needs no teacher. Run it as "
                      "--config.stage=sft --config.sft.demos_dir=<collect_demos output: a pipeline's demos/train>.")
  if _get(config, "stage") == "sft" and not _get(config, "sft.demos_dir"):
    raise ConfigError("config.sft.demos_dir is empty: the sft stage trains on a collect_demos output folder.")

  _validate_model(config, "student")
  _validate_model(config, "teacher")
  if not _get(config, "student.hf_dir") and not _get(config, "teacher.hf_dir"):
    student_vocab = _get(config, "student.model.vocab_size")
    teacher_vocab = _get(config, "teacher.model.vocab_size")
    if student_vocab != teacher_vocab:
      raise ConfigError(
          f"config.teacher.model.vocab_size={teacher_vocab} differs from config.student.model.vocab_size="
          f"{student_vocab}: the teacher scores the student's own tokens, so both must share one tokenizer."
      )
  _positive(config, "teacher.score_chunk")
  _positive(config, "student.loss_chunk", allow_zero=True)
  _positive(config, "teacher.top_k", allow_zero=True)
  top_k = _get(config, "teacher.top_k")
  # A checkpoint's vocabulary is known once its config.json is read (`train.teacher_support`).
  if top_k and not _get(config, "teacher.hf_dir") and top_k > _get(config, "teacher.model.vocab_size"):
    raise ConfigError(f"config.teacher.top_k={top_k} exceeds config.teacher.model.vocab_size="
                      f"{_get(config, 'teacher.model.vocab_size')}.")
  _positive(config, "teacher.temperature")
  _validate_teacher_kind(config, spec)

  _positive(config, "sampling.temperature", allow_zero=True)
  _positive(config, "sampling.top_k", allow_zero=True)
  _in_range(config, "sampling.top_p", 0.0, 1.0)
  _positive(config, "sampling.max_new_tokens")
  _positive(config, "sampling.max_thought_tokens", allow_zero=True)
  _positive(config, "sampling.min_cache_len")
  _positive(config, "sampling.min_chunk_len")
  trie_shape = _get(config, "sampling.min_trie_shape")
  if len(trie_shape) != 2 or not all(isinstance(n, int) and n >= 1 for n in trie_shape):
    raise ConfigError(f"config.sampling.min_trie_shape={trie_shape!r}: must be two integers >= 1 (nodes, children).")
  for key in ("sampling.enable_thinking", "sampling.mask_unused_ids"):
    if not isinstance(_get(config, key), bool):
      raise ConfigError(f"config.{key}={_get(config, key)!r}: must be True or False.")
  if _get(config, "sampling.max_thought_tokens") and not _get(config, "sampling.enable_thinking"):
    raise ConfigError(f"config.sampling.max_thought_tokens={_get(config, 'sampling.max_thought_tokens')} bounds a "
                      "thought, but config.sampling.enable_thinking=False leaves none: set it to 0.")
  if _get(config, "sampling.max_thought_tokens") and not (_get(config, "sampling.constrained")
                                                          and _get(config, "sampling.free_thought")):
    raise ConfigError(f"config.sampling.max_thought_tokens={_get(config, 'sampling.max_thought_tokens')} bounds the "
                      "free thought of constrained decoding: set sampling.constrained and sampling.free_thought, or 0.")

  _one_of(config, "judge.mode", JUDGE_MODES)
  high, low = _get(config, "judge.likelihood_thresholds")
  if not high > low:
    raise ConfigError(
        f"config.judge.likelihood_thresholds={(high, low)!r}: the Skip threshold must exceed the Weak threshold."
    )
  _positive(config, "judge.max_new_tokens")
  thinking = _get(config, "judge.enable_thinking")  # A bool: the ConfigDict refuses other types.
  if thinking and _get(config, "judge.mode") not in JUDGE_THINKING_MODES:
    raise ConfigError(f"config.judge.enable_thinking=True with judge.mode={_get(config, 'judge.mode')!r}: only "
                      f"{JUDGE_THINKING_MODES} sample a reply that can think; the others read its first token.")
  if thinking and _get(config, "judge.max_new_tokens") < JUDGE_THINKING_MIN_TOKENS:
    raise ConfigError(f"config.judge.max_new_tokens={_get(config, 'judge.max_new_tokens')} with "
                      f"judge.enable_thinking=True: a thought and its label need >= {JUDGE_THINKING_MIN_TOKENS}.")
  # The pipeline's teacher SFT trains on judge examples too.
  trains_judge = _get(config, "sft.judge_examples") or "pipeline" in config
  if _get(config, "judge.mode") == "transcript" and trains_judge and _get(config, "env.show_admissible"):
    raise ConfigError("config.judge.mode='transcript' with judge examples in the SFT data (config.sft.judge_examples "
                      "or a pipeline) trains the judge on transcripts without admissible lists: set "
                      "config.env.show_admissible=False so that the transcripts it judges have none either.")

  _positive(config, "optim.learning_rate")
  _one_of(config, "optim.schedule", SCHEDULES)
  _positive(config, "optim.warmup_steps", allow_zero=True)
  _positive(config, "optim.weight_decay", allow_zero=True)
  _in_range(config, "optim.b1", 0.0, 1.0)
  _in_range(config, "optim.b2", 0.0, 1.0)
  _positive(config, "optim.eps")
  _positive(config, "optim.grad_clip")

  for key in ("num_steps", "batch_episodes", "micro_batches", "max_seq_len", "log_every", "eval_every",
              "ckpt_every", "keep_ckpts"):
    _positive(config, f"train.{key}")
  batch, micro = _get(config, "train.batch_episodes"), _get(config, "train.micro_batches")
  if batch % micro:
    raise ConfigError(f"config.train.batch_episodes={batch} is not divisible by config.train.micro_batches={micro}.")

  _positive(config, "eval.num_episodes", allow_zero=True)
  _positive(config, "eval.num_seeds")
  _positive(config, "eval.num_transcripts", allow_zero=True)
  for t in _get(config, "eval.temperatures"):
    if t < 0:
      raise ConfigError(f"config.eval.temperatures contains {t!r}: temperatures must be >= 0 (0 is greedy).")

  if "pipeline" in config:
    for key in ("distill_steps", "heldout_games", "sft_learning_rate"):
      _positive(config, f"pipeline.{key}")
    for role in ("teacher", "student"):  # 0 SFT updates: the given checkpoint as it is.
      steps = _get(config, f"pipeline.{role}_steps")
      _positive(config, f"pipeline.{role}_steps", allow_zero=True)
      checkpoint = role == "student" or _get(config, "teacher.kind") == "model"  # The expert teacher has none.
      if checkpoint and not steps and not _get(config, f"{role}.hf_dir") and _get(config, "stage") == "pipeline":
        raise ConfigError(f"config.pipeline.{role}_steps=0 uses the given {role} as it is, but config.{role}.hf_dir "
                          f"is empty: set it, or train the {role} from scratch with config.pipeline.{role}_steps > 0.")
    _positive(config, "pipeline.student_demos", allow_zero=True)  # 0: every demonstration.
    for key in ("student.hf_dir", "teacher.hf_dir"):
      if _get(config, key) and not _get(config, "tokenizer_dir"):
        raise ConfigError(f"config.{key} is given to the pipeline without config.tokenizer_dir: a checkpoint needs "
                          "the tokenizer it was trained with (a new one would renumber its vocabulary).")
    for key in ("dagger_rounds", "dagger_student_rounds"):
      _positive(config, f"pipeline.{key}", allow_zero=True)
      if _get(config, f"pipeline.{key}") and spec.expert is None:
        raise ConfigError(f"config.pipeline.{key} needs an env with an expert to shadow the policy; "
                          f"config.env.name={env!r} has none (set it to 0).")
    if _get(config, "pipeline.dagger_rounds") or _get(config, "pipeline.dagger_student_rounds"):
      for key in ("dagger_games", "dagger_steps", "dagger_learning_rate"):
        _positive(config, f"pipeline.{key}")
      _positive(config, "pipeline.dagger_temperature", allow_zero=True)
    for method in _get(config, "pipeline.methods"):
      if method not in losses.registered_losses():
        raise ConfigError(f"config.pipeline.methods contains {method!r}: must be among {losses.registered_losses()}.")
    _one_of(config, "pipeline.heldout_split", spec.splits)
    _one_of(config, "pipeline.sft_schedule", SCHEDULES)
    sweep = _get(config, "pipeline.sweep")
    if sweep and not re.fullmatch(r"[A-Za-z0-9_.-]+", sweep):
      raise ConfigError(f"config.pipeline.sweep={sweep!r}: must be a folder name (letters, digits, '_', '.', '-').")
    results_dir = _get(config, "pipeline.results_dir")
    if results_dir.endswith(".md"):  # The old markdown target's value: the report itself stays in the workdir.
      raise ConfigError(f"config.pipeline.results_dir={results_dir!r}: must be a folder for results.csv and the "
                        "plots (e.g. docs/results/alfworld_cpu); the markdown report is <workdir>/results/results.md.")
  elif _get(config, "stage") == "pipeline":
    raise ConfigError("config.stage='pipeline' needs a config.pipeline section (see configs/alfworld_cpu.py).")

  sizes = {axis: _get(config, f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")}
  if sum(size == -1 for size in sizes.values()) > 1:
    raise ConfigError(f"config.mesh={sizes}: at most one axis may be -1.")
  for axis, size in sizes.items():
    if size != -1 and size < 1:
      raise ConfigError(f"config.mesh.{axis}={size!r}: must be >= 1, or -1 for every remaining device.")
  return config
