"""End to end on the hand-written fixture games: every method, exact resume, bad configs.

These run the real stack (env worker processes on the TextWorld engine, the jitted sampler,
teacher scoring, the judge, the sharded update, orbax) at toy sizes.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sage_opd_jax import config as config_lib
from sage_opd_jax import dagger
from sage_opd_jax import losses
from sage_opd_jax import models
from sage_opd_jax import pipeline
from sage_opd_jax import prompts
from sage_opd_jax import sft_data
from sage_opd_jax import tokenization
from sage_opd_jax import train
from sage_opd_jax import update as update_lib
from sage_opd_jax import writers
from sage_opd_jax.envs import base as envs_base
from sage_opd_jax.envs import demos as demos_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "alfworld"
TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
            max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return tokenization.build_alfworld_tokenizer(FIXTURE_DATA, tmp_path_factory.mktemp("tokenizer"))


def tiny_config(tokenizer_dir, method="sage_opd", **overrides):
  config = base.get_config()
  config.stage = "distill"
  config.method = method
  config.tokenizer_dir = str(tokenizer_dir)
  vocab = -(-len(models.load_tokenizer(tokenizer_dir)) // 64) * 64
  config.student.model = base.tiny_model(vocab_size=vocab, **TINY)
  config.teacher.model = base.tiny_model(vocab_size=vocab, **dict(TINY, hidden_size=48, head_dim=24))
  config.env.data_dir = str(FIXTURE_DATA)
  config.env.train_split = "valid_seen"  # The fixture's split with two games.
  config.env.eval_splits = ("valid_seen",)
  config.env.max_turns = 3
  config.env.history_turns = 1
  config.env.num_workers = 2
  config.sampling.max_new_tokens = 8
  config.judge.max_new_tokens = 2
  config.train.num_steps = 2
  config.train.batch_episodes = 2
  config.train.micro_batches = 2
  config.train.max_seq_len = 512
  config.train.eval_every = 2
  config.train.ckpt_every = 1
  config.eval.num_episodes = 2
  config.eval.num_transcripts = 1
  config.teacher.score_chunk = 64
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 1  # Batch 2 over 2 of the 8 fake devices.
  config.update_from_flattened_dict(overrides)
  return config_lib.validate(config)


DISTILL_METHODS = tuple(m for m in losses.registered_losses() if losses.variant(m).needs_teacher)


def packed_logits(model, arrays):
  """[B, S, V] logits of a rollout batch's rows as the batch packs them: the turns past the history
  window (tiny_config's window is 1 of 3 turns) each in their own segment, with their own positions."""
  tokens, positions, mask, segments, reach = (jnp.asarray(arrays[k]) for k in (
      "tokens", "positions", "attention_mask", "segments", "reach"))
  return model.lm_logits(model.hidden_states(tokens, positions, mask, segments=segments, reach=reach))


class FirstBatch:
  """A spy on `DistillSource.batch`: keeps the arrays of the first update's batch, with the log-probs and
  logits the student had for them, before the update consumes (and donates) its params."""

  def __init__(self):
    self.arrays: dict[str, np.ndarray] = {}
    self.rollout = None
    self._batch = train.DistillSource.batch

  def __call__(self, source, step, student):
    arrays, metrics, rollout = self._batch(source, step, student)
    if step == 0:
      logits_BxSxV = packed_logits(student, arrays)
      self.arrays = dict(arrays, student_logits=np.asarray(logits_BxSxV, np.float64), student_logprobs=np.asarray(
          losses.token_logprobs(logits_BxSxV, jnp.asarray(arrays["tokens"]))))
      self.rollout = rollout
    return arrays, metrics, rollout


def train_with_spy(config, workdir, with_rollout=False):
  """`train.train`, returning its metrics and the first batch (`FirstBatch.arrays`; and its rollout batch)."""
  spy = FirstBatch()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train.DistillSource, "batch", lambda source, step, student: spy(source, step, student))
    metrics = train.train(config, workdir)
  return (metrics, spy.arrays, spy.rollout) if with_rollout else (metrics, spy.arrays)


@pytest.fixture(scope="module")
def method_runs(tokenizer_dir, tmp_path_factory):
  """Each method's 2-update run from the same student, teacher and seed: {method: (config, workdir, first batch)}.

  The first batch is the same rollout for every method but `opd_two_rollout` (which adds its
  intervened second rollout): nothing has been updated before it.
  """
  runs = {}
  for method in DISTILL_METHODS:
    config, workdir = tiny_config(tokenizer_dir, method), tmp_path_factory.mktemp(method)
    _, first = train_with_spy(config, workdir)
    runs[method] = config, workdir, first
  return runs


def expected_weights(method, first, alpha):
  """[B, S] the turn weights w of docs/method.md, in float64 NumPy from the batch's labels and teacher top-1 (E5-E8)."""
  turn_ids, num_turns = first["turn_ids"], first["valid"].shape[1]
  onehot_BxSxT = turn_ids[..., None] == np.arange(1, num_turns + 1)
  lengths_BxT = onehot_BxSxT.sum(1)
  confidence_BxT = np.einsum("bs,bst->bt", first["teacher_top1"].astype(np.float64), onehot_BxSxT) / np.maximum(
      lengths_BxT, 1)
  intervention_BxT = None
  if "labels" in first:
    intervention_BxT = np.choose(first["labels"], [0.0, alpha, 1.0])
  score_BxT = {"opd": np.ones_like(confidence_BxT), "opd_two_rollout": np.ones_like(confidence_BxT),
               "sage_opd_no_intervention": confidence_BxT, "sage_opd_no_confidence": intervention_BxT}.get(
                   method, None if intervention_BxT is None else intervention_BxT * confidence_BxT)
  if method not in ("opd", "opd_two_rollout", "sage_opd_no_norm"):  # (E8): token-weighted mean 1.
    score_BxT = score_BxT * lengths_BxT.sum() / (lengths_BxT * score_BxT).sum()
  return np.einsum("bst,bt->bs", onehot_BxSxT, score_BxT)


def update_weights(config, method, first):
  """[B, S] the weights `token_weights` gives the batch under `method`, as the trainer's transcripts show them."""
  batch = {k: jnp.asarray(first[k]) for k in update_lib.loss_keys(first)}
  return np.asarray(losses.token_weights(batch, train.loss_options(config, method, first["valid"].shape[1])))


def first_update(workdir):
  return next(r for r in writers.read_metrics(workdir) if "train/loss" in r)


@pytest.mark.parametrize("method", DISTILL_METHODS)
def test_every_distill_method_runs_end_to_end(method_runs, method):
  config, workdir, first = method_runs[method]
  rows = writers.read_metrics(workdir)
  losses_ = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses_) == 2 and all(np.isfinite(losses_)), losses_
  assert "eval/valid_seen/t0/success" in rows[-1]
  assert (workdir / "checkpoints" / "2").is_dir()
  assert (workdir / "hf" / "config.json").exists()
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  transcripts = (workdir / "transcripts" / "step2_train.jsonl").read_text().splitlines()
  turn = json.loads(transcripts[0])["turns"][0]
  assert "weight" in turn
  if losses.variant(method).needs_labels:
    assert turn["label"] in ("Skip", "Weak", "Strong")
    assert any("judge/strong_frac" in r for r in rows)
  else:
    assert "labels" not in first and "train/strong_frac" not in first_update(workdir)
  # The method's own weights (E5-E8), and the first update trained with exactly those: its
  # token counts, mean weight and loss are the method's. With old_logprobs="current" the PPO
  # ratio is 1, so the loss is sum_s w_s (log pi(y_s) - log nu(y_s)) / N.
  w_BxS = update_weights(config, method, first)
  response_BxS = first["turn_ids"] > 0
  np.testing.assert_allclose(w_BxS, expected_weights(method, first, config.loss.alpha), rtol=1e-5, atol=1e-7)
  if method in ("opd", "opd_two_rollout"):
    assert np.all(w_BxS[response_BxS] == 1.0) and np.all(w_BxS[~response_BxS] == 0.0)
  row = first_update(workdir)
  assert row["train/num_tokens"] == response_BxS.sum() > 0
  assert row["train/num_trained_tokens"] == (w_BxS > 0).sum()
  assert row["train/weight_mean"] == pytest.approx(w_BxS.sum() / response_BxS.sum(), rel=1e-5)
  k1_BxS = first["student_logprobs"].astype(np.float64) - first["teacher_logprobs"]
  assert row["train/loss"] == pytest.approx((w_BxS * k1_BxS).sum() / response_BxS.sum(), rel=1e-4, abs=LOSS_TOL)


# A float32 loss of ~50 tokens, summed on another device layout than the test's: a few ulps of
# the per-token log-probs (|log p| < 10, ulp ~1e-6) each.
LOSS_TOL = 1e-5


def test_methods_weigh_the_same_batch_differently(method_runs):
  first_batches = {m: run[2] for m, run in method_runs.items() if m != "opd_two_rollout"}
  opd = first_batches["opd"]
  for method, first in first_batches.items():  # One rollout, one teacher scoring, one judge.
    for key in ("tokens", "turn_ids", "teacher_logprobs", "teacher_top1", "student_logprobs"):
      np.testing.assert_array_equal(first[key], opd[key], err_msg=f"{method}: {key}")
    if losses.variant(method).needs_labels:
      np.testing.assert_array_equal(first["labels"], first_batches["sage_opd"]["labels"])
  weights = {m: update_weights(method_runs[m][0], m, first) for m, first in first_batches.items()}
  updates = {m: first_update(method_runs[m][1]) for m in first_batches}
  # The random teacher's judge labels every turn alike, so sage_opd weighs as no_intervention,
  # and no_confidence as opd; the confidence, its normalisation and the labels still make
  # three different weightings of the one batch, and three different losses.
  distinct = ("opd", "sage_opd_no_intervention", "sage_opd_no_norm")
  for i, a in enumerate(distinct):
    for b in distinct[i + 1:]:
      assert np.abs(weights[a] - weights[b]).max() > 1e-2, (a, b)
      assert abs(updates[a]["train/loss"] - updates[b]["train/loss"]) > 10 * LOSS_TOL, (a, b)
  for method in first_batches:
    twin = min(distinct, key=lambda d: np.abs(weights[d] - weights[method]).max())
    np.testing.assert_allclose(weights[method], weights[twin], rtol=1e-5, atol=1e-7)


def test_distill_batches_hold_the_teachers_statistics(method_runs):
  # The teacher, built independently of the trainer, scores the batch's tokens as the batch says;
  # the student's log-probs of the same tokens differ by far more than that tolerance.
  config, _, first = method_runs["sage_opd"]
  teacher = train.load_model(config.teacher, None, config.seed + 1)
  tokens_BxS = jnp.asarray(first["tokens"])
  want = losses.teacher_token_stats(packed_logits(teacher, first), tokens_BxS)
  response_BxS = first["turn_ids"] > 0
  for key, value in want.items():
    np.testing.assert_allclose(first[key][response_BxS], np.asarray(value)[response_BxS], rtol=1e-5, atol=TEACHER_TOL,
                               err_msg=key)
  gap = np.abs(first["student_logprobs"] - first["teacher_logprobs"])[response_BxS]
  assert gap.max() > 10 * TEACHER_TOL, gap.max()


# float32 log-softmax of the same weights, chunked (the scorer) or not (the test): a few ulps of |log p| < 10.
TEACHER_TOL = 2e-5


def _log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _kl64(logp, logq):
  return (np.exp(logp) * (logp - logq)).sum(-1)


@pytest.mark.parametrize("divergence, top_k", [("reverse_kl", 0), ("jsd", 8)])
def test_full_estimator_trains_on_the_teachers_distribution(tokenizer_dir, tmp_path, divergence, top_k):
  # E2/E10 read the teacher's top-k per position (all of the vocabulary when top_k = 0): the
  # first update's divergence is the float64 one between the student's and an independently
  # built teacher's distributions, renormalised over the teacher's top-k.
  config = tiny_config(tokenizer_dir, "sage_opd", **{"loss.estimator": "full", "loss.divergence": divergence,
                                                     "teacher.top_k": top_k, "eval.num_episodes": 0})
  _, first = train_with_spy(config, tmp_path)
  rows = [r for r in writers.read_metrics(tmp_path) if "train/loss" in r]
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
  assert all("train/clip_frac" not in row for row in rows)  # The sampled estimator's PPO ratio is not in play.
  tokens_BxS = jnp.asarray(first["tokens"])
  teacher = train.load_model(config.teacher, None, config.seed + 1)
  logq_BxSxV = _log_softmax64(packed_logits(teacher, first))
  logp_BxSxV = _log_softmax64(first["student_logits"])
  if top_k:
    support_BxSxK = np.argsort(-logq_BxSxV, axis=-1)[..., :top_k]
    logq_BxSxV = _log_softmax64(np.take_along_axis(logq_BxSxV, support_BxSxK, -1))
    logp_BxSxV = _log_softmax64(np.take_along_axis(logp_BxSxV, support_BxSxK, -1))
  if divergence == "reverse_kl":
    per_position_BxS = _kl64(logp_BxSxV, logq_BxSxV)
  else:
    beta = config.loss.jsd_beta
    logm = np.logaddexp(np.log(beta) + logq_BxSxV, np.log1p(-beta) + logp_BxSxV)
    per_position_BxS = beta * _kl64(logq_BxSxV, logm) + (1 - beta) * _kl64(logp_BxSxV, logm)
  divergence_BxS = np.pad(per_position_BxS[:, :-1], ((0, 0), (1, 0)))  # Position s - 1 predicts token s.
  w_BxS = update_weights(config, "sage_opd", first)
  trained_BxS = w_BxS > 0
  assert rows[0]["train/kl_mean"] == pytest.approx(divergence_BxS[trained_BxS].mean(), rel=1e-4, abs=LOSS_TOL)
  assert rows[0]["train/loss"] == pytest.approx((w_BxS * divergence_BxS).sum() / (first["turn_ids"] > 0).sum(),
                                                rel=1e-4, abs=LOSS_TOL)


def test_teacher_top_k_beyond_the_vocabulary_is_named(tokenizer_dir):
  # Validation refuses it for a model-config teacher (tests/test_config.py); an HF teacher's
  # vocabulary is known once loaded, and `teacher_support` checks it then.
  config = tiny_config(tokenizer_dir, "opd", **{"loss.estimator": "full"})
  config.teacher.top_k = 10**6
  with pytest.raises(config_lib.ConfigError, match=r"config\.teacher\.top_k=1000000"):
    train.teacher_support(config, config.teacher.model.vocab_size)


def test_two_rollout_replacements_are_decoded_as_the_student_decodes(tokenizer_dir, tmp_path):
  # Under constrained decoding the teacher's replacement turns must be admissible too: the
  # random teacher's free text never is, and its unclear judge answers make every turn Strong.
  config = tiny_config(tokenizer_dir, "opd_two_rollout", **{"sampling.constrained": True, "train.num_steps": 1,
                                                            "eval.num_episodes": 0})
  train.train(config, tmp_path)
  row = next(r for r in writers.read_metrics(tmp_path) if "rollout/intervened_frac" in r)
  assert row["rollout/intervened_frac"] > 0.5, row
  assert row["rollout_intervened/invalid_rate"] == 0.0 and row["rollout/invalid_rate"] == 0.0, row
  # Every run logs the share of its episodes the context budget ended, for each rollout.
  assert 0.0 <= row["rollout/context_cut_rate"] <= 1.0 and 0.0 <= row["rollout_intervened/context_cut_rate"] <= 1.0


@pytest.mark.parametrize("mode", ["transcript", "likelihood", "oracle"])
def test_two_rollout_asks_every_judge_mode(tokenizer_dir, tmp_path, mode):
  # Constrained decoding leaves no turn Strong by rule, so every replacement is the judge's call.
  # A random teacher neither answers a label word (transcript) nor puts mass on the actions
  # (likelihood): most turns are Strong, where a hook that asked only the prompted judge would
  # replace none. The oracle labels an admissible action Skip or Weak (Strong is for invalid
  # turns only), so it replaces none; it needs the expert's action at every asked turn.
  config = tiny_config(tokenizer_dir, "opd_two_rollout", **{"sampling.constrained": True, "train.num_steps": 1,
                                                            "eval.num_episodes": 0, "judge.mode": mode})
  train.train(config, tmp_path)
  row = next(r for r in writers.read_metrics(tmp_path) if "rollout/intervened_frac" in r)
  if mode == "oracle":
    assert row["rollout/intervened_frac"] == 0.0, row
  else:
    assert row["rollout/intervened_frac"] > 0.5, row
  assert row["rollout/invalid_rate"] == 0.0, row


def test_oracle_judge_is_marked_and_measured(tokenizer_dir, tmp_path):
  # Constrained decoding keeps actions admissible, so the oracle labels valid turns too.
  # Its labels are an expert's that replays the episode afresh: Skip where the student's action is the
  # expert's, Weak where it differs; the columns past an episode's last turn stay Strong (empty turns).
  config = tiny_config(tokenizer_dir, "sage_opd", **{"judge.mode": "oracle", "sampling.constrained": True,
                                                     "train.num_steps": 1, "eval.num_episodes": 0})
  _, first, rollout = train_with_spy(config, tmp_path, with_rollout=True)
  row = [r for r in writers.read_metrics(tmp_path) if "train/loss" in r][-1]
  assert row["judge/oracle_mode"] == 1.0
  num_turns = [len(e.turns) for e in rollout.episodes]
  assert row["judge/oracle_count"] == sum(num_turns) > 0
  from sage_opd_jax.envs import alfworld_expert  # pylint: disable=g-import-not-at-top

  env = envs_base.make("alfworld", data_dir=str(FIXTURE_DATA), facts=True, max_turns=config.env.max_turns)
  try:
    for b, episode in enumerate(rollout.episodes):
      expert = alfworld_expert.ImitableExpert(episode.task)
      observation, info = env.reset(episode.task)
      expert_action, want = expert.first_action(observation, info), []
      for turn in episode.turns:
        same = expert_action.lower().split() == turn.action.lower().split()
        want.append(losses.Label.SKIP if same else losses.Label.WEAK)
        expert_action = expert.next_action(env.step(turn.action))
      want += [losses.Label.STRONG] * (config.env.max_turns - len(want))
      assert first["labels"][b].tolist() == want, (b, first["labels"][b])
  finally:
    env.close()


def test_transcript_judge_runs_in_the_teachers_scoring(tokenizer_dir, tmp_path):
  # Constrained decoding keeps actions admissible, so valid turns reach the judge.
  config = tiny_config(tokenizer_dir, "sage_opd", **{"judge.mode": "transcript", "sampling.constrained": True,
                                                     "train.num_steps": 1, "eval.num_episodes": 0})
  _, first = train_with_spy(config, tmp_path)
  row = [r for r in writers.read_metrics(tmp_path) if "train/loss" in r][-1]
  assert np.isfinite(row["train/loss"]), row
  assert row["judge/num_prompts"] > 0 and row["judge/asked_frac"] > 0, row
  # The update's label fractions are those of the labels the judge gave, over the turns played.
  played_BxT = first["response_lengths"] > 0
  for label, name in enumerate(("skip", "weak", "strong")):
    assert row[f"train/{name}_frac"] == pytest.approx(np.mean(first["labels"][played_BxT] == label)), name


def test_sft_and_export_stages(tokenizer_dir, tmp_path):
  demos_dir = tmp_path / "demos"
  config = tiny_config(tokenizer_dir, stage="collect_demos",
                       **{"demos.split": "valid_seen", "demos.limit": 2})
  manifest = pipeline.collect_stage(config, demos_dir)
  assert manifest["games_won"] >= 1, manifest
  sft = tiny_config(tokenizer_dir, stage="sft", **{"sft.demos_dir": str(demos_dir), "sft.judge_examples": True,
                                                  "train.batch_episodes": 2, "eval.num_episodes": 0})
  source = train.SftSource(sft, models.load_tokenizer(tokenizer_dir))
  for step in range(4):  # Each batch is cut to its longest row, rounded up: no real token is lost.
    cut = source.batch(step)
    width = cut["tokens"].shape[1]
    rows = train.epoch_rows(source.num_rows, 2, sft.seed, step, source.lengths)
    assert width % 128 == 0 or width == sft.train.max_seq_len
    assert width >= source.lengths[rows].max() and width - source.lengths[rows].max() < 128
    np.testing.assert_array_equal(cut["tokens"], source.arrays["tokens"][rows, :width])
    assert source.arrays["attention_mask"][rows, width:].sum() == 0
  # Under a window the env's turn cap passes (1 of 3 turns here), each demo's first 2 turns are one row and each
  # later turn one of its own; a window the cap never passes keeps every demo whole, one row each.
  turns = [len(r["actions"]) for r in demos_lib.read_jsonl(demos_dir / demos_lib.DEMOS)]
  assert max(turns) > 2, turns
  acting = dict(stage="sft", **{"sft.demos_dir": str(demos_dir), "train.batch_episodes": 2})
  tokenizer = models.load_tokenizer(tokenizer_dir)
  assert train.SftSource(tiny_config(tokenizer_dir, **acting), tokenizer).num_rows == sum(max(1, t - 1) for t in turns)
  whole = tiny_config(tokenizer_dir, **acting, **{"env.history_turns": 2})
  assert train.SftSource(whole, tokenizer).num_rows == len(turns)
  capped = tiny_config(tokenizer_dir, stage="sft", **{"sft.demos_dir": str(demos_dir), "sft.judge_examples": True,
                                                     "sft.max_judge_examples": 3, "train.batch_episodes": 2})
  assert source.info["sft/judge_examples"] > 3
  assert train.SftSource(capped, models.load_tokenizer(tokenizer_dir)).info["sft/judge_examples"] == 3
  # The transcript judge trains on the same examples, each asked after its episode's transcript.
  transcript = tiny_config(tokenizer_dir, stage="sft", **{
      "sft.demos_dir": str(demos_dir), "sft.judge_examples": True, "judge.mode": "transcript",
      "env.show_admissible": False, "train.batch_episodes": 2})
  tokenizer = models.load_tokenizer(tokenizer_dir)
  transcript_source = train.SftSource(transcript, tokenizer)
  assert transcript_source.info["sft/judge_examples"] == source.info["sft/judge_examples"]
  texts = [tokenizer.decode(row[mask == 1].tolist()) for row, mask in zip(
      transcript_source.arrays["tokens"], transcript_source.arrays["attention_mask"])]
  questions = [t for t in texts if "Decide whether the agent needs correction" in t]
  # The longest examples' transcripts outgrow the tiny config's rows; they are dropped and counted.
  assert len(questions) == source.info["sft/judge_examples"] - transcript_source.info["sft/dropped"] > 0
  assert all("Recent history" not in t and t.count("<|im_start|>assistant") >= 2 for t in questions)
  train.train(sft, tmp_path / "sft")
  rows = writers.read_metrics(tmp_path / "sft")
  nll = [r["train/nll_mean"] for r in rows if "train/nll_mean" in r]
  assert len(nll) == 2 and all(np.isfinite(nll))
  # The run's own export (from the final state in memory) and the export stage's (from the last
  # orbax checkpoint) hold the same weights, which training moved away from the initial ones.
  final = nnx.state(models.load_hf_checkpoint(writers.export_dir(tmp_path / "sft")), nnx.Param)
  exported = train.export_stage(sft, tmp_path / "sft")
  reloaded = nnx.state(models.load_hf_checkpoint(exported), nnx.Param)
  initial = nnx.state(train.load_model(sft.student, None, sft.seed), nnx.Param)
  assert jax.tree.structure(reloaded) == jax.tree.structure(final) == jax.tree.structure(initial)
  for got, want in zip(jax.tree.leaves(reloaded), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(initial)))


def test_dagger_corrections_are_the_experts_actions_where_the_policy_left_it(tokenizer_dir, tmp_path):
  # A random policy, constrained to admissible actions, plays both fixture games with the expert shadowing it.
  config = tiny_config(tokenizer_dir, **{"sampling.constrained": True, "env.max_turns": 6})
  manifest = dagger.collect(config, tmp_path, first=0, num_games=2, temperature=1.0)
  records = demos_lib.read_jsonl(tmp_path / demos_lib.DEMOS)
  assert manifest["games"] == 2 and manifest["corrections"] == len(records) > 0, manifest
  # Independently: replay each record's policy turns in a fresh env, a fresh expert following them.
  from sage_opd_jax.envs import alfworld_expert  # pylint: disable=g-import-not-at-top

  env = envs_base.make("alfworld", data_dir=str(FIXTURE_DATA), facts=True, max_turns=6)
  tasks = {t.task_id: t for t in env.tasks("valid_seen")}
  try:
    for record in records:
      *played, corrected = record["actions"]
      assert record["trained"] == [False] * len(played) + [True]
      task = tasks[record["task_id"]]
      expert = alfworld_expert.ImitableExpert(task)
      observation, info = env.reset(task)
      observations, expert_action = [observation], expert.first_action(observation, info)
      for action in played:
        result = env.step(action)
        observations.append(result.observation)
        expert_action = expert.next_action(result)
      assert record["observations"] == observations
      assert corrected == expert_action
  finally:
    env.close()
  # Only the correction is trained: its tokens spell the expert's response, and nothing else is.
  tokenizer = models.load_tokenizer(tokenizer_dir)
  record = max(records, key=lambda r: len(r["actions"]))
  data = sft_data.build_sft_data(tokenizer, [sft_data.Demonstration.from_record(record)], [], 512,
                                 show_admissible=config.env.show_admissible, seed=None)
  trained = data.arrays["turn_ids"][0] > 0
  end_of_turn = prompts.ChatLayout.from_tokenizer(tokenizer).after_assistant.split("\n", 1)[0]
  assert tokenizer.decode(data.arrays["tokens"][0][trained].tolist()) == tokenizer.decode(
      tokenizer.encode(sft_data.expert_response(record["actions"][-1]) + end_of_turn, add_special_tokens=False))
  # A finished collection is not played again; a torn one keeps its finished games only.
  games = (tmp_path / demos_lib.GAMES).read_text()
  assert dagger.finished(tmp_path, 2) and not dagger.finished(tmp_path, 3)
  (tmp_path / demos_lib.GAMES).write_text(games.splitlines(keepends=True)[0])
  dagger.collect(config, tmp_path, first=0, num_games=1, temperature=1.0)
  kept = json.loads(games.splitlines()[0])["task_id"]
  assert demos_lib.read_jsonl(tmp_path / demos_lib.DEMOS) == [r for r in records if r["task_id"] == kept]


def _run_cli(config_path, workdir, *flags, wait=True):
  cmd = [sys.executable, "-m", "sage_opd_jax.main", f"--config={config_path}", f"--workdir={workdir}", *flags]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _write_config(tmp_path, tokenizer_dir, **overrides):
  """A config file for the CLI that rebuilds `tiny_config` in the subprocess."""
  path = tmp_path / "tiny_config.py"
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
      "import test_main\n"
      "def get_config():\n"
      f"  return test_main.tiny_config({str(tokenizer_dir)!r}, **{overrides!r})\n"
  )
  return path


def _comparable(rows):
  last = {}
  for row in rows:  # A resumed run rewrites the steps after its checkpoint: keep the last.
    last[row["step"]] = {k: v for k, v in row.items() if not k.startswith("time/")}
  return last


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tokenizer_dir, tmp_path):
  # Constrained decoding makes every action admissible, so the judge really runs.
  overrides = {"train.num_steps": 4, "train.eval_every": 100, "eval.num_episodes": 0, "method": "sage_opd",
               "sampling.constrained": True}
  config_path = _write_config(tmp_path, tokenizer_dir, **overrides)
  straight = tmp_path / "straight"
  assert _run_cli(config_path, straight).returncode == 0
  killed = tmp_path / "killed"
  proc = _run_cli(config_path, killed, wait=False)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    # Kill once a checkpoint has landed and training has gone past it.
    steps = [int(p.name) for p in (killed / "checkpoints").glob("*") if p.name.isdigit()]
    if steps and (killed / "metrics.jsonl").exists() and len(writers.read_metrics(killed)) >= 3:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.2)
  proc.wait()
  resumed = _run_cli(config_path, killed)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert _comparable(writers.read_metrics(killed)) == _comparable(writers.read_metrics(straight))


def _evals(workdir):
  return {row["step"]: {k: v for k, v in row.items() if k.startswith("eval/")}
          for row in writers.rows_with(workdir, "eval/")}


def test_resume_runs_the_eval_a_crash_cut_short(tokenizer_dir, tmp_path, monkeypatch):
  # A run that dies after its last checkpoint but inside the eval (as an LLVM "Cannot allocate
  # memory" did) restores at the last step: the resume must still evaluate before exporting.
  config = tiny_config(tokenizer_dir, "opd")  # 2 updates, eval after the 2nd.
  train.train(config, tmp_path / "straight")
  evaluate = train.evaluate

  def crash(*args, **kwargs):
    raise RuntimeError("injected crash in the eval")

  monkeypatch.setattr(train, "evaluate", crash)
  with pytest.raises(RuntimeError, match="injected"):
    train.train(config, tmp_path / "crashed")
  assert not writers.exported(tmp_path / "crashed") and not _evals(tmp_path / "crashed")
  monkeypatch.setattr(train, "evaluate", evaluate)
  train.train(config, tmp_path / "crashed")
  assert writers.exported(tmp_path / "crashed")
  assert list(_evals(tmp_path / "crashed")) == [2]
  assert _evals(tmp_path / "crashed") == _evals(tmp_path / "straight")


@pytest.mark.parametrize("limit, backend, warns", [
    (65530, "cpu", True), (1048576, "cpu", False), (65530, "gpu", False), (None, "cpu", False)])
def test_low_map_count_warning(limit, backend, warns):
  # Imported here: the CLI tests' config files import this module inside `python -m
  # sage_opd_jax.main`, where a second import of the CLI would define its flags twice.
  from sage_opd_jax import main

  message = main.map_count_warning(limit, backend)
  assert (message is not None) == warns
  if warns:
    assert f"vm.max_map_count={limit}" in message and "sysctl -w vm.max_map_count=" in message


@pytest.mark.parametrize("flag, message", [
    ("--config.loss.confidence=top5", "config.loss.confidence='top5'"),
    ("--config.lerning_rate=1", "lerning_rate"),
    ("--config.teacher.model.vocab_size=7", "config.teacher.model.vocab_size=7"),
])
def test_bad_config_stops_before_compiling(tokenizer_dir, tmp_path, flag, message):
  config_path = _write_config(tmp_path, tokenizer_dir)
  result = _run_cli(config_path, tmp_path / "run", flag)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_crashed_env_episode_does_not_stop_the_run(tokenizer_dir, tmp_path):
  # One of the two games is broken: its env fails at every reset, in its worker; the other plays on.
  data = tmp_path / "data"
  shutil.copytree(FIXTURE_DATA, data)
  broken = next((data / "json_2.1.1" / "valid_seen").glob("pick_two_obj*/*/game.tw-pddl"))
  broken.write_text("not a game")
  config = tiny_config(tokenizer_dir, "opd", **{"env.data_dir": str(data), "eval.num_episodes": 0})
  _, _, rollout = train_with_spy(config, tmp_path / "run", with_rollout=True)
  rows = [r for r in writers.read_metrics(tmp_path / "run") if "train/loss" in r]
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
  played = {e.task.meta["gamefile"]: e for e in rollout.episodes}
  failed = played.pop(str(broken))
  assert failed.error and not failed.turns and not failed.won
  (other,) = played.values()
  assert other.error is None and (other.won or len(other.turns) == config.env.max_turns)
  assert rollout.failed.tolist() == [e is failed for e in rollout.episodes]


def test_cli_runs_the_distill_stage(tokenizer_dir, tmp_path, monkeypatch):
  # Without the tests' own cache in the environment, the config's cache folder gets the programs.
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  cache = tmp_path / "xla"
  config_path = _write_config(tmp_path, tokenizer_dir, **{"train.num_steps": 1, "eval.num_episodes": 0,
                                                          "compilation_cache_dir": str(cache)})
  result = _run_cli(config_path, tmp_path / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  assert writers.read_metrics(tmp_path / "run")[-1]["step"] == 1
  assert len(list(cache.iterdir())) > 3


def test_an_environment_compilation_cache_wins_over_the_config(tokenizer_dir, tmp_path):
  from sage_opd_jax import main  # Local for the reason given in test_low_map_count_warning.

  config = tiny_config(tokenizer_dir, **{"stage": "export", "compilation_cache_dir": str(tmp_path / "xla")})
  with pytest.raises(FileNotFoundError, match="No checkpoint"):  # Export with nothing trained.
    main.run(config, str(tmp_path / "run"))
  assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
  assert not (tmp_path / "xla").exists()


def test_the_trainer_loads_no_text_game_engine():
  # A run on a TPU or GPU host that trains from collected demos must not need TextWorld,
  # ALFWorld or ScienceWorld installed: `envs.make` imports an env only when it is built, and
  # config validation reads the env's declaration (`EnvSpec`) without its engine.
  code = ("import sys; import sage_opd_jax.main, sage_opd_jax.train, sage_opd_jax.sft_data; "
          "from configs import base; sage_opd_jax.config.validate(base.get_config()); "
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'textworld', 'alfworld', 'scienceworld', 'fast_downward'}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


# Midway between the per-turn statistics of the fixed-seed first batch below: the random teacher gives
# its six actions mean log-probs of -6.68 (one turn), -6.79 (one) and -6.87 to -6.90 (four), so that its
# played turns get all three labels, differently in each episode.
MIXED_LIKELIHOOD_THRESHOLDS = (-6.73, -6.83)


def test_likelihood_labels_land_on_their_episode_and_turn(tokenizer_dir, tmp_path):
  # The trainer's batch holds labels[b, t] for turn t of episode b: recomputed here from the rollout's
  # own episodes (each turn's response located by the transcript layout, not by the batch's turn ids)
  # and an independently built teacher, with thresholds that mix the labels, so that a label written
  # to another column or another episode's row disagrees.
  config = tiny_config(tokenizer_dir, "sage_opd", **{
      "judge.mode": "likelihood", "judge.likelihood_thresholds": MIXED_LIKELIHOOD_THRESHOLDS,
      "sampling.constrained": True, "train.num_steps": 1, "eval.num_episodes": 0,
      # A window over every turn: the transcript is one sequence, which the walk below reads.
      "env.history_turns": 3})
  _, first, rollout = train_with_spy(config, tmp_path, with_rollout=True)
  tokenizer = models.load_tokenizer(tokenizer_dir)
  teacher = train.load_model(config.teacher, None, config.seed + 1)
  tokens_BxS = jnp.asarray(first["tokens"])
  logq_BxSxV = _log_softmax64(teacher(tokens_BxS, attention_mask=jnp.asarray(first["attention_mask"])))
  skip_above, weak_above = MIXED_LIKELIHOOD_THRESHOLDS
  want, stats = np.full(first["labels"].shape, losses.Label.STRONG), []
  for b, episode in enumerate(rollout.episodes):
    start = len(episode.prompt_tokens)
    for t, turn in enumerate(episode.turns):
      ids = list(turn.response_tokens)
      assert first["tokens"][b, start:start + len(ids)].tolist() == ids, (b, t)
      # The tokens whose characters overlap the action command between the tags.
      span = prompts.action_span(tokenizer.decode(ids))
      ends = [len(tokenizer.decode(ids[:j + 1])) for j in range(len(ids))]
      action = [start + j for j in range(len(ids)) if (ends[j - 1] if j else 0) < span[1] and ends[j] > span[0]]
      stat = np.mean([logq_BxSxV[b, s - 1, first["tokens"][b, s]] for s in action])  # Position s - 1 predicts s.
      want[b, t] = losses.Label.SKIP if stat > skip_above else losses.Label.WEAK if stat > weak_above else (
          losses.Label.STRONG)
      stats.append((b, t, turn.action, round(float(stat), 4)))
      start += len(ids) + len(turn.next_tokens)
  played_BxT = first["response_lengths"] > 0
  assert played_BxT.sum() == len(stats) and all(turn.valid for e in rollout.episodes for turn in e.turns)
  # Mixed labels within an episode (a shift across columns) and across episodes (swapped rows).
  assert len(set(want[played_BxT].tolist())) == 3 and any(len(set(row[:len(e.turns)])) > 1
                                                            for row, e in zip(want, rollout.episodes)), stats
  assert not np.array_equal(want[0], want[1]), stats
  # Columns past an episode's last turn (none in this batch: both play every turn) stay `want`'s Strong filler.
  np.testing.assert_array_equal(first["labels"], want, err_msg=str(stats))
