"""Teacher scoring: chunked, token-aligned statistics against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sage_opd_jax import models
from sage_opd_jax import teacher
from sage_opd_jax.models import sharding

VOCAB = 97
SEQ = 13


@pytest.fixture(scope="module")
def tiny_teacher():
  config = models.ModelConfig.from_dict(dict(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=8, tie_embeddings=False))
  return models.Transformer(config, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(3, SEQ)).astype(np.int32)
  mask = np.ones((3, SEQ), np.int32)
  mask[1, 9:] = 0  # A right-padded row.
  mask[2, 4:] = 0
  tokens[mask == 0] = 0
  return tokens, mask


# Chunked float32 statistics against float64 statistics of the same float32 logits: the float32
# log-softmax's rounding at |log p| ~ 5.
TOL = 2e-5


def _reference(model, tokens, mask, top_k, temperature=1.0):
  """Full [B, S, V] logits -> float64 log-softmax; position s - 1 predicts token s."""
  logits = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)), np.float64) / temperature
  logq = logits - logits.max(-1, keepdims=True)
  logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
  b, s = tokens.shape
  ref = {name: np.zeros((b, s)) for name in teacher.STAT_KEYS}
  ref["teacher_topk_ids"] = np.zeros((b, s, top_k), np.int64)
  ref["teacher_topk_logprobs"] = np.zeros((b, s, top_k))
  for i in range(b):
    for j in range(1, s):
      if not mask[i, j]:
        continue
      dist = logq[i, j - 1]
      ref["teacher_logprobs"][i, j] = dist[tokens[i, j]]
      ref["teacher_top1"][i, j] = np.exp(dist.max())
      ref["teacher_entropy"][i, j] = -(np.exp(dist) * dist).sum()
      order = np.argsort(-dist, kind="stable")[:top_k]
      ref["teacher_topk_ids"][i, j] = order
      ref["teacher_topk_logprobs"][i, j] = dist[order]
  return ref


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_scores_equal_a_direct_full_forward(tiny_teacher, batch, temperature):
  tokens, mask = batch
  scores = teacher.score_batch(tiny_teacher, tokens, mask, chunk_size=4, top_k=3, temperature=temperature)
  ref = _reference(tiny_teacher, tokens, mask, top_k=3, temperature=temperature)
  assert set(scores) == set(teacher.STAT_KEYS) | set(teacher.TOPK_KEYS)
  for key in teacher.STAT_KEYS + ("teacher_topk_logprobs",):
    assert scores[key].shape == ref[key].shape, key
    np.testing.assert_allclose(np.asarray(scores[key]), ref[key], atol=TOL, rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(np.asarray(scores["teacher_topk_ids"]), ref["teacher_topk_ids"])
  # The tolerance tells plausible wrong answers apart by 10x: a temperature 10% off, and the top-k
  # log-probs renormalised over the k kept.
  scored = (np.arange(SEQ) > 0) & (mask == 1)
  off = _reference(tiny_teacher, tokens, mask, top_k=3, temperature=1.1 * temperature)
  topk = ref["teacher_topk_logprobs"]
  renormalised = topk - np.log(np.exp(topk).sum(-1, keepdims=True))
  for wrong, key in ((off["teacher_logprobs"], "teacher_logprobs"), (off["teacher_entropy"], "teacher_entropy"),
                     (off["teacher_topk_logprobs"], "teacher_topk_logprobs"), (renormalised, "teacher_topk_logprobs")):
    tolerance = TOL + 1e-5 * np.abs(ref[key])
    assert (np.abs(wrong - np.asarray(scores[key])) / tolerance)[scored].max() > 10, key
  # Token 0 has no predicting position and padding was never sampled: both exactly 0.
  for key in teacher.STAT_KEYS:
    assert np.all(np.asarray(scores[key])[:, 0] == 0.0)
    assert np.all(np.asarray(scores[key])[mask == 0] == 0.0)


@pytest.mark.parametrize("chunk_size", [1, 5, SEQ + 4])
def test_chunked_equals_unchunked(tiny_teacher, batch, chunk_size):
  tokens, mask = batch
  whole = teacher.score_batch(tiny_teacher, tokens, mask, chunk_size=SEQ, top_k=2)
  chunked = teacher.score_batch(tiny_teacher, tokens, mask, chunk_size=chunk_size, top_k=2)
  for key in whole:
    np.testing.assert_allclose(np.asarray(chunked[key]), np.asarray(whole[key]), rtol=1e-6, atol=1e-5, err_msg=key)


def test_teacher_params_get_no_gradient(tiny_teacher, batch):
  tokens, mask = batch
  graphdef, state = nnx.split(tiny_teacher)

  def total(state):
    scores = teacher.score_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), chunk_size=5)
    return scores["teacher_logprobs"].sum() + scores["teacher_entropy"].sum()

  assert float(total(state)) != 0.0
  grads = jax.grad(total)(state)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_scorer_is_cached_and_rejects_bad_arguments(tiny_teacher, batch):
  tokens, mask = batch
  graphdef, _ = nnx.split(tiny_teacher)
  assert teacher.make_scorer(graphdef, chunk_size=4) is teacher.make_scorer(graphdef, chunk_size=4)
  with pytest.raises(ValueError, match="chunk_size"):
    teacher.score_batch(tiny_teacher, tokens, mask, chunk_size=0)
  with pytest.raises(ValueError, match="attention_mask"):
    teacher.score_batch(tiny_teacher, tokens, mask[:, :-1], chunk_size=4)


@pytest.mark.parametrize("with_questions", [False, True])
def test_sharded_teacher_scores_like_the_unsharded_one(batch, with_questions):
  from sage_opd_jax import judge  # pylint: disable=g-import-not-at-top

  config = models.ModelConfig.from_dict(dict(
      vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=8, tie_embeddings=False))
  model = models.Transformer(config, rngs=nnx.Rngs(5))
  tokens = np.concatenate([batch[0], batch[0][:1]]) % 96  # B = 4: divisible by data x fsdp.
  mask = np.concatenate([batch[1], batch[1][:1]])
  questions = None
  if with_questions:  # The transcript judge's packed rows (judge.pack_questions), one row without any.
    questions = judge.pack_questions(tokens, mask, [(0, 0, 5, [1, 2, 3]), (0, 1, 13, [4, 5]), (1, 0, 9, [6, 7, 8, 9]),
                                                    (3, 0, 2, [10])], pad_id=0).arrays()
  expected = teacher.score_batch(model, tokens, mask, chunk_size=4, questions=questions)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = sharding.shard_model(model, mesh)
  placed = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, mask)]
  if with_questions:
    questions = jax.device_put(questions, sharding.batch_sharding(mesh))
  for micro_batches in (1, 2):  # Rows {0, 2} then {1, 3}, each on its own devices, put back in order.
    got = teacher.score_batch(sharded, *placed, chunk_size=4, questions=questions, micro_batches=micro_batches)
    assert sorted(got) == sorted(expected) == sorted([*teacher.STAT_KEYS, *(["answer_logits"] if with_questions else [])])
    for key in expected:
      assert len(got[key].sharding.device_set) == 8
      np.testing.assert_allclose(np.asarray(got[key]), np.asarray(expected[key]), rtol=1e-5, atol=1e-5, err_msg=key)
  with pytest.raises(ValueError, match="micro_batches=3"):
    teacher.score_batch(sharded, *placed, chunk_size=4, questions=questions, micro_batches=3)
