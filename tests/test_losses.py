"""Tests for sage_opd_jax.losses against independent float64 NumPy references.

The references below index the logits at s - 1 explicitly, loop over turns, and never call
the module under test, so an alignment or masking slip shows up as a mismatch.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from sage_opd_jax import losses

SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
# The reference of each built-in variant, by name (docs/method.md's table): whether its score
# reads the judge's intervention i_t (E5), the teacher's confidence c (E6), and is normalised (E8).
BUILTIN_SCORES = {
    "sft": (False, False, False),
    "opd": (False, False, False),
    "opd_two_rollout": (False, False, False),
    "sage_opd": (True, True, True),
    "sage_opd_no_intervention": (False, True, True),
    "sage_opd_no_confidence": (True, False, True),
    "sage_opd_no_norm": (True, True, False),
}


# ----------------------------------------------------------------------------------------
# Float64 NumPy references.
# ----------------------------------------------------------------------------------------


def ref_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def ref_token_logprobs(logits, tokens):
  b, s = tokens.shape
  out = np.zeros((b, s))
  for i in range(b):
    for j in range(1, s):
      out[i, j] = ref_log_softmax(logits[i, j - 1])[tokens[i, j]]
  return out


def ref_divergence(student_logits, teacher_logits, kind, beta=0.5):
  b, s, _ = student_logits.shape
  out = np.zeros((b, s))
  for i in range(b):
    for j in range(1, s):
      p = np.exp(ref_log_softmax(student_logits[i, j - 1]))
      q = np.exp(ref_log_softmax(teacher_logits[i, j - 1]))
      kl = lambda a, c: float(np.sum(a * np.log(a / c)))
      if kind == "reverse_kl":
        out[i, j] = kl(p, q)
      elif kind == "forward_kl":
        out[i, j] = kl(q, p)
      else:
        m = beta * q + (1 - beta) * p
        out[i, j] = beta * kl(q, m) + (1 - beta) * kl(p, m)
  return out


def ref_token_top1_entropy(teacher_logits):
  b, s, _ = teacher_logits.shape
  top1, ent = np.zeros((b, s)), np.zeros((b, s))
  for i in range(b):
    for j in range(1, s):
      q = np.exp(ref_log_softmax(teacher_logits[i, j - 1]))
      top1[i, j], ent[i, j] = q.max(), -np.sum(q * np.log(q))
  return top1, ent


def ref_turn_lengths(turn_ids, num_turns):
  out = np.zeros((turn_ids.shape[0], num_turns), np.int64)
  for i in range(turn_ids.shape[0]):
    for t in range(1, num_turns + 1):
      out[i, t - 1] = int(np.sum(turn_ids[i] == t))
  return out


def ref_confidence(top1, ent, turn_ids, num_turns, mode, vocab):
  """-> [B, T], or [B, S] for token_top1."""
  if mode == "token_top1":
    return np.where((turn_ids >= 1) & (turn_ids <= num_turns), top1, 0.0)
  out = np.zeros((turn_ids.shape[0], num_turns))
  for i in range(turn_ids.shape[0]):
    for t in range(1, num_turns + 1):
      idx = np.nonzero(turn_ids[i] == t)[0]
      if len(idx) == 0:
        continue  # Empty turn: confidence 0.
      if mode == "turn_mean_top1":
        out[i, t - 1] = top1[i, idx].mean()
      elif mode == "neg_entropy":
        out[i, t - 1] = 1.0 - ent[i, idx].mean() / np.log(vocab)
      else:
        out[i, t - 1] = 1.0
  return out


def ref_intervention(labels, alpha):
  table = {0: 0.0, 1: alpha, 2: 1.0}
  return np.vectorize(lambda x: table[int(x)])(labels).astype(np.float64)


def ref_turn_weights(i, c, lengths, normalize=True):
  s = i * c
  if not normalize:
    return s
  den = float(np.sum(lengths * s))
  return np.zeros_like(s) if den == 0 else s * np.sum(lengths) / den


def ref_ppo(logp, old, adv, eps=0.2, dual=3.0, clamp=20.0):
  r = np.exp(np.clip(logp - old, -clamp, clamp))
  loss = np.maximum(-r * adv, -np.clip(r, 1 - eps, 1 + eps) * adv)
  return np.where(adv < 0, np.minimum(loss, -dual * adv), loss)


def ref_loss(student_logits, raw, cfg):
  """E3/E4/E9 of docs/method.md written per turn; `raw` holds NumPy arrays incl. teacher logits.

  pi_old of E4 is the batch's behaviour log-probs, or with cfg["old_logprobs"] = "current" the
  student's own log-probs at these logits (r = 1).
  """
  tokens, turn_ids, num_turns = raw["tokens"], raw["turn_ids"], raw["num_turns"]
  b, s, v = student_logits.shape
  method = cfg["method"]
  intervened, confident, normalised = BUILTIN_SCORES[method]
  top1, ent = ref_token_top1_entropy(raw["teacher_logits"])
  i_bt = ref_intervention(raw["labels"], cfg["alpha"]) if intervened else np.ones((b, num_turns))
  c = ref_confidence(top1, ent, turn_ids, num_turns, cfg["confidence"], v) if confident else None
  # Token-level score s = i_t * c (c_t, or c_{t,j} for token_top1).
  score = np.zeros((b, s))
  resp = np.zeros((b, s), bool)
  for i in range(b):
    for j in range(s):
      t = turn_ids[i, j]
      if 1 <= t <= num_turns:
        resp[i, j] = True
        cc = 1.0 if c is None else (c[i, j] if cfg["confidence"] == "token_top1" else c[i, t - 1])
        score[i, j] = i_bt[i, t - 1] * cc
  n = resp.sum()
  if normalised:
    den = score.sum()
    w = np.zeros_like(score) if den == 0 else score * n / den
  else:
    w = score
  logp = ref_token_logprobs(student_logits, tokens)
  if method == "sft":
    ell = -w * logp
  elif cfg["estimator"] == "sampled":
    teacher_logp = ref_token_logprobs(raw["teacher_logits"], tokens)
    old = raw["behaviour_logprobs"] if cfg.get("old_logprobs", "batch") == "batch" else logp
    ell = ref_ppo(logp, old, -w * (old - teacher_logp))
  else:
    ell = w * ref_divergence(student_logits, raw["teacher_logits"], cfg["divergence"])
  ell = np.where(resp, ell, 0.0)
  if cfg["aggregation"] == "token_mean":
    return 0.0 if n == 0 else ell.sum() / n
  rows = [ell[i, resp[i]].mean() for i in range(b) if resp[i].any()]
  return float(np.mean(rows)) if rows else 0.0


# ----------------------------------------------------------------------------------------
# Random batches: prompt, then (observation, response) per turn, then padding.
# ----------------------------------------------------------------------------------------


def random_turn_ids(rng, b, s, num_turns):
  """[B, S]: each row has 0..T turns; responses may be empty, rows may end early."""
  out = np.zeros((b, s), np.int32)
  for i in range(b):
    pos = int(rng.integers(1, 3))  # Prompt: position 0 is never a response token.
    for t in range(1, int(rng.integers(0, num_turns + 1)) + 1):
      pos += int(rng.integers(0, 3))  # Observation / template tokens.
      length = int(rng.integers(0, 4))  # 0 gives an empty turn.
      out[i, pos:pos + length] = t
      pos += length
  return out


def random_case(seed, b, s, v, num_turns, *, stats=True):
  rng = np.random.default_rng(seed)
  raw = {
      "turn_ids": random_turn_ids(rng, b, s, num_turns),
      "tokens": rng.integers(0, v, (b, s)).astype(np.int32),
      "labels": rng.integers(0, 3, (b, num_turns)).astype(np.int32),
      "teacher_logits": rng.normal(size=(b, s, v)) * 2.0,
      "num_turns": num_turns,
  }
  student_logits = rng.normal(size=(b, s, v)) * 2.0
  raw["behaviour_logprobs"] = (ref_token_logprobs(student_logits, raw["tokens"])
                               + rng.normal(size=(b, s)) * 0.7)
  batch = {k: jnp.asarray(raw[k], jnp.float32 if raw[k].dtype == np.float64 else None)
           for k in ("turn_ids", "tokens", "labels", "teacher_logits", "behaviour_logprobs")}
  if stats:
    top1, ent = ref_token_top1_entropy(raw["teacher_logits"])
    batch.update(
        teacher_logprobs=jnp.asarray(ref_token_logprobs(raw["teacher_logits"], raw["tokens"]), jnp.float32),
        teacher_top1=jnp.asarray(top1, jnp.float32),
        teacher_entropy=jnp.asarray(ent, jnp.float32),
    )
  return student_logits, jnp.asarray(student_logits, jnp.float32), raw, batch


# A few sizes only: every new shape recompiles, and the layouts vary through the seed.
shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.sampled_from((1, 3)),  # B
    st.sampled_from((2, 11)),  # S
    st.sampled_from((2, 5)),  # V
    st.sampled_from((1, 4)),  # T
)


def loss_and_grad(**options):
  """-> fn(logits, batch) = ((loss, metrics), d loss / d logits), eagerly.

  Eager on purpose: the per-primitive compile cache is shared by every test, while a
  jitted loss would compile afresh for each option set.
  """
  fn = lambda logits, batch: losses.sage_opd_loss(logits, batch, **options)
  return jax.value_and_grad(fn, has_aux=True)


def close(actual, expected, rtol=2e-4, atol=2e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# Public functions vs the references.
# ----------------------------------------------------------------------------------------


@SETTINGS
@hypothesis.given(shapes)
def test_token_level_functions_match_reference(shape):
  seed, b, s, v, t = shape
  ref_logits, logits, raw, batch = random_case(seed, b, s, v, t)
  tokens, teacher = raw["tokens"], raw["teacher_logits"]
  close(losses.token_logprobs(logits, batch["tokens"]), ref_token_logprobs(ref_logits, tokens))
  student_lp = ref_token_logprobs(ref_logits, tokens)
  teacher_lp = ref_token_logprobs(teacher, tokens)
  close(losses.sampled_reverse_kl(jnp.asarray(student_lp, jnp.float32), jnp.asarray(teacher_lp, jnp.float32)),
        student_lp - teacher_lp)
  teacher32 = batch["teacher_logits"]
  close(losses.full_reverse_kl(logits, teacher32), ref_divergence(ref_logits, teacher, "reverse_kl"))
  close(losses.forward_kl(logits, teacher32), ref_divergence(ref_logits, teacher, "forward_kl"))
  close(losses.jsd(logits, teacher32, 0.3), ref_divergence(ref_logits, teacher, "jsd", beta=0.3))
  stats = losses.teacher_token_stats(teacher32, batch["tokens"])
  top1, ent = ref_token_top1_entropy(teacher)
  close(stats["teacher_logprobs"], teacher_lp)
  close(stats["teacher_top1"], top1)
  close(stats["teacher_entropy"], ent)


def _head_inputs(*, seed: int):
  """Hidden states [2, 11, 6], an LM head [6, 13], tokens and loss weights [2, 11] for the chunked-head tests."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(2, 11, 6)), jnp.float32), jnp.asarray(rng.normal(size=(6, 13)), jnp.float32),
          jnp.asarray(rng.integers(0, 13, (2, 11)), jnp.int32), jnp.asarray(rng.random((2, 11)), jnp.float32))


@pytest.mark.parametrize("chunk", [1, 4, 11, 16])  # 4 does not divide S = 11; 16 > S pads one chunk.
def test_chunked_token_logprobs_equal_the_whole_logits_with_gradients(chunk):
  hidden, head, tokens, weights = _head_inputs(seed=chunk)

  def whole(h, w):
    return losses.token_logprobs(h @ w, tokens)

  def chunked(h, w):
    return losses.chunked_token_logprobs(lambda h_BxCxD: h_BxCxD @ w, h, tokens, chunk)

  ref = ref_token_logprobs(np.asarray(hidden, np.float64) @ np.asarray(head, np.float64), np.asarray(tokens))
  close(chunked(hidden, head), ref, rtol=1e-5, atol=1e-5)
  grad = lambda fn: jax.grad(lambda h, w: jnp.sum(weights * fn(h, w)), argnums=(0, 1))(hidden, head)
  for got, want in zip(grad(chunked), grad(whole)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 4, 16])
def test_chunked_token_logprobs_of_read_tokens_run_the_head_over_those_only(chunk):
  hidden, head, tokens, weights = _head_inputs(seed=chunk)
  # Row 0 reads 3 tokens (one of them token 0, which no position predicts), row 1 five, the last included.
  read = np.zeros((2, 11), bool)
  read[0, [0, 4, 5]] = True
  read[1, [2, 3, 7, 9, 10]] = True
  heads_run = []

  def lm_head(w):
    def run(h_BxCxD):
      jax.debug.callback(lambda: heads_run.append(1))
      return h_BxCxD @ w
    return run

  chunked = lambda h, w: losses.chunked_token_logprobs(lm_head(w), h, tokens, chunk, read=jnp.asarray(read))
  ref = ref_token_logprobs(np.asarray(hidden, np.float64) @ np.asarray(head, np.float64), np.asarray(tokens))
  got = jax.jit(chunked)(hidden, head)
  jax.block_until_ready(got)
  close(got, np.where(read, ref, 0.0), rtol=1e-5, atol=1e-5)
  assert len(heads_run) == -(-5 // chunk)  # The chunks of the longest row's 5 predicting positions, no more.
  # The gradient of what is read: that of the whole logits'.
  grad = lambda fn: jax.grad(lambda h, w: jnp.sum(weights * read * fn(h, w)), argnums=(0, 1))(hidden, head)
  whole = lambda h, w: losses.token_logprobs(h @ w, tokens)
  for got, want in zip(grad(chunked), grad(whole)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def ref_support_logprobs(logits, tokens, support):
  """float64: log-prob of token s renormalised over support[s] (ids >= 0) under logits[s - 1]; whole vocab if none."""
  b_, s_, _ = logits.shape
  out = np.zeros((b_, s_))
  for b in range(b_):
    for s in range(1, s_):
      ids = [i for i in support[b, s] if i >= 0] or list(range(logits.shape[-1]))
      out[b, s] = logits[b, s - 1, tokens[b, s]] - np.log(np.sum(np.exp(logits[b, s - 1, ids])))
  return out


@pytest.mark.parametrize("chunk", [0, 4])
def test_support_logprobs_renormalise_over_decodings_ids_with_gradients(chunk):
  rng = np.random.default_rng(7)
  hidden = jnp.asarray(rng.normal(size=(2, 9, 5)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
  tokens = rng.integers(0, 12, (2, 9))
  support = np.full((2, 9, 4), -1)
  # Constrained positions (the rest: the whole vocabulary); width 1 is a forced token, log-prob exactly 0.
  for b, s, width in [(0, 2, 1), (0, 3, 4), (1, 5, 2), (1, 8, 3)]:
    ids = rng.choice([i for i in range(12) if i != tokens[b, s]], width - 1, replace=False)
    support[b, s, :width] = np.concatenate([[tokens[b, s]], ids])
  logp = lambda h, w: (losses.token_logprobs(h @ w, jnp.asarray(tokens), jnp.asarray(support)) if not chunk else
                       losses.chunked_token_logprobs(lambda x: x @ w, h, jnp.asarray(tokens), chunk, jnp.asarray(support)))
  ref_logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
  close(logp(hidden, head), ref_support_logprobs(ref_logits, tokens, support), rtol=1e-5, atol=1e-5)
  forced = (support >= 0).sum(-1) == 1
  assert forced.any() and np.all(np.asarray(logp(hidden, head))[forced] == 0)
  # The gradient: the float64 renormalised log-probs' by central differences, in one random direction.
  direction = rng.normal(size=head.shape)
  weights = rng.random((2, 9))
  grad = jax.grad(lambda w: jnp.sum(jnp.asarray(weights, jnp.float32) * logp(hidden, w)))(head)
  f = lambda w: np.sum(weights * ref_support_logprobs(np.asarray(hidden, np.float64) @ w, tokens, support))
  h64 = np.asarray(head, np.float64)
  numeric = (f(h64 + 1e-6 * direction) - f(h64 - 1e-6 * direction)) / 2e-6
  assert float(np.sum(np.asarray(grad, np.float64) * direction)) == pytest.approx(numeric, rel=1e-4, abs=1e-5)


def test_student_logprobs_stand_in_for_logits_only_where_the_objective_reads_no_more():
  _, logits, _, batch = random_case(0, 2, 9, 7, 3)
  logp = losses.token_logprobs(logits, batch["tokens"])
  for method in ("sft", "opd", "sage_opd"):
    want, want_metrics = losses.sage_opd_loss(logits, batch, method=method)
    got, got_metrics = losses.sage_opd_loss(None, batch, method=method, student_logprobs=logp)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), got_metrics, want_metrics)
  with pytest.raises(ValueError, match="needs the student's"):
    losses.sage_opd_loss(None, batch, method="opd", estimator="full", student_logprobs=logp)
  with pytest.raises(ValueError, match="exactly one"):
    losses.sage_opd_loss(logits, batch, method="opd", student_logprobs=logp)


def ref_topk(teacher_logits, k):
  """Token-aligned teacher top-k ids and log-probs [B, S, K]; entry 0 is 0."""
  b, s, _ = teacher_logits.shape
  ids, logprobs = np.zeros((b, s, k), np.int32), np.zeros((b, s, k))
  for i in range(b):
    for j in range(1, s):
      logq = ref_log_softmax(teacher_logits[i, j - 1])
      ids[i, j] = np.argsort(-logq, kind="stable")[:k]
      logprobs[i, j] = logq[ids[i, j]]
  return ids, logprobs


def ref_topk_divergence(student_logits, ids, teacher_logprobs, kind, beta=0.5):
  """Both distributions renormalised over the teacher's top-k ids."""
  b, s, _ = student_logits.shape
  out = np.zeros((b, s))
  for i in range(b):
    for j in range(1, s):
      p = np.exp(ref_log_softmax(student_logits[i, j - 1]))[ids[i, j]]
      q = np.exp(teacher_logprobs[i, j])
      p, q = p / p.sum(), q / q.sum()
      kl = lambda a, c: float(np.sum(a * np.log(a / c)))
      m = beta * q + (1 - beta) * p
      out[i, j] = {"reverse_kl": kl(p, q), "forward_kl": kl(q, p),
                   "jsd": beta * kl(q, m) + (1 - beta) * kl(p, m)}[kind]
  return out


@SETTINGS
@hypothesis.given(shapes, st.integers(1, 5), st.sampled_from(losses.DIVERGENCES))
def test_topk_divergence_matches_reference(shape, k, kind):
  seed, b, s, v, t = shape
  k = min(k, v)
  ref_logits, logits, raw, _ = random_case(seed, b, s, v, t)
  ids, logprobs = ref_topk(raw["teacher_logits"], k)
  got = losses.topk_divergence(logits, jnp.asarray(ids), jnp.asarray(logprobs, jnp.float32), kind, 0.4)
  close(got, ref_topk_divergence(ref_logits, ids, logprobs, kind, 0.4))


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_topk_divergence_with_padded_lists_is_the_divergence_over_the_listed_ids(kind):
  """Ids < 0 pad a position's list (the expert teacher's decoding supports): the divergence is the reference's
  over the listed ids alone, 0 where none is listed, and its gradient finite."""
  ref_logits, logits, raw, _ = random_case(3, 2, 6, 11, 2)
  ids, logprobs = ref_topk(raw["teacher_logits"], 4)
  widths = np.random.default_rng(0).integers(0, 5, ids.shape[:2])  # 0 to 4 listed ids per position.
  padded_ids = np.where(np.arange(4) < widths[..., None], ids, -1)
  padded_logprobs = np.where(padded_ids >= 0, logprobs, 123.0)  # Padding's values must not matter.
  got = losses.topk_divergence(logits, jnp.asarray(padded_ids), jnp.asarray(padded_logprobs, jnp.float32), kind, 0.4)
  want = np.zeros(widths.shape)
  for i, j in zip(*np.nonzero(widths)):
    n = widths[i, j]
    want[i, j] = ref_topk_divergence(ref_logits[i:i + 1, j - 1:j + 1], ids[i:i + 1, j:j + 1, :n][:, [0, 0]],
                                     logprobs[i:i + 1, j:j + 1, :n][:, [0, 0]], kind, 0.4)[0, 1] if j else 0.0
  close(got, want)
  grad = jax.grad(lambda x: jnp.sum(losses.topk_divergence(x, jnp.asarray(padded_ids),
                                                           jnp.asarray(padded_logprobs, jnp.float32), kind)))(logits)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_topk_with_k_equal_v_is_the_exact_loss(divergence):
  _, logits, raw, batch = _opd_batch(8)
  ids, logprobs = ref_topk(raw["teacher_logits"], 5)
  topk_batch = {k: v for k, v in batch.items() if k != "teacher_logits"}
  topk_batch.update(teacher_topk_ids=jnp.asarray(ids), teacher_topk_logprobs=jnp.asarray(logprobs, jnp.float32))
  fn = lambda bt: loss_and_grad(estimator="full", divergence=divergence)(logits, bt)
  ((loss, _), grad), ((loss_k, _), grad_k) = fn(batch), fn(topk_batch)
  close(loss_k, float(loss), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_k, grad, rtol=1e-4, atol=1e-6)


def test_first_position_is_zero_and_bf16_logits_are_upcast():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.bfloat16)
  tokens = jnp.asarray(rng.integers(0, 11, (2, 5)))
  lp = losses.token_logprobs(logits, tokens)
  assert lp.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(lp[:, 0]), 0.0)
  kl = losses.full_reverse_kl(logits, logits[:, ::-1])
  assert kl.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(kl[:, 0]), 0.0)


def test_masked_vocab_entries_add_nothing_and_stay_finite():
  """Teacher and student both give -inf to a padded vocab entry: KL stays finite."""
  rng = np.random.default_rng(1)
  student = rng.normal(size=(1, 4, 5))
  teacher = rng.normal(size=(1, 4, 5))
  student[..., -1] = teacher[..., -1] = -np.inf
  s32, t32 = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
  for fn in (losses.full_reverse_kl, losses.forward_kl):
    value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t32)))(s32)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad[..., :-1]))
  close(losses.full_reverse_kl(s32, t32), ref_divergence(student[..., :-1], teacher[..., :-1], "reverse_kl"))


@SETTINGS
@hypothesis.given(shapes, st.sampled_from(losses.CONFIDENCE_MODES))
def test_turn_functions_match_reference(shape, mode):
  seed, b, s, v, t = shape
  _, _, raw, batch = random_case(seed, b, s, v, t)
  turn_ids = raw["turn_ids"]
  lengths = ref_turn_lengths(turn_ids, t)
  np.testing.assert_array_equal(losses.turn_lengths(batch["turn_ids"], t), lengths)
  top1, ent = ref_token_top1_entropy(raw["teacher_logits"])
  expected = ref_confidence(top1, ent, turn_ids, t, mode, v)
  close(losses.teacher_confidence(batch["teacher_logits"], batch["turn_ids"], t, mode), expected)
  close(losses.turn_confidence(batch["teacher_top1"], batch["teacher_entropy"], batch["turn_ids"], t,
                               mode, vocab_size=v), expected)
  i = ref_intervention(raw["labels"], 0.3)
  close(losses.intervention_weights(batch["labels"], 0.3), i)
  if mode != "token_top1":
    for normalize in (True, False):
      close(losses.sage_turn_weights(jnp.asarray(i), jnp.asarray(expected), jnp.asarray(lengths), normalize),
            ref_turn_weights(i, expected, lengths, normalize))


def test_t_larger_than_turns_and_empty_turns():
  turn_ids = jnp.array([[0, 0, 1, 1, 0, 0, 3, 0]])  # Turn 2 empty, turns 4-5 absent.
  lengths = losses.turn_lengths(turn_ids, 5)
  np.testing.assert_array_equal(lengths, [[2, 0, 1, 0, 0]])
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 4)), jnp.float32)
  for mode in ("turn_mean_top1", "neg_entropy", "none"):
    c = np.asarray(losses.teacher_confidence(logits, turn_ids, 5, mode))
    assert np.all(c[0, [1, 3, 4]] == 0) and np.all(c[0, [0, 2]] > 0), mode
  w = losses.sage_turn_weights(jnp.ones((1, 5)), jnp.ones((1, 5)), lengths)
  np.testing.assert_array_equal(np.asarray(w), 1.0)  # N / sum(L) = 1: empty turns change nothing.


def test_all_zero_scores_give_zero_weights_and_finite_grads():
  lengths = jnp.array([[3, 0, 2]])
  fn = lambda i, c: jnp.sum(losses.sage_turn_weights(i, c, lengths))
  w = losses.sage_turn_weights(jnp.zeros((1, 3)), jnp.ones((1, 3)), lengths)
  np.testing.assert_array_equal(np.asarray(w), 0.0)
  grads = jax.grad(fn, argnums=(0, 1))(jnp.zeros((1, 3)), jnp.ones((1, 3)))
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)


@SETTINGS
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_ppo_clip_loss_matches_reference(seed):
  rng = np.random.default_rng(seed)
  logp, old = rng.normal(size=(3, 7)) * 2, rng.normal(size=(3, 7)) * 2
  adv = rng.normal(size=(3, 7))
  logp[0, 0], old[0, 0] = 30.0, 0.0  # Beyond the log-ratio clamp.
  got = losses.ppo_clip_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv)))
  close(got, ref_ppo(logp, old, adv), rtol=1e-4, atol=1e-4)


def test_dual_clip_caps_negative_advantages():
  logp = jnp.log(jnp.array([[10.0, 10.0]]))  # r = 10 > dual clip 3.
  adv = jnp.array([[-1.0, 1.0]])
  loss = losses.ppo_clip_loss(logp, jnp.zeros((1, 2)), adv)
  # A < 0: min(max(10, 1.2), 3) = 3. A > 0: max(-10, -1.2) = -1.2.
  close(loss, np.array([[3.0, -1.2]]), rtol=1e-6)
  assert float(losses.ppo_clip_loss(logp, jnp.zeros((1, 2)), adv, dual_clip=None)[0, 0]) == pytest.approx(10.0)


# ----------------------------------------------------------------------------------------
# The composed loss.
# ----------------------------------------------------------------------------------------

loss_configs = st.fixed_dictionaries({
    "method": st.sampled_from(sorted(BUILTIN_SCORES)),
    "estimator": st.sampled_from(losses.ESTIMATORS),
    "divergence": st.sampled_from(losses.DIVERGENCES),
    "aggregation": st.sampled_from(losses.AGGREGATIONS),
    "confidence": st.sampled_from(losses.CONFIDENCE_MODES),
    "alpha": st.sampled_from((0.5, 0.25)),
    "stats": st.booleans(),  # Per-token teacher stats, or only teacher logits.
})


@pytest.mark.parametrize("old_logprobs", ["batch", "current"])
@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(shapes, loss_configs)
def test_sage_opd_loss_matches_reference(old_logprobs, shape, cfg):
  seed, b, s, v, t = shape
  cfg["old_logprobs"] = old_logprobs
  if old_logprobs == "current":
    cfg["estimator"] = "sampled"  # pi_old exists only in the sampled estimator's PPO ratio.
  if cfg["estimator"] == "sampled":
    cfg["divergence"] = "reverse_kl"
  ref_logits, logits, raw, batch = random_case(seed, b, s, v, t, stats=cfg["stats"])
  kwargs = {k: cfg[k] for k in ("method", "estimator", "divergence", "aggregation", "confidence", "alpha",
                                "old_logprobs")}
  loss, metrics = losses.sage_opd_loss(logits, batch, **kwargs)
  close(loss, ref_loss(ref_logits, raw, cfg), rtol=5e-4, atol=5e-5)
  if old_logprobs == "current" and cfg["method"] != "sft":
    assert float(metrics["clip_frac"]) == 0.0  # r = 1 exactly: nothing is clipped.
  assert float(metrics["num_tokens"]) == float(np.sum(raw["turn_ids"] > 0))
  for key in ("skip_frac", "weak_frac", "strong_frac"):
    assert key in metrics
  if cfg["method"] != "sft":
    assert {"kl_mean", "kl_max", "weight_mean", "num_trained_tokens", "confidence_mean"} <= set(metrics)


def test_metrics_match_reference():
  ref_logits, logits, raw, batch = _opd_batch(3)
  num_turns, vocab = 4, 5
  _, metrics = losses.sage_opd_loss(logits, batch, estimator="full")
  turn_ids, labels = raw["turn_ids"], raw["labels"]
  lengths = ref_turn_lengths(turn_ids, num_turns)
  nonempty = lengths > 0
  for code, key in enumerate(("skip_frac", "weak_frac", "strong_frac")):
    close(metrics[key], np.sum(nonempty & (labels == code)) / nonempty.sum())
  top1, ent = ref_token_top1_entropy(raw["teacher_logits"])
  c = ref_confidence(top1, ent, turn_ids, num_turns, "turn_mean_top1", vocab)
  close(metrics["confidence_mean"], c[nonempty].mean())
  w_bt = ref_turn_weights(ref_intervention(labels, 0.5), c, lengths)
  w_tok = np.array([[w_bt[i, tt - 1] if tt > 0 else 0.0 for tt in row] for i, row in enumerate(turn_ids)])
  close(losses.token_weights(batch), w_tok)  # The weights the trainer logs are the loss's.
  close(metrics["weight_mean"], w_tok.sum() / (turn_ids > 0).sum())
  trained = w_tok > 0
  kl = ref_divergence(ref_logits, raw["teacher_logits"], "reverse_kl")
  close(metrics["kl_mean"], kl[trained].mean())
  close(metrics["kl_max"], kl[trained].max())
  assert float(metrics["num_trained_tokens"]) == trained.sum()


@pytest.mark.parametrize("old_logprobs", ["batch", "current"])
def test_gradient_matches_reinforce_form_at_ratio_one(old_logprobs):
  """(E4) with r = 1: d loss / d logits[s-1] = w d (onehot(y_s) - softmax) / N.

  "batch" gets r = 1 from behaviour log-probs equal to the current ones; "current" by
  construction, with the batch's stale behaviour log-probs left in place.
  """
  ref_logits, logits, raw, batch = _opd_batch(7)
  (b, s, v), num_turns = ref_logits.shape, 4
  if old_logprobs == "batch":
    batch["behaviour_logprobs"] = jnp.asarray(ref_token_logprobs(ref_logits, raw["tokens"]), jnp.float32)
  grad = loss_and_grad(old_logprobs=old_logprobs)(logits, batch)[1]
  turn_ids, tokens = raw["turn_ids"], raw["tokens"]
  top1, ent = ref_token_top1_entropy(raw["teacher_logits"])
  c = ref_confidence(top1, ent, turn_ids, num_turns, "turn_mean_top1", v)
  w_bt = ref_turn_weights(ref_intervention(raw["labels"], 0.5), c, ref_turn_lengths(turn_ids, num_turns))
  d = ref_token_logprobs(ref_logits, tokens) - ref_token_logprobs(raw["teacher_logits"], tokens)
  n = np.sum(turn_ids > 0)
  expected = np.zeros_like(ref_logits)
  for i in range(b):
    for j in range(1, s):
      if turn_ids[i, j] > 0:
        onehot = np.eye(v)[tokens[i, j]]
        softmax = np.exp(ref_log_softmax(ref_logits[i, j - 1]))
        expected[i, j - 1] = w_bt[i, turn_ids[i, j] - 1] * d[i, j] * (onehot - softmax) / n
  close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator, old_logprobs", [("sampled", "batch"), ("sampled", "current"), ("full", "batch")])
def test_gradients_match_finite_differences(estimator, old_logprobs):
  """With old_logprobs="current", pi_old is the current policy held fixed (stop_gradient): the
  gradient is the derivative of the "batch" surrogate whose behaviour log-probs are frozen at
  the current ones, and that is what the finite differences take."""
  with jax.enable_x64(True):
    _, _, raw, _ = random_case(11, 2, 8, 4, 2)
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float64)
    batch = {k: jnp.asarray(raw[k]) for k in ("turn_ids", "tokens", "labels", "teacher_logits")}
    batch["teacher_logprobs"] = jnp.asarray(ref_token_logprobs(raw["teacher_logits"], raw["tokens"]))
    batch["teacher_top1"] = jnp.asarray(ref_token_top1_entropy(raw["teacher_logits"])[0])
    # Inside the clip range, away from its kinks, so the surrogate is smooth here.
    batch["behaviour_logprobs"] = jnp.asarray(ref_token_logprobs(np.asarray(logits), raw["tokens"])
                                              + rng.uniform(-0.05, 0.05, (2, 8)))
    grad = jax.jit(jax.grad(lambda x: losses.sage_opd_loss(x, batch, estimator=estimator,
                                                           old_logprobs=old_logprobs)[0]))(logits)
    assert grad.dtype == jnp.float64
    if old_logprobs == "current":
      # The batch keeps its behaviour log-probs (up to 0.05 off), so "current" reading them would miss.
      batch["behaviour_logprobs"] = jnp.asarray(ref_token_logprobs(np.asarray(logits), raw["tokens"]))
    fn = jax.jit(lambda x: losses.sage_opd_loss(x, batch, estimator=estimator)[0])
    for _ in range(3):
      direction = jnp.asarray(rng.normal(size=logits.shape))
      eps = 1e-6
      fd = (fn(logits + eps * direction) - fn(logits - eps * direction)) / (2 * eps)
      np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-6, atol=1e-9)


def _opd_batch(seed=0, b=3, s=11, v=5, t=4):
  return random_case(seed, b, s, v, t)


@pytest.mark.parametrize("estimator", losses.ESTIMATORS)
@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_sage_with_unit_intervention_and_confidence_is_opd_exactly(estimator, aggregation):
  _, logits, _, batch = _opd_batch()
  batch["labels"] = jnp.full_like(batch["labels"], losses.Label.STRONG)
  run = lambda method: loss_and_grad(method=method, confidence="none", estimator=estimator,
                                     aggregation=aggregation)(logits, batch)
  ((loss_sage, _), grad_sage), ((loss_opd, _), grad_opd) = run("sage_opd"), run("opd")
  np.testing.assert_array_equal(np.asarray(loss_sage), np.asarray(loss_opd))
  np.testing.assert_array_equal(np.asarray(grad_sage), np.asarray(grad_opd))


def test_equal_weights_make_normalisation_a_no_op():
  _, logits, _, batch = _opd_batch(1)
  batch["labels"] = jnp.full_like(batch["labels"], losses.Label.STRONG)
  kw = dict(confidence="none", estimator="full")
  run = lambda method, batch: loss_and_grad(method=method, **kw)(logits, batch)[0][0]
  normed, unnormed = run("sage_opd", batch), run("sage_opd_no_norm", batch)
  close(normed, float(unnormed), rtol=1e-6)
  # Equal but non-unit scores: normalisation restores exactly the OPD scale.
  batch["teacher_top1"] = jnp.full_like(batch["teacher_top1"], 0.37)
  kw["confidence"] = "turn_mean_top1"
  run = lambda method, batch: loss_and_grad(method=method, **kw)(logits, batch)[0][0]
  opd = run("opd", batch)
  close(run("sage_opd", batch), float(opd), rtol=1e-6)
  close(run("sage_opd_no_norm", batch), 0.37 * float(opd), rtol=1e-5)


@pytest.mark.parametrize("estimator", losses.ESTIMATORS)
@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_all_skip_gives_zero_loss_and_zero_grads(estimator, aggregation):
  _, logits, _, batch = _opd_batch(2)
  batch["labels"] = jnp.zeros_like(batch["labels"])
  batch["teacher_logprobs"] = batch["teacher_logprobs"].at[:, 0].set(-jnp.inf)  # Padding garbage.
  for extra in ({}, dict(global_num_tokens=jnp.float32(40.0), global_weight_sum=jnp.float32(0.0),
                          global_num_sequences=jnp.float32(5.0))):
    fn = lambda x, extra: losses.sage_opd_loss(x, batch, estimator=estimator, aggregation=aggregation, **extra)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logits, extra)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    for value in metrics.values():
      assert np.isfinite(float(value))
    assert float(metrics["num_trained_tokens"]) == 0.0


def test_padding_and_observation_tokens_never_change_loss_or_grad():
  _, logits, raw, batch = _opd_batch(4)
  rng = np.random.default_rng(0)
  turn_ids = raw["turn_ids"]
  off = turn_ids == 0  # Tokens that are not response tokens.
  # Logits at s - 1 serve token s; the others predict prompt/observation/padding tokens.
  unused_logit = np.ones_like(off)
  unused_logit[:, :-1] = off[:, 1:]
  perturbed = dict(batch)
  perturbed["tokens"] = jnp.where(off, jnp.asarray(rng.integers(0, 5, off.shape)), batch["tokens"])
  for key in ("teacher_logprobs", "behaviour_logprobs", "teacher_top1", "teacher_entropy"):
    perturbed[key] = jnp.where(off, jnp.asarray(rng.normal(size=off.shape), jnp.float32), batch[key])
  noise = jnp.asarray(rng.normal(size=logits.shape) * 5, jnp.float32)
  perturbed["teacher_logits"] = jnp.where(unused_logit[..., None], noise, batch["teacher_logits"])
  perturbed_logits = jnp.where(unused_logit[..., None], noise[:, ::-1], logits)
  # Two extra padding columns as well.
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 2)] + [(0, 0)] * (x.ndim - 2))
  padded = {k: (pad(v) if k != "labels" else v) for k, v in perturbed.items()}
  for estimator in losses.ESTIMATORS:
    for aggregation in losses.AGGREGATIONS:
      fn = loss_and_grad(estimator=estimator, aggregation=aggregation)
      (loss, _), grad = fn(logits, batch)
      (loss_p, _), grad_p = fn(perturbed_logits, perturbed)
      (loss_pad, _), grad_pad = fn(pad(perturbed_logits), padded)
      close(loss_p, float(loss), rtol=1e-6, atol=1e-7)
      close(loss_pad, float(loss), rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(grad_p, grad, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(grad_pad[:, :-2], grad, rtol=1e-5, atol=1e-7)
      np.testing.assert_array_equal(np.asarray(grad)[unused_logit.astype(bool)], 0.0)


@pytest.mark.parametrize("estimator", losses.ESTIMATORS)
def test_shifting_turn_ids_by_one_changes_the_loss(estimator):
  _, logits, _, batch = _opd_batch(5)
  shifted = dict(batch, turn_ids=jnp.pad(batch["turn_ids"][:, :-1], ((0, 0), (1, 0))))
  for method in ("opd", "sage_opd"):
    fn = loss_and_grad(method=method, estimator=estimator)
    loss, loss_shifted = fn(logits, batch)[0][0], fn(logits, shifted)[0][0]
    assert abs(float(loss) - float(loss_shifted)) > 1e-3 * (1 + abs(float(loss)))


def test_one_turn_per_row_layout_equals_episode_layout():
  """T = 1: each turn as its own row (with its history) gives the same token_mean loss."""
  ref_logits, logits, raw, batch = _opd_batch(9)
  rows = []  # (episode row, turn) for every non-empty turn.
  for i in range(3):
    for t in range(1, 5):
      if np.any(raw["turn_ids"][i] == t):
        rows.append((i, t))
  split = {k: [] for k in batch}
  for i, t in rows:
    for k, v in batch.items():
      if k == "labels":
        split[k].append(v[i, t - 1:t])
      elif k == "turn_ids":
        split[k].append(jnp.where(v[i] == t, 1, 0))
      else:
        split[k].append(v[i])
  split = {k: jnp.stack(v) for k, v in split.items()}
  split_logits = jnp.stack([logits[i] for i, _ in rows])
  for estimator in losses.ESTIMATORS:
    for method in ("sage_opd", "sage_opd_no_norm", "opd"):
      fn = loss_and_grad(method=method, estimator=estimator)
      loss, loss_t1 = fn(logits, batch)[0][0], fn(split_logits, split)[0][0]
      close(loss_t1, float(loss), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Global normalisation: devices and micro-batches.
# ----------------------------------------------------------------------------------------


def _linear_case(seed=0, b=8, s=11, h=4, v=5, t=4):
  """A replicated parameter W and batch-sharded features, so grads need the psum too."""
  _, _, raw, batch = random_case(seed, b, s, v, t)
  rng = np.random.default_rng(seed + 1)
  x = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
  return w, x, batch


@pytest.mark.parametrize("old_logprobs", ["batch", "current"])
@pytest.mark.parametrize("method, aggregation", (
    ("sage_opd", "token_mean"), ("sage_opd", "seq_mean_token_mean"), ("sage_opd_no_norm", "token_mean")))
def test_sharded_equals_unsharded(method, aggregation, old_logprobs):
  assert jax.device_count() == 8
  w, x, batch = _linear_case()
  fn = lambda w, x, b, axis_name=None: losses.sage_opd_loss(
      x @ w, b, method=method, aggregation=aggregation, old_logprobs=old_logprobs, axis_name=axis_name)
  (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(w, x, batch)

  mesh = jax.make_mesh((8,), ("data",))
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  x_s, batch_s = shard(x), jax.tree.map(shard, batch)
  w_r = jax.device_put(w, NamedSharding(mesh, P()))
  sharded = jax.jit(jax.shard_map(
      lambda w, x, b: jax.value_and_grad(functools.partial(fn, axis_name="data"), has_aux=True)(w, x, b),
      mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=((P(), P()), P())))
  (loss_s, metrics_s), grad_s = sharded(w_r, x_s, batch_s)
  close(loss_s, float(loss), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_s, grad, rtol=1e-4, atol=1e-6)
  for key, value in metrics.items():
    close(metrics_s[key], float(value), rtol=1e-5, atol=1e-6)
  # jit over a NamedSharding needs no axis_name: XLA makes the sums global itself.
  (loss_j, _), grad_j = jax.jit(jax.value_and_grad(fn, has_aux=True))(w_r, x_s, batch_s)
  close(loss_j, float(loss), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_j, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_micro_batches_with_global_totals_sum_to_the_full_batch(aggregation):
  w, x, batch = _linear_case(3)
  fn = jax.jit(jax.value_and_grad(
      lambda w, x, b, totals: losses.sage_opd_loss(x @ w, b, aggregation=aggregation, **totals)[0]))
  loss, grad = fn(w, x, batch, {})
  micro = [jax.tree.map(lambda a: a[k:k + 2], (x, batch)) for k in range(0, 8, 2)]
  totals = [losses.loss_totals(b, aggregation=aggregation) for _, b in micro]
  totals = jax.tree.map(lambda *a: sum(a), *totals)
  loss_sum, grad_sum = 0.0, jnp.zeros_like(w)
  for xm, bm in micro:
    l, g = fn(w, xm, bm, totals)
    loss_sum, grad_sum = loss_sum + l, grad_sum + g
  close(loss_sum, float(loss), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_sum, grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Registry and validation.
# ----------------------------------------------------------------------------------------


def test_builtin_variants_declare_what_the_loop_needs():
  assert set(BUILTIN_SCORES) <= set(losses.registered_losses())
  for name, (intervened, _, normalised) in BUILTIN_SCORES.items():
    variant = losses.variant(name)
    assert variant.needs_labels == intervened, name  # The loop runs the judge exactly for these.
    assert variant.normalize == normalised, name
    assert variant.needs_teacher == (name != "sft"), name
    assert variant.rollouts == (2 if name == "opd_two_rollout" else 1), name
    assert variant.uses_judge == (intervened or name == "opd_two_rollout"), name


def test_registry_selects_methods_and_accepts_new_variants():
  _, logits, _, batch = _opd_batch(6)
  name = "test_only_squared_confidence"

  @losses.register_loss(name, needs_labels=True)
  def _squared(batch, options):
    return losses.batch_intervention(batch, options) * losses.batch_confidence(batch, options) ** 2

  try:
    # Feeding sqrt(top-1) to the squared variant must reproduce sage_opd on top-1 itself.
    sqrt_top1 = dict(batch, teacher_top1=batch["teacher_top1"] ** 0.5)
    kw = dict(estimator="full", confidence="token_top1")
    squared = losses.get_loss(name)(logits, sqrt_top1, **kw)[0]
    close(squared, float(losses.sage_opd_loss(logits, batch, **kw)[0]), rtol=1e-5)
    assert abs(float(squared) - float(losses.sage_opd_loss(logits, sqrt_top1, **kw)[0])) > 1e-4
    with pytest.raises(ValueError, match="already registered"):
      losses.register_loss(name)(_squared)
  finally:
    losses._REGISTRY.pop(name)
  with pytest.raises(ValueError, match="not a registered loss"):
    losses.sage_opd_loss(logits, batch, method=name)


def test_loss_options_are_checked_once_and_hashable():
  options = losses.LossOptions(dual_clip=None)  # Dual clip off: accepted, as `ppo_clip_loss` accepts it.
  assert hash(options) == hash(losses.LossOptions(dual_clip=None)) and options != losses.LossOptions()
  for field, value, message in (("jsd_beta", 0.0, "jsd_beta=0.0"), ("jsd_beta", 1.0, "jsd_beta=1.0"),
                                ("dual_clip", 1.0, "dual_clip=1.0"), ("alpha", 1.5, "alpha=1.5"),
                                ("method", "dpo", "method='dpo'"), ("old_logprobs", "old", "old_logprobs='old'"),
                                ("divergence", "jsd", "needs estimator='full'")):
    with pytest.raises(losses.LossOptionError, match=message) as e:
      losses.LossOptions(**{field: value})
    assert e.value.field == field
  # The loss's own primitives refuse the same values.
  with pytest.raises(ValueError, match="jsd_beta"):
    losses.jsd(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), 0.0)
  with pytest.raises(ValueError, match="dual_clip"):
    losses.ppo_clip_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)), dual_clip=1.0)


def test_a_variants_defaults_apply_where_the_caller_sets_nothing():
  name = "test_only_token_confidence"
  losses.register_loss(name, defaults={"confidence": "token_top1"})(losses.batch_confidence)
  try:
    assert losses.LossOptions.for_method(name).confidence == "token_top1"
    assert losses.LossOptions.for_method(name, confidence="none").confidence == "none"
    _, logits, _, batch = _opd_batch(6)
    want = losses.sage_opd_loss(logits, batch, method="sage_opd_no_intervention", confidence="token_top1")[0]
    close(losses.get_loss(name)(logits, batch)[0], float(want), rtol=1e-6)
  finally:
    losses._REGISTRY.pop(name)
  with pytest.raises(ValueError, match="confidnce"):
    losses.register_loss(name, defaults={"confidnce": "none"})


def test_bad_options_and_batches_raise_value_errors_naming_them():
  _, logits, _, batch = _opd_batch(6)
  with pytest.raises(ValueError, match="estimator"):
    losses.sage_opd_loss(logits, batch, estimator="exact")
  with pytest.raises(ValueError, match="needs estimator='full'"):
    losses.sage_opd_loss(logits, batch, divergence="jsd")
  with pytest.raises(ValueError, match="teacher_logprobs"):
    no_teacher = {k: v for k, v in batch.items() if k not in ("teacher_logprobs", "teacher_logits")}
    losses.sage_opd_loss(logits, no_teacher)
  with pytest.raises(ValueError, match="labels"):
    losses.sage_opd_loss(logits, {k: v for k, v in batch.items() if k != "labels"}, num_turns=3)
  with pytest.raises(ValueError, match="behaviour_logprobs"):
    losses.sage_opd_loss(logits, dict(batch, behaviour_logprobs=batch["behaviour_logprobs"][:, 1:]))
  with pytest.raises(ValueError, match="teacher_topk_ids"):
    losses.sage_opd_loss(logits, {k: v for k, v in batch.items() if k != "teacher_logits"}, estimator="full")
  with pytest.raises(ValueError, match="alhpa"):
    losses.loss_totals(batch, alhpa=0.3)
  with pytest.raises(ValueError, match="beta"):
    losses.jsd(logits, logits, 1.0)
  with pytest.raises(ValueError, match="turn_ids"):
    losses.validate_batch({"turn_ids": jnp.array([[1, 0]])}, 2)
  with pytest.raises(ValueError, match="labels"):
    losses.validate_batch({"turn_ids": jnp.array([[0, 1]]), "labels": jnp.array([[3, 0]])}, 2)
  losses.validate_batch({"turn_ids": jnp.array([[0, 1, 2]]), "labels": jnp.array([[2, 0]])}, 2)

