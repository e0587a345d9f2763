"""The host loop of the `sft`, `distill`, `evaluate` and `export` stages.

Rollouts -> teacher scores -> judge -> batch -> the pure update of `update.py`, with eval,
metrics, transcripts and checkpoints around it. Everything here is imperative shell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from sage_opd_jax import checkpoints
from sage_opd_jax import config as config_lib
from sage_opd_jax import evaluation
from sage_opd_jax import expert_teacher
from sage_opd_jax import judge as judge_lib
from sage_opd_jax import losses
from sage_opd_jax import models
from sage_opd_jax import multihost
from sage_opd_jax import prompts
from sage_opd_jax import provenance
from sage_opd_jax import rollout as rollout_lib
from sage_opd_jax import sampling
from sage_opd_jax import sft_data
from sage_opd_jax import teacher as teacher_lib
from sage_opd_jax import update as update_lib
from sage_opd_jax import writers
from sage_opd_jax.envs import base
from sage_opd_jax.envs import demos as demos_lib
from sage_opd_jax.models import hf as hf_lib
from sage_opd_jax.models import sharding

def mesh_from_config(mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The ("data", "fsdp", "tensor") Mesh; a -1 axis takes every device the others leave.

  Without a -1 axis the mesh is exactly the sizes given, over the first devices (a warning
  says so when that leaves devices idle). A run of several processes needs one mesh over every
  device of every process (`jax.devices()` is global, in process order).
  """
  sizes = {axis: int(mesh_config[axis]) for axis in sharding.MESH_AXES}
  known = math.prod(size for size in sizes.values() if size != -1)
  devices = jax.devices()
  where = (f"the {len(devices)} devices" if jax.process_count() == 1 else
           f"the {len(devices)} devices of {jax.process_count()} processes ({jax.local_device_count()} each)")
  if known > len(devices) or (-1 in sizes.values() and len(devices) % known):
    raise config_lib.ConfigError(f"config.mesh={sizes} does not fit {where}.")
  for axis, size in sizes.items():
    if size == -1:
      sizes[axis] = len(devices) // known
  used = math.prod(sizes.values())
  if used < len(devices) and jax.process_count() > 1:
    raise config_lib.ConfigError(f"config.mesh={sizes} uses {used} of {where}: a multi-process run's mesh spans "
                                 "every device (set one axis to -1).")
  if used < len(devices):
    logging.warning("config.mesh=%s uses %d of %d devices.", sizes, used, len(devices))
  return sharding.make_mesh(sizes, devices[:used])


# ModelConfig fields that say how to run a model, not what it is. With `hf_dir` set, the
# architecture comes from the checkpoint's config.json and these still come from `model`:
# a checkpoint says nothing of the dtype or the memory settings a run needs.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention_chunk", "mlp_chunk", "scan_unroll")


def load_model(section: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None, seed: int
               ) -> nnx.Module:
  """A model from `section.hf_dir` when set, else randomly initialised from `section.model`.

  A checkpoint runs with `section.model`'s `RUNTIME_FIELDS`; mesh None puts it on one device.
  """
  if section.hf_dir:
    runtime = {field: section.model[field] for field in RUNTIME_FIELDS}
    return models.load_hf_checkpoint(section.hf_dir, mesh=mesh, **runtime)
  return sharding.create_model(models.ModelConfig.from_dict(section.model.to_dict()), mesh, seed)


def load_teacher(config: ml_collections.ConfigDict, tokenizer: Any, mesh: jax.sharding.Mesh | None) -> Any:
  """The distill stage's teacher: a model (`load_model`), or the env's expert (`config.teacher.kind`)."""
  if config.teacher.kind != expert_teacher.KIND:
    return load_model(config.teacher, mesh, config.seed + 1)
  # The expert names its action at every state through the rollout's shadow expert (`make_rollout_engine`).
  c = config.teacher.expert
  logging.warning("config.teacher.kind='expert': the teacher is the environment's expert (eps_on=%g, eps_off=%g, "
                  "eta=%g), a controlled study, not a trained teacher.", c.eps_on, c.eps_off, c.eta)
  return expert_teacher.ExpertTeacher(expert_teacher.ExpertTeacherConfig.from_config(c), tokenizer,
                                      sampling_config(config, tokenizer, config.sampling.temperature),
                                      _vocab_size(config.student), config.sampling.enable_thinking,
                                      thoughts=config.sft.thoughts, topk=config.loss.estimator == "full")


def _vocab_size(section: ml_collections.ConfigDict) -> int:
  return models.ModelConfig.from_hf(section.hf_dir).vocab_size if section.hf_dir else section.model.vocab_size


def loss_options(config: ml_collections.ConfigDict, method: str, num_turns: int | None) -> losses.LossOptions:
  """The `losses.LossOptions` of a run: `config.loss` for `method`, plus T and the teacher's V."""
  # The expert teacher's distributions live on the student's vocabulary.
  vocab = _vocab_size(config.student if config.teacher.kind == expert_teacher.KIND else config.teacher)
  return dataclasses.replace(config_lib.loss_options(config, method), num_turns=num_turns, teacher_vocab_size=vocab)


_LENGTH_WINDOW = 64  # Batches per length-sorted window of `epoch_rows`.
_WIDTH_MULTIPLE = 128  # SFT batches pad to a multiple of this: a handful of compiled shapes.


def epoch_rows(num_rows: int, batch_size: int, seed: int, step: int,
               lengths: np.ndarray | None = None) -> np.ndarray:
  """The rows of step `step`: epochs walk a fresh permutation each, seeded by (seed, epoch).

  A pure function of the step, so a resumed run needs no data cursor to see the same data.
  With `lengths` (one per row), each epoch's batches are length-grouped: the permutation is
  cut into windows of `_LENGTH_WINDOW` batches, each window sorted by length, and the batches
  then shuffled, so a batch pads to its own longest row rather than to the data's.
  """
  num_batches = num_rows // batch_size
  epoch, index = divmod(step, num_batches)
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(num_rows)
  if lengths is not None:
    if len(lengths) != num_rows:
      raise ValueError(f"epoch_rows: lengths has {len(lengths)} entries for num_rows={num_rows}.")
    order = order[: num_batches * batch_size]  # The rows an epoch drops stay random.
    window = _LENGTH_WINDOW * batch_size
    order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                            for chunk in np.split(order, range(window, len(order), window))])
    order = order.reshape(num_batches, batch_size)[rng.permutation(num_batches)].reshape(-1)
  return order[index * batch_size : (index + 1) * batch_size]


class SftSource:
  """Off-policy batches from expert demonstrations (and judge examples): the `sft` row of docs/method.md."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any):
    demos_dir = pathlib.Path(config.sft.demos_dir)
    if not (demos_dir / demos_lib.DEMOS).exists():
      raise FileNotFoundError(
          f"config.sft.demos_dir={str(demos_dir)!r} has no {demos_lib.DEMOS}; run the collect_demos stage first."
      )
    demonstrations = sft_data.read_demonstrations(demos_dir, config.sft.thoughts, limit=config.sft.max_demos,
                                                  renamed_copies=config.sft.renamed_copies,
                                                  renumbered_copies=config.sft.renumbered_copies, seed=config.seed)
    extra_demos = []
    for folder in config.sft.extra_demos_dirs:
      if not (pathlib.Path(folder) / demos_lib.DEMOS).exists():
        raise FileNotFoundError(f"config.sft.extra_demos_dirs holds {folder!r}, which has no {demos_lib.DEMOS}; "
                                "collect its expert pass or DAgger corrections (sage_opd_jax/dagger.py) first.")
      extra_demos += sft_data.read_demonstrations(folder, config.sft.thoughts)
    judge_examples = []
    if config.sft.judge_examples:
      judge_examples = sft_data.read_judge_examples(demos_dir, sft_data.judge_window(config.judge),
                                                    config.sft.thoughts)
      if config.sft.max_judge_examples:
        judge_examples = judge_examples[: config.sft.max_judge_examples]
    # The contexts the rollout acts from: turns past the history window lose the oldest ones. A window that
    # the env's turn cap never passes leaves every acting context whole, and the demos as they are.
    window = config.env.history_turns if config.env.history_turns + 1 < config.env.max_turns else None
    windows = [part for demo in [*demonstrations, *extra_demos] for part in sft_data.windowed(demo, window)]
    data = sft_data.build_sft_data(
        tokenizer, windows, judge_examples, config.train.max_seq_len,
        history_turns=config.judge.history_turns, show_admissible=config.env.show_admissible,
        judge_admissible=config.judge.show_admissible,
        judge_transcript=judge_lib.judge_mode(config.judge.mode).asks_in_transcript,
        judge_thinking=config.judge.enable_thinking, seed=config.seed,
        enable_thinking=config.sampling.enable_thinking,
    )
    self.arrays = {k: data.arrays[k] for k in ("tokens", "attention_mask", "turn_ids")}
    self.num_rows = len(self.arrays["tokens"])
    self.lengths = self.arrays["attention_mask"].sum(axis=1)
    self.seq_len = config.train.max_seq_len
    self.batch_size = config.train.batch_episodes
    self.seed = config.seed
    if self.num_rows < self.batch_size:
      raise ValueError(
          f"{self.num_rows} SFT samples from {demos_dir} are fewer than config.train.batch_episodes="
          f"{self.batch_size}."
      )
    self.info = {"sft/samples": self.num_rows, "sft/demos": len(demonstrations), "sft/extra_demos": len(extra_demos),
                 "sft/judge_examples": len(judge_examples), "sft/truncated": data.num_truncated,
                 "sft/dropped": data.num_dropped}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Step `step`'s rows, cut to their longest row rounded up to `_WIDTH_MULTIPLE`."""
    rows = epoch_rows(self.num_rows, self.batch_size, self.seed, step, lengths=self.lengths)
    width = min(self.seq_len, -(-int(self.lengths[rows].max()) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE)
    return {k: v[rows, :width] for k, v in self.arrays.items()}


def teacher_support(config: ml_collections.ConfigDict, vocab_size: int, num_tokens: int = 0) -> int:
  """-> K, the teacher tokens per position that the loss needs: 0 unless estimator='full' (E2/E10).

  The exact divergence reads the teacher's top-K with K = V (`losses.topk_divergence` is exact
  there); `config.teacher.top_k` trades that for [B, S, K] memory at a large vocabulary. With
  `config.sampling.mask_unused_ids`, V is the tokenizer's `num_tokens` (the rows past it are
  padding, out of the support).
  """
  if config.loss.estimator != "full":
    return 0
  if config.sampling.mask_unused_ids and num_tokens:
    vocab_size = min(vocab_size, num_tokens)
  top_k = config.teacher.top_k or vocab_size
  if top_k > vocab_size:
    raise config_lib.ConfigError(f"config.teacher.top_k={top_k} exceeds the teacher's vocabulary ({vocab_size}).")
  return top_k


class DistillSource:
  """On-policy batches: student rollouts, teacher scores and (SAGE variants) judge labels.

  The student's tasks of step `s` are `epoch_rows` of the train split, and every random
  draw uses `fold_in(key(seed), s)`, so a resumed run replays exactly the batches an
  uninterrupted one would have seen. With several processes each plays its `multihost.share`
  of the batch (episode draws keyed by global index) and the episodes are gathered, so the
  scoring, the judge and the batch are those of one process playing them all.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, teacher: nnx.Module,
               engine: rollout_lib.RolloutEngine, tasks: Sequence[base.Task],
               batch_sharding: jax.sharding.Sharding):
    self.config = config
    self.tokenizer = tokenizer
    self.teacher = teacher
    self.engine = engine
    self.batch_sharding = batch_sharding
    self.tasks = list(tasks)
    self.batch_size = config.train.batch_episodes
    if len(self.tasks) < self.batch_size:
      raise ValueError(f"{len(self.tasks)} train tasks are fewer than config.train.batch_episodes={self.batch_size}.")
    self.judge_config = judge_lib.JudgeConfig.from_config(config.judge)
    self.judge = judge_lib.make_judge(self.judge_config, teacher=teacher, tokenizer=tokenizer)
    self.variant = losses.variant(config.method)
    self.expert = getattr(teacher, "kind", None) == expert_teacher.KIND  # The env's expert as the teacher.
    self.teacher_vocab = teacher.vocab_size if self.expert else teacher.config.vocab_size
    self.teacher_top_k = teacher_support(config, self.teacher_vocab, len(tokenizer))
    self.vocab_limit = len(tokenizer) if config.sampling.mask_unused_ids else 0

  def tasks_for(self, step: int) -> list[base.Task]:
    return [self.tasks[i] for i in epoch_rows(len(self.tasks), self.batch_size, self.config.seed, step)]

  def batch(self, step: int, student: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, float], Any]:
    """-> (loss arrays, host metrics, the rollout batch, for transcripts)."""
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
    rollout_key, judge_key, intervene_key = jax.random.split(key, 3)
    tasks = self.tasks_for(step)
    seq_len = self.config.train.max_seq_len
    timer = _Timer()
    metrics: dict[str, float] = {}
    with timer("rollout"):
      batch = play_share(self.engine, student, tasks, rollout_key, seq_len=seq_len)
    metrics.update(rollout_metrics([batch], prefix="rollout/"))
    # Where the rollout's wall time went: the sampler (compiles included) and waits on the env workers.
    metrics.update({"time/rollout_model": batch.stats.model_s, "time/rollout_env_wait": batch.stats.env_wait_s})
    if self.variant.rollouts == 2:
      # E.g. the opd_two_rollout row of docs/method.md: a second rollout of the same tasks in which the teacher
      # replaces every turn it judges Strong, before the env steps; both train with the method's loss.
      with timer("rollout_intervened"):
        second = self.engine.run(student, tasks, jax.random.fold_in(rollout_key, 1), seq_len=seq_len,
                                 intervene=self.intervention_hook(intervene_key))
      metrics["rollout/intervened_frac"] = float(second.intervened.sum() / max(second.num_turns.sum(), 1))
      metrics.update(rollout_metrics([second], prefix="rollout_intervened/"))
      batch = rollout_lib.assemble_batch(batch.episodes + second.episodes, self.config.env.max_turns,
                                         self.engine.sampling_config.pad_id, seq_len=seq_len)
    arrays = batch.arrays()
    judged = self.score_and_judge(batch.episodes, arrays, judge_key, timer, judge=self.variant.needs_labels,
                                  top_k=self.teacher_top_k)
    if judged is not None:
      arrays["labels"] = judged.labels
      num_turns = arrays["valid"].shape[1]
      confidence_BxT = losses.turn_confidence(
          arrays["teacher_top1"], arrays["teacher_entropy"], arrays["turn_ids"], num_turns,
          "turn_mean_top1" if self.config.loss.confidence in ("token_top1", "none") else self.config.loss.confidence,
          self.teacher_vocab)
      metrics.update(judge_lib.judge_metrics(judged, batch.episodes, self.judge_config.mode,
                                             confidence_BxT=np.asarray(confidence_BxT)))
    if self.expert:  # Every row of a controlled study says so, with its knob.
      metrics.update(self.teacher.metrics(batch.episodes))
    metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
    return arrays, metrics, batch

  def score_and_judge(self, episodes: Sequence[rollout_lib.Episode], arrays: dict[str, np.ndarray],
                      key: jax.Array, timer: _Timer, *, judge: bool, top_k: int) -> judge_lib.JudgeResult | None:
    """Adds the teacher's scores of the episodes' batch `arrays` to them; with `judge`, labels its turns.

    `top_k`: teacher tokens per position to score too (`teacher_support`; 0 when only the judge reads them).
    """
    num_turns = arrays["valid"].shape[1]
    questions = None
    if judge:
      # Questions that ride in the teacher's scoring forward (the transcript judge's; its "judge"
      # time is the host work around it).
      with timer("judge"):
        questions = self.judge.prepare(episodes, num_turns, arrays)
    with timer("teacher"):
      if self.expert:
        arrays.update(self.teacher.score(episodes, arrays))
        return self.judge.label(episodes, num_turns, arrays, None, key) if judge else None
      tokens, mask = jax.device_put((arrays["tokens"], arrays["attention_mask"]), self.batch_sharding)
      scores = teacher_lib.score_batch(
          self.teacher, tokens, mask, chunk_size=self.config.teacher.score_chunk, top_k=top_k,
          temperature=self.config.teacher.temperature, vocab_limit=self.vocab_limit,
          questions=None if questions is None else jax.device_put(questions.arrays(), self.batch_sharding),
          packing=jax.device_put({k: arrays[k] for k in teacher_lib.PACKING_KEYS}, self.batch_sharding),
          micro_batches=self.config.train.micro_batches)  # The update's row groups: one at a time, for memory.
      arrays.update(multihost.to_host(scores))
    answers = {"answer_logits": arrays.pop("answer_logits")} if "answer_logits" in arrays else {}
    if not judge:
      return None
    with timer("judge"):
      return self.judge.label(episodes, num_turns, dict(arrays, **answers), questions, key)

  def intervention_hook(self, key: jax.Array) -> rollout_lib.Intervene:
    """The `opd_two_rollout` hook: Strong turns get the teacher's own response.

    The env has not answered yet when the hook runs, so the judge sees the turn with its
    feedback marked as not yet known: an unparseable or inadmissible action is Strong by rule
    (E5), and the rest go to the run's judge (`_judge_pending`).
    """
    calls = iter(range(1 << 30))

    def hook(states: Sequence[rollout_lib.TurnState]) -> dict[int, list[int]]:
      call_key = jax.random.fold_in(key, next(calls))
      strong = [s for s in states if s.action is None or s.action not in s.admissible]
      asked = [s for s in states if s not in strong]
      if asked:
        strong += [s for s, label in zip(asked, self._judge_pending(asked, jax.random.fold_in(call_key, 0)))
                   if label == losses.Label.STRONG]
      if not strong:
        return {}
      # The teacher's replacement is decoded as the student's turn was: constrained, if the run is.
      responses = self.engine.respond(self.teacher, strong, jax.random.fold_in(call_key, 1))
      return {s.episode: response for s, response in zip(strong, responses)}

    return hook

  def _judge_pending(self, states: Sequence[rollout_lib.TurnState], key: jax.Array) -> np.ndarray:
    """[len(states)] labels of turns the env has not answered.

    A judge that reads the scored transcript gets each turn as the one turn of an episode whose
    prompt is the turn's own context, so that the teacher reads what the student read (its
    history window included); the rows are padded with empty episodes to the update's batch
    size, which the batch sharding divides. A judge that reads the turn as text gets it after
    its history, whose turns are shown but not judged.
    """
    def pending(s: rollout_lib.TurnState) -> rollout_lib.Turn:
      return rollout_lib.Turn(
          observation=s.observation, admissible=list(s.admissible), response=s.response,
          response_tokens=list(s.response_tokens), response_end=s.response_end,
          response_logprobs=np.zeros(len(s.response_tokens), np.float32), action=s.action,
          feedback=prompts.NOT_EXECUTED, valid=True, expert_action=s.expert_action)

    if not self.judge.reads_transcript:
      episodes = [rollout_lib.Episode(task=s.task, task_text=s.task_text,
                                      turns=[*(dataclasses.replace(t, valid=False) for t in s.history), pending(s)])
                  for s in states]
      lasts = [len(e.turns) - 1 for e in episodes]
      judged = self.judge.label(episodes, max(lasts) + 1, rng=key)
      return judged.labels[np.arange(len(states)), lasts]
    episodes = [rollout_lib.Episode(task=s.task, task_text=s.task_text, prompt_tokens=list(s.context),
                                    turns=[pending(s)]) for s in states]
    episodes += [rollout_lib.Episode(task=states[0].task) for _ in range(self.batch_size - len(states))]
    batch = rollout_lib.assemble_batch(episodes, 1, self.engine.sampling_config.pad_id)
    # The judge reads the teacher's token log-probs or answers only, never its top-k.
    judged = self.score_and_judge(episodes, batch.arrays(), key, _Timer(), judge=True, top_k=0)
    return judged.labels[:len(states), 0]


class _Timer:
  """Accumulates wall seconds per named phase: `with timer("rollout"): ...`."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def make_rollout_engine(config: ml_collections.ConfigDict, tokenizer: Any,
                        expert: bool = False) -> rollout_lib.RolloutEngine:
  """The rollout engine (and its env worker pool) of a run; close it at the end.

  With `expert` (or judge.mode="oracle", analysis only) the env's expert names its action at
  every state: the env's `EnvSpec.expert` shadows each episode in its worker.
  """
  oracle = (expert or config.teacher.kind == expert_teacher.KIND
            or (judge_lib.judge_mode(config.judge.mode).needs_expert and losses.variant(config.method).uses_judge))
  spec = base.spec(config.env.name)
  if oracle and spec.expert is None:
    raise config_lib.ConfigError(
        f"config.env.name={config.env.name!r} has no expert to shadow the episodes (judge.mode='oracle', DAgger).")
  settings = rollout_lib.RolloutConfig(
      max_turns=config.env.max_turns,
      history_turns=config.env.history_turns,
      constrained=config.sampling.constrained,
      show_admissible=config.env.show_admissible,
      # An episode whose transcript would outgrow the update's static length ends there.
      max_context_tokens=config.train.max_seq_len,
      expert=spec.expert if oracle else None,
      enable_thinking=config.sampling.enable_thinking,
      min_cache_len=config.sampling.min_cache_len,
      min_chunk_len=config.sampling.min_chunk_len,
      min_trie_shape=tuple(config.sampling.min_trie_shape),
  )
  return rollout_lib.RolloutEngine(
      tokenizer, settings, sampling_config(config, tokenizer, config.sampling.temperature),
      env_name=config.env.name, env_kwargs=dict(env_kwargs(config), **(spec.expert_kwargs if oracle else {})),
      num_workers=config.env.num_workers, timeout_s=config.env.step_timeout_s,
  )


def sampling_config(config: ml_collections.ConfigDict, tokenizer: Any, temperature: float) -> sampling.SamplingConfig:
  return rollout_lib.default_sampling_config(
      tokenizer, config.sampling.max_new_tokens, temperature=temperature,
      top_k=config.sampling.top_k, top_p=config.sampling.top_p, free_thought=config.sampling.free_thought,
      max_thought_tokens=config.sampling.max_thought_tokens, enable_thinking=config.sampling.enable_thinking,
      mask_unused_ids=config.sampling.mask_unused_ids,
  )


def play_share(engine: rollout_lib.RolloutEngine, model: nnx.Module, tasks: Sequence[base.Task], rng: jax.Array,
               first_id: int = 0, **run_kwargs) -> rollout_lib.RolloutBatch:
  """Every process plays its `multihost.share` of `tasks` with its `model`; all get the whole batch.

  Episode i is keyed by `first_id + i` wherever it is played, so the batch is that of one
  process playing every task. `model` must be on this process's devices (`multihost.local_model`).
  """
  mine = multihost.share(len(tasks))
  if jax.process_count() == 1:
    return engine.run(model, tasks, rng, episode_ids=[first_id + i for i in mine], **run_kwargs)
  episodes = []
  if len(mine):
    played = engine.run(model, [tasks[i] for i in mine], rng, episode_ids=[first_id + i for i in mine], **run_kwargs)
    episodes = played.episodes
  episodes = multihost.gather(episodes)
  config = run_kwargs.get("config") or engine.config
  return rollout_lib.assemble_batch(episodes, config.max_turns, engine.sampling_config.pad_id,
                                    seq_len=run_kwargs.get("seq_len"))


def rollout_metrics(batches: Sequence[Any], prefix: str) -> dict[str, float]:
  """The metrics of docs/method.md over the episodes of one or more rollout batches."""
  width = max(b.valid.shape[1] for b in batches)

  def cat(key, pad_turns=False):
    parts = [np.asarray(getattr(b, key)) for b in batches]
    if pad_turns:
      parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts]
    return np.concatenate(parts)

  episodes = [e for b in batches for e in b.episodes]
  return evaluation.episode_metrics(
      won_B=cat("won"), num_turns_B=cat("num_turns"), valid_BxT=cat("valid", True),
      repeated_BxT=cat("repeated", True), task_types=[e.task.task_type for e in episodes],
      cut_B=np.array([e.budget_ended for e in episodes], bool), prefix=prefix,
  )


def eval_tasks(env: base.Env, config: ml_collections.ConfigDict) -> dict[str, list[base.Task]]:
  """The fixed evaluation subset: the first `eval.num_episodes` tasks of each split's seeded order."""
  return {split: list(env.tasks(split))[: config.eval.num_episodes] for split in config.env.eval_splits}


def evaluate(config, model, tokenizer, engine, tasks_by_split, *, step: int, workdir: pathlib.Path,
             writer: writers.MetricWriter) -> dict[str, float]:
  """Success, turns, invalid and repeated rates per split and temperature; writes transcripts.

  `model` is on this process's devices (`multihost.local_model`): each process plays its share
  of every chunk of games (`play_share`), and every process gets the same metrics.
  """
  metrics: dict[str, float] = {}
  for split, tasks in tasks_by_split.items():
    for temperature in config.eval.temperatures:
      seeds = range(config.eval.num_seeds) if temperature > 0 else range(1)
      runs = []
      for seed in seeds:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1_000_003), seed)
        tag = f"eval/{split}/t{temperature:g}"
        batches = [
            play_share(engine, model, tasks[i : i + config.train.batch_episodes], key, first_id=i,
                       sampling_config=sampling_config(config, tokenizer, temperature))
            for i in range(0, len(tasks), config.train.batch_episodes)
        ]
        runs.append(rollout_metrics(batches, prefix=""))
        if seed == 0 and config.eval.num_transcripts:
          transcripts = [transcript(e) for b in batches for e in b.episodes][: config.eval.num_transcripts]
          writers.write_transcripts(workdir / "transcripts" / f"step{step}_{split}_t{temperature:g}.jsonl", transcripts)
      for k, (mean, std) in evaluation.mean_and_std(runs).items():
        metrics[f"{tag}/{k}"] = mean
        if len(runs) > 1:
          metrics[f"{tag}/{k}_std"] = std
  writer.write(step, metrics)
  return metrics


def env_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Constructor arguments of the configured environment.

  Every env takes max_turns, seed and task_types; the env's own settings come from its
  `EnvSpec.config_kwargs`. A set `config.env` key that the env does not read is an error.
  """
  name = config.env.name
  spec = base.spec(name)
  for key, value in config.env.items():
    if value and key not in base.COMMON_CONFIG_KEYS and key not in spec.own_keys:
      raise config_lib.ConfigError(
          f"config.env.{key}={value!r} is not a setting of the {name!r} env (its own: {spec.own_keys}).")
  return {"max_turns": config.env.max_turns, "seed": config.seed, "task_types": list(config.env.task_types) or None,
          **spec.config_kwargs(config.env)}


def _host_state(config: ml_collections.ConfigDict, step: int, batch_size: int) -> dict[str, Any]:
  # The task cursor is derivable from the step; it is saved so the checkpoint says where
  # the data stood without re-deriving it, and checked on resume.
  return {"step": step, "task_cursor": step * batch_size, "config": config.to_dict()}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """The `sft` and `distill` stages: resume, loop, evaluate, checkpoint, export at the end."""
  workdir = pathlib.Path(workdir)
  provenance.check(config, workdir)  # Before anything is built: a resume must be the same run.
  stage = config.stage
  # The sft stage trains demonstrations: with `config.method` when that needs no teacher, else with sft.
  method = config.method if stage == "distill" or not losses.variant(config.method).needs_teacher else "sft"
  config_lib.check_processes(config, jax.process_count())
  mesh = mesh_from_config(config.mesh)
  tokenizer = shared_tokenizer(config, stage)
  check_vocabularies(config, tokenizer, ("student",) if stage == "sft" or config.teacher.kind != "model"
                     else ("student", "teacher"))
  student = load_model(config.student, mesh, config.seed)
  graphdef = nnx.graphdef(student)
  num_steps, batch_size = config.train.num_steps, config.train.batch_episodes
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise config_lib.ConfigError(
        f"config.train.batch_episodes={batch_size} must divide over the mesh's data x fsdp = {shards} shards.")
  # The rate of every update, an input of the one compiled update that stages of any length and rate share.
  learning_rates = update_lib.learning_rates(config.optim, num_steps)
  tx = update_lib.make_optimizer(config.optim)
  state, state_sharding = update_lib.place_state(update_lib.init_train_state(student, tx, config.seed), mesh)
  del student  # The state owns the params now; the update donates them.

  checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", save_every=config.train.ckpt_every,
                                          keep=config.train.keep_ckpts)
  restored = checkpointer.restore(checkpoints.abstract_like(state))
  if restored is not None:
    state, host = restored
    if host["task_cursor"] != int(state.step) * batch_size:
      raise ValueError(f"Checkpoint in {workdir} has task_cursor={host['task_cursor']} at step {int(state.step)}: "
                       f"it was written with another config.train.batch_episodes.")
    logging.info("Resuming %s from step %d.", workdir, int(state.step))

  # SFT trains every response token of a demonstration, however many turns it has.
  loss_fn, totals_fn = update_lib.make_loss_fns(
      loss_options(config, method, None if stage == "sft" else config.env.max_turns), config.student.loss_chunk)
  update = update_lib.jit_update(
      update_lib.make_update_fn(graphdef, tx, loss_fn, totals_fn, micro_batches=config.train.micro_batches),
      state_sharding, sharding.batch_sharding(mesh),
  )

  def place(arrays):
    # Every process holds the whole host batch (gathered episodes, or the same demonstrations), and
    # each puts its own devices' rows of it on the mesh.
    return jax.device_put({k: arrays[k] for k in update_lib.loss_keys(arrays)}, sharding.batch_sharding(mesh))

  writer = writers.MetricWriter(workdir)
  engine = None
  try:
    if stage == "distill" or config.eval.num_episodes:
      engine = make_rollout_engine(config, tokenizer)
      env = base.make(config.env.name, **env_kwargs(config))
      train_tasks, tasks_by_split = env.tasks(config.env.train_split), eval_tasks(env, config)
      env.close()
    if stage == "sft":
      source = SftSource(config, tokenizer)
      writer.write(int(state.step), source.info)
    else:
      teacher = load_teacher(config, tokenizer, mesh)
      source = DistillSource(config, tokenizer, teacher, engine, train_tasks, sharding.batch_sharding(mesh))

    def acting_student() -> nnx.Module:
      """The current params on this process's devices, for its rollouts and evals."""
      return multihost.local_model(nnx.merge(graphdef, state.params), mesh)

    metrics: dict[str, float] = {}
    start = int(state.step)
    skipped = 0
    if start and _eval_due(config, start, num_steps) and not multihost.agree(_evaluated(workdir, start)):
      # Killed after an eval step's checkpoint but before its eval finished (a crash while
      # compiling the eval, say): run it now, or the run would export without it.
      metrics.update(evaluate(config, acting_student(), tokenizer, engine, tasks_by_split, step=start,
                              workdir=workdir, writer=writer))
    for step in tqdm.trange(start, num_steps, initial=start, total=num_steps, desc=f"{stage} {method}"):
      timer = _Timer()
      with timer("data"):
        if stage == "sft":
          arrays, host_metrics, rollout = source.batch(step), {}, None
        else:
          student = acting_student()
          arrays, host_metrics, rollout = source.batch(step, student)
          del student
      with timer("update"):
        state, train_metrics = update(state, place(arrays), learning_rates[step])
        train_metrics = jax.device_get(train_metrics)
      skipped += bool(train_metrics["update_skipped"])
      metrics = {f"train/{k}": v for k, v in train_metrics.items()}
      metrics.update(host_metrics)
      metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
      if (step + 1) % config.train.log_every == 0 or step + 1 == num_steps:
        writer.write(step + 1, metrics)
      checkpointer.save(step + 1, state, _host_state(config, step + 1, batch_size), force=step + 1 == num_steps)
      if _eval_due(config, step + 1, num_steps):
        metrics.update(evaluate(config, acting_student(), tokenizer, engine, tasks_by_split, step=step + 1,
                                workdir=workdir, writer=writer))
        if rollout is not None and config.eval.num_transcripts:
          writers.write_transcripts(workdir / "transcripts" / f"step{step + 1}_train.jsonl",
                                    train_transcripts(rollout, arrays, config))
    checkpointer.wait()
    if skipped == num_steps - start and multihost.agree(_no_update_applied(workdir)):  # A resume that ran none reads the log.
      raise RuntimeError(
          f"Every update of {workdir} was skipped: the loss, the gradient or the new weights were non-finite at "
          "each step (train/update_skipped in metrics.jsonl), so the student never trained and is not exported. "
          "Check config.optim and the teacher's and student's vocabularies.")
    export(nnx.merge(graphdef, state.params), mesh, writers.export_dir(workdir))
    return metrics
  finally:
    checkpointer.close()
    writer.close()
    if engine is not None:
      engine.close()


def export(model: nnx.Module, mesh: jax.sharding.Mesh, out: pathlib.Path) -> None:
  """The model as a Hugging Face directory, written by one process (every process must call this)."""
  model = multihost.local_model(model, mesh)
  if multihost.is_writer():
    models.save_hf_checkpoint(model, out)
  multihost.barrier("sage_opd_jax.train.export")


def _eval_due(config: ml_collections.ConfigDict, step: int, num_steps: int) -> bool:
  """Whether the loop evaluates after update `step` (every `eval_every`, and after the last)."""
  return bool(config.eval.num_episodes) and (step % config.train.eval_every == 0 or step == num_steps)


def _no_update_applied(workdir: pathlib.Path) -> bool:
  """Whether the metrics log holds updates and every one was skipped (the last row per step: a resume rewrites)."""
  skipped = {row["step"]: row["train/update_skipped"] for row in writers.rows_with(workdir, "train/update_skipped")}
  return bool(skipped) and all(skipped.values())


def _evaluated(workdir: pathlib.Path, step: int) -> bool:
  """Whether the metrics log holds an eval of `step` (`evaluate` writes its row once, at the end)."""
  return any(row["step"] == step for row in writers.rows_with(workdir, "eval/"))


def shared_tokenizer(config: ml_collections.ConfigDict, stage: str) -> Any:
  """`config.tokenizer_dir`'s tokenizer; a folder without one (e.g. a checkpoint's weights alone) is named."""
  if not config.tokenizer_dir:
    raise config_lib.ConfigError(f"config.tokenizer_dir is empty: the {stage} stage needs the shared tokenizer.")
  if pathlib.Path(config.tokenizer_dir).is_dir() and not hf_lib.has_tokenizer(config.tokenizer_dir):
    raise config_lib.ConfigError(
        f"config.tokenizer_dir={config.tokenizer_dir!r} holds no tokenizer (no tokenizer.json, tokenizer_config.json, "
        "vocab.json or tokenizer.model): point it at the folder of the tokenizer the checkpoints were trained with.")
  return models.load_tokenizer(config.tokenizer_dir)


def check_vocabularies(config: ml_collections.ConfigDict, tokenizer: Any, roles: Sequence[str]) -> None:
  """The models of `roles` ("student", "teacher") read and write `config.tokenizer_dir`'s token ids.

  Checked before any model is built, whatever their source: each has room for every token; a
  checkpoint that ships a tokenizer has exactly this one (token-to-id map and special tokens),
  since a teacher scoring the student's tokens by another numbering trains on noise; and with
  loss.estimator='full' both have one vocabulary size, as the divergence compares whole rows.
  `config.sampling.enable_thinking` needs `<think>` and `</think>` as tokens of their own.
  """
  try:
    prompts.check_thinking(tokenizer, config.sampling.enable_thinking)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.sampling.{e} (config.tokenizer_dir={config.tokenizer_dir!r})") from None
  sizes = {}
  for role in roles:
    section = config[role]
    if section.hf_dir:
      sizes[role] = models.ModelConfig.from_hf(section.hf_dir).vocab_size
      if hf_lib.has_tokenizer(section.hf_dir):
        own = models.load_tokenizer(section.hf_dir, require_chat_template=False)
        if problems := hf_lib.tokenizer_differences(tokenizer, own):
          raise config_lib.ConfigError(
              f"config.{role}.hf_dir={section.hf_dir!r} ships a tokenizer other than config.tokenizer_dir="
              f"{config.tokenizer_dir!r}: {'; '.join(problems)}. Teacher, student and tokenizer must share one.")
    else:
      sizes[role] = section.model.vocab_size
    if sizes[role] < len(tokenizer):
      raise config_lib.ConfigError(
          f"config.{role}: the model's vocab_size={sizes[role]} is smaller than the tokenizer's {len(tokenizer)} "
          f"tokens (config.tokenizer_dir={config.tokenizer_dir!r}).")
  if "teacher" in sizes and config.loss.estimator == "full" and sizes["teacher"] != sizes["student"]:
    names = {role: f"config.{role}.hf_dir={config[role].hf_dir!r}" if config[role].hf_dir
             else f"config.{role}.model" for role in ("teacher", "student")}
    raise config_lib.ConfigError(
        f"The teacher's vocab_size={sizes['teacher']} ({names['teacher']}) differs from the student's "
        f"{sizes['student']} ({names['student']}): config.loss.estimator='full' compares their distributions "
        "over one vocabulary.")


def transcript(episode: Any, labels_T: np.ndarray | None = None, weights_T: np.ndarray | None = None) -> dict:
  """One episode as a readable record: per turn the observation, response, action, feedback,
  validity and, when given, the judge label and the turn weight w_t."""
  turns = []
  for t, turn in enumerate(episode.turns):
    row = {"turn": t + 1, "observation": turn.observation, "response": turn.response, "action": turn.action,
           "feedback": turn.feedback, "valid": turn.valid, "repeated": turn.repeated}
    if labels_T is not None:
      row["label"] = prompts.LABEL_NAMES[int(labels_T[t])]
    if weights_T is not None:
      row["weight"] = float(weights_T[t])
    turns.append(row)
  return {"task_id": episode.task.task_id, "task_type": episode.task.task_type, "task": episode.task_text,
          "won": episode.won, "error": episode.error, "turns": turns}


def train_transcripts(rollout: Any, arrays: Mapping[str, np.ndarray], config: ml_collections.ConfigDict) -> list[dict]:
  """The first `eval.num_transcripts` training episodes with their labels and turn weights w_t."""
  num_turns = arrays["valid"].shape[1]
  options = loss_options(config, config.method, num_turns)
  batch = {k: jnp.asarray(arrays[k]) for k in update_lib.loss_keys(arrays)}
  weights_BxT = np.asarray(losses.turn_mean(losses.token_weights(batch, options), batch["turn_ids"], num_turns))
  labels = arrays.get("labels")
  return [
      transcript(e, None if labels is None else labels[b], weights_BxT[b])
      for b, e in enumerate(rollout.episodes[: config.eval.num_transcripts])
  ]


def evaluate_stage(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """The `evaluate` stage: the student of `config.student` on the eval splits."""
  workdir = pathlib.Path(workdir)
  provenance.check(config, workdir)
  mesh = mesh_from_config(config.mesh)
  tokenizer = shared_tokenizer(config, "evaluate")
  check_vocabularies(config, tokenizer, ("student",))
  student = load_model(config.student, mesh, config.seed)  # Refuses non-finite weights (models.load_hf_checkpoint).
  env = base.make(config.env.name, **env_kwargs(config))
  tasks_by_split = eval_tasks(env, config)
  env.close()
  writer = writers.MetricWriter(workdir)
  student = multihost.local_model(student, mesh)
  try:
    with make_rollout_engine(config, tokenizer) as engine:
      return evaluate(config, student, tokenizer, engine, tasks_by_split, step=0, workdir=workdir, writer=writer)
  finally:
    writer.close()


def export_stage(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  """The `export` stage: the latest checkpoint of `workdir` as a Hugging Face directory."""
  workdir = pathlib.Path(workdir)
  # Reads the run's checkpoints only: any stage may export them, but the model must be the run's.
  provenance.check(config, workdir, write=False, also_allowed=("stage",))
  mesh = mesh_from_config(config.mesh)
  student = load_model(config.student, mesh, config.seed)
  graphdef = nnx.graphdef(student)
  tx = update_lib.make_optimizer(config.optim)
  state, _ = update_lib.place_state(update_lib.init_train_state(student, tx, config.seed), mesh)
  checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", save_every=1, keep=config.train.keep_ckpts)
  try:
    restored = checkpointer.restore(checkpoints.abstract_like(state))
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint under {workdir / 'checkpoints'} to export.")
  out = writers.export_dir(workdir)
  export(nnx.merge(graphdef, restored[0].params), mesh, out)
  logging.info("Exported step %d to %s.", int(restored[0].step), out)
  return out
