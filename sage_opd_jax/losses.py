"""SAGE-OPD losses (E1-E10 of docs/method.md) as pure `jnp` functions, and the loss registry.

Batch layout: one padded row per episode (or, with T = 1, one row per turn).

  position s   0      1      2      3     4     5      6     7      8
  token        <task> <task> <obs1> y1,1  y1,2  <obs2> y2,1  <pad>  <pad>
  turn_ids     0      0      0      1     1     0      2     0      0

- Token-level arrays are [B, S] and *token-aligned*: entry s describes token s. For a
  response token that means the distribution that predicts it, i.e. the logits at s - 1.
- `turn_ids` is the one mask: 0 for every token that is not a student response token (task,
  observation, template, padding), k >= 1 for the tokens of turn k. Position 0 has no
  predicting logits, so it must be a prompt token (`validate_batch` checks it on the host).
- Logits are [B, S, V] with logits[:, s] predicting token s + 1. `align_to_tokens` is the
  only place that shifts: every per-position quantity (log-prob, KL, top-1, entropy) is
  computed where the logits are and then moved onto the token it predicts. Entry 0 is 0.
- Per-turn arrays are [B, T]: column k - 1 is turn k. T may exceed the number of turns an
  episode has; such turns (and any turn with no tokens) are empty: length 0, confidence 0,
  and they contribute nothing.

All log-softmax, KL and normalisation maths runs in float32 (or float64 if the inputs are).
Nothing here holds state: the only module-level mutable object is the loss registry.

Reading order: E1/E2/E10 divergences -> E6 confidence -> E5/E7/E8 turn weights -> E4 the
PPO surrogate -> `LossOptions` and the registry (one score function per method) -> the stages
`token_weights`, `per_token_objective`, `aggregate`, `loss_metrics` -> `sage_opd_loss`, which
composes them for every row of docs/method.md's table.
"""

import dataclasses
import enum
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from sage_opd_jax.models import sharding

Array = jax.Array
Batch = Mapping[str, Array]


class Label(enum.IntEnum):
  """The judge's turn labels (E5), as stored in `batch["labels"]`; the one definition of the codes.

  `prompts` writes and parses them as words (`Label.SKIP.word` is "Skip").
  """

  SKIP = 0
  WEAK = 1
  STRONG = 2

  @property
  def word(self) -> str:
    return self.name.capitalize()


CONFIDENCE_MODES = ("turn_mean_top1", "neg_entropy", "token_top1", "none")
ESTIMATORS = ("sampled", "full")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


# ----------------------------------------------------------------------------------------
# Option rules: the loss functions and `LossOptions` check an option with the same helper.
# ----------------------------------------------------------------------------------------


class LossOptionError(ValueError):
  """A loss option that cannot run; `field` names it (config validation reports it as its key)."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def _one_of(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise LossOptionError(field, f"{field}={value!r}: must be one of {allowed}.")


def _check_range(field: str, value: Any, ok: bool, rule: str) -> None:
  if not ok:
    raise LossOptionError(field, f"{field}={value!r}: must {rule}.")


def _check_jsd_beta(beta: float) -> None:
  _check_range("jsd_beta", beta, 0.0 < beta < 1.0, "lie in (0, 1): both ends are identically zero")


def _check_alpha(alpha: float) -> None:
  _check_range("alpha", alpha, 0.0 <= alpha <= 1.0, "lie in [0, 1]")


def _check_dual_clip(dual_clip: float | None) -> None:
  _check_range("dual_clip", dual_clip, dual_clip is None or dual_clip > 1.0, "be > 1 (PPO dual clip), or None (off)")


# ----------------------------------------------------------------------------------------
# Alignment and per-position distribution statistics.
# ----------------------------------------------------------------------------------------


def _float(x: Array) -> Array:
  """Upcasts to at least float32 (bf16 logits must not reach log-softmax as bf16)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def align_to_tokens(per_position: Array) -> Array:
  """[B, S, ...] -> [B, S, ...]: moves what logits[:, s] computed onto token s + 1.

  out[:, s] = per_position[:, s - 1] and out[:, 0] = 0. This is the only shift in the
  codebase; everything token-aligned goes through it.
  """
  pad = [(0, 0)] * per_position.ndim
  pad[1] = (1, 0)
  return jnp.pad(per_position[:, :-1], pad)


def _log_softmax(logits_BxSxV: Array) -> Array:
  return jax.nn.log_softmax(_float(logits_BxSxV), axis=-1)


def _kl(logp_BxSxV: Array, logq_BxSxV: Array) -> Array:
  """[B, S, V] x2 -> [B, S]: KL(p || q) per position; entries with p = 0 add exactly 0."""
  p = jnp.exp(logp_BxSxV)
  # Masking the log-ratio (not the product) keeps 0 * (-inf - -inf) out of both passes.
  log_ratio = jnp.where(p > 0, logp_BxSxV - logq_BxSxV, 0.0)
  return jnp.sum(p * log_ratio, axis=-1)


def _entropy(logp_BxSxV: Array) -> Array:
  """[B, S, V] -> [B, S]: Shannon entropy (nats) per position."""
  p = jnp.exp(logp_BxSxV)
  return -jnp.sum(p * jnp.where(p > 0, logp_BxSxV, 0.0), axis=-1)


def _picked_logprobs(logits_BxCxV: Array, next_BxC: Array, support_BxCxK: Array | None) -> Array:
  """[B, C, V] float logits, [B, C] int, [B, C, K] int or None -> [B, C]: log-prob of the next token.

  With a support, a position whose support lists any id (ids >= 0; -1 pads) is renormalised over
  those ids: log pi_c(y) = logit_y - logsumexp(logits[support]). A position listing none, and every
  position without a support, takes the full vocabulary.
  """
  picked_BxC = jnp.take_along_axis(logits_BxCxV, next_BxC[..., None], axis=-1)[..., 0]
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  if support_BxCxK is None:
    return picked_BxC - lse_BxC
  listed_BxCxK = support_BxCxK >= 0
  constrained_BxC = jnp.any(listed_BxCxK, axis=-1)
  support_logits_BxCxK = jnp.take_along_axis(logits_BxCxV, jnp.maximum(support_BxCxK, 0), axis=-1)
  # Unconstrained positions keep their (finite) gathered logits, so the untaken branch's gradient stays finite.
  keep_BxCxK = listed_BxCxK | ~constrained_BxC[..., None]
  support_lse_BxC = jax.nn.logsumexp(jnp.where(keep_BxCxK, support_logits_BxCxK, -jnp.inf), axis=-1)
  return picked_BxC - jnp.where(constrained_BxC, support_lse_BxC, lse_BxC)


def token_logprobs(logits: Array, tokens: Array, support: Array | None = None) -> Array:
  """[B, S, V], [B, S] int -> [B, S]: log-prob of token s under logits[:, s - 1]; 0 at s=0.

  Position s picks token s + 1 (the last one picks the wrapped token 0, which the shift
  drops), so only [B, S] results are shifted: no [B, S, V] log-softmax is built, padded or
  gathered from, and the backward is one fused softmax - one-hot. 1.5x faster than shifting
  the log-softmax, with the LM head's gradient (docs/benchmarks.md).

  `support` [B, S, K] int, token-aligned (entry s: the ids decoding allowed for token s, -1 padded;
  none listed: the whole vocabulary), gives the log-prob under the distribution renormalised over
  them (`student_support` in `sage_opd_loss`).
  """
  logits_BxSxV = _float(logits)
  next_BxS = jnp.roll(tokens.astype(jnp.int32), -1, axis=1)
  next_support = None if support is None else jnp.roll(support.astype(jnp.int32), -1, axis=1)
  return align_to_tokens(_picked_logprobs(logits_BxSxV, next_BxS, next_support))


def chunked_token_logprobs(lm_head: Callable[[Array], Array], hidden_BxSxD: Array, tokens: Array,
                           chunk_size: int, support: Array | None = None, read: Array | None = None) -> Array:
  """[B, S, D] hidden states, [B, S] int -> [B, S]: `token_logprobs(lm_head(hidden), tokens, support)`, chunk by chunk.

  The LM head ([B, C, D] -> [B, C, V] logits) runs over C = `chunk_size` positions at a time under a
  rematerialised `lax.map`, so neither pass holds more than one chunk's [B, C, V] logits (a 150k
  vocabulary makes the whole [B, S, V] the largest tensor of the update); the backward pass recomputes
  each chunk's logits from its hidden states. Position s picks token s + 1, as in `token_logprobs`, so
  chunks need no overlap; `chunk_size` need not divide S.

  `read` [B, S] bool, token-aligned: the tokens whose log-probs the caller reads (the response
  tokens, `response_mask`); every other entry is 0. Each row's predicting positions are then moved to
  its front (in order) and the chunks past the longest row's count skip the LM head in both passes:
  the head, the update's largest cost at Qwen3's vocabulary, runs over the response tokens, not over
  the prompts, observations and padding.
  """
  if chunk_size < 1:
    raise ValueError(f"chunked_token_logprobs: chunk_size must be >= 1, got {chunk_size}.")
  batch, seq = tokens.shape
  num_chunks = -(-seq // chunk_size)
  pad = num_chunks * chunk_size - seq
  next_BxS = jnp.roll(tokens.astype(jnp.int32), -1, axis=1)
  next_support_BxSxK = None if support is None else jnp.roll(support.astype(jnp.int32), -1, axis=1)
  order_BxS = None
  if read is None:
    live_chunks = num_chunks
  else:
    if read.shape != tokens.shape:
      raise ValueError(f"chunked_token_logprobs: read {read.shape} and tokens {tokens.shape} differ.")
    # Position s predicts token s + 1; the last position predicts nothing (the roll wraps it to token 0).
    predicts_BxS = jnp.roll(read.astype(bool), -1, axis=1).at[:, -1].set(False)
    order_BxS = jnp.argsort(~predicts_BxS, axis=1, stable=True)  # Predicting positions first, in order.
    gather = lambda x_BxS: jnp.take_along_axis(x_BxS, order_BxS.reshape(order_BxS.shape + (1,) * (x_BxS.ndim - 2)),
                                               axis=1)
    hidden_BxSxD, next_BxS = gather(hidden_BxSxD), gather(next_BxS)
    next_support_BxSxK = None if support is None else gather(next_support_BxSxK)
    live_chunks = -(-jnp.max(jnp.sum(predicts_BxS, axis=1)) // chunk_size)
  next_BxS = jnp.pad(next_BxS, ((0, 0), (0, pad)))
  hidden_BxSxD = jnp.pad(hidden_BxSxD, ((0, 0), (0, pad), (0, 0)))
  # [N, B, C, ...]: lax.map walks the chunks.
  next_NxBxC = next_BxS.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
  hidden_NxBxCxD = hidden_BxSxD.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1)
  support_NxBxCxK = None
  if support is not None:
    next_support_BxSxK = jnp.pad(next_support_BxSxK, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
    support_NxBxCxK = next_support_BxSxK.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(chunk):
    c, hidden_BxCxD, next_BxC, support_BxCxK = chunk
    head = lambda: _picked_logprobs(_float(lm_head(sharding.pin_rows(hidden_BxCxD))), next_BxC, support_BxCxK)
    if read is None:
      return head()
    return jax.lax.cond(c < live_chunks, head, lambda: jnp.zeros(next_BxC.shape, jnp.float32))

  picked_NxBxC = jax.lax.map(one_chunk, (jnp.arange(num_chunks), hidden_NxBxCxD, next_NxBxC, support_NxBxCxK))
  picked_BxS = picked_NxBxC.swapaxes(0, 1).reshape(batch, num_chunks * chunk_size)[:, :seq]
  if order_BxS is not None:
    # Back to sequence order; what no read token needs (a row's tail past its count) is 0.
    picked_BxS = jnp.take_along_axis(picked_BxS, jnp.argsort(order_BxS, axis=1), axis=1)
    picked_BxS = jnp.where(predicts_BxS, picked_BxS, 0.0)
  return align_to_tokens(picked_BxS)


def teacher_token_stats(teacher_logits: Array, tokens: Array) -> dict[str, Array]:
  """[B, S, V], [B, S] -> the batch's token-aligned teacher keys, each [B, S].

  Returns `teacher_logprobs` (log nu of the token), `teacher_top1` (max_v nu) and
  `teacher_entropy` (H(nu), nats), so a teacher that scores in chunks can hand the loss
  per-token statistics instead of [B, S, V] logits.
  """
  logq_BxSxV = _log_softmax(teacher_logits)
  return {
      "teacher_logprobs": token_logprobs(teacher_logits, tokens),
      "teacher_top1": align_to_tokens(jnp.exp(jnp.max(logq_BxSxV, axis=-1))),
      "teacher_entropy": align_to_tokens(_entropy(logq_BxSxV)),
  }


# ----------------------------------------------------------------------------------------
# Per-token divergences (E1, E2, E10). The student is pi, the teacher nu.
# ----------------------------------------------------------------------------------------


def sampled_reverse_kl(student_logprobs: Array, teacher_logprobs: Array) -> Array:
  """[B, S] x2 -> [B, S]: (E1) the k1 estimate log pi(y) - log nu(y) of KL(pi || nu)."""
  return _float(student_logprobs) - _float(teacher_logprobs)


def full_reverse_kl(student_logits: Array, teacher_logits: Array) -> Array:
  """[B, S, V] x2 -> [B, S]: (E2) exact KL(pi || nu) (mode-seeking), token-aligned."""
  return align_to_tokens(_kl(_log_softmax(student_logits), _log_softmax(teacher_logits)))


def forward_kl(student_logits: Array, teacher_logits: Array) -> Array:
  """[B, S, V] x2 -> [B, S]: (E10) exact KL(nu || pi), teacher to student (mode-covering)."""
  return align_to_tokens(_kl(_log_softmax(teacher_logits), _log_softmax(student_logits)))


def jsd(student_logits: Array, teacher_logits: Array, beta: float = 0.5) -> Array:
  """[B, S, V] x2 -> [B, S]: (E10) GKD's generalised JSD, token-aligned.

  With M = beta * nu + (1 - beta) * pi: JSD_beta = beta KL(nu || M) + (1 - beta) KL(pi || M).
  beta must lie strictly inside (0, 1); both ends are identically zero.
  """
  return align_to_tokens(_jsd(_log_softmax(student_logits), _log_softmax(teacher_logits), beta))


def _jsd(logp: Array, logq: Array, beta: float) -> Array:
  """[..., V] x2 -> [...]: beta KL(q || M) + (1 - beta) KL(p || M), M = beta q + (1 - beta) p."""
  _check_jsd_beta(beta)
  logm = jnp.logaddexp(jnp.log(beta) + logq, jnp.log1p(-beta) + logp)
  return beta * _kl(logq, logm) + (1.0 - beta) * _kl(logp, logm)


def topk_divergence(
    student_logits: Array,
    teacher_topk_ids: Array,
    teacher_topk_logprobs: Array,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
) -> Array:
  """[B, S, V], [B, S, K] int, [B, S, K] -> [B, S]: E2/E10 on the teacher's top-k support.

  The top-k arrays are token-aligned (entry s: the teacher's k most likely tokens at s).
  [ours] Both distributions are renormalised over those K tokens and the divergence is
  taken there, so it is a proper divergence, and with K = V it is the exact one. Ids < 0 pad
  a position's list (the expert teacher's lists are its decoding support, of varying width):
  they weigh nothing, and a position listing none has divergence 0.
  """
  ids_BxSxK = teacher_topk_ids.astype(jnp.int32)
  listed_BxSxK = ids_BxSxK >= 0
  # A large finite logit, not -inf, for padding: a position listing none stays finite in both passes.
  masked = lambda x_BxSxK: jax.nn.log_softmax(jnp.where(listed_BxSxK, x_BxSxK, -1e9), axis=-1)
  logp_BxSxV = align_to_tokens(_log_softmax(student_logits))
  logp_BxSxK = masked(jnp.take_along_axis(logp_BxSxV, jnp.maximum(ids_BxSxK, 0), axis=-1))
  logq_BxSxK = masked(_float(teacher_topk_logprobs))
  divergence_BxS = _topk_divergence(logp_BxSxK, logq_BxSxK, divergence, beta)
  return jnp.where(jnp.any(listed_BxSxK, axis=-1), divergence_BxS, 0.0)


def _topk_divergence(logp_BxSxK: Array, logq_BxSxK: Array, divergence: str, beta: float) -> Array:
  if divergence == "reverse_kl":
    return _kl(logp_BxSxK, logq_BxSxK)
  if divergence == "forward_kl":
    return _kl(logq_BxSxK, logp_BxSxK)
  if divergence == "jsd":
    return _jsd(logp_BxSxK, logq_BxSxK, beta)
  raise ValueError(f"topk_divergence: unknown divergence {divergence!r}; expected one of {DIVERGENCES}.")


# ----------------------------------------------------------------------------------------
# Turns: lengths, per-turn means, and turn -> token lifting.
# ----------------------------------------------------------------------------------------


def _turn_sum(x_BxS: Array, turn_ids: Array, num_turns: int) -> Array:
  """[B, S] -> [B, T]: sum of x over each turn's tokens. Ids outside 1..T are dropped."""
  segment_sum = functools.partial(jax.ops.segment_sum, num_segments=num_turns + 1)
  # Segment 0 collects the non-response tokens; segment_sum drops ids > T itself.
  return jax.vmap(segment_sum)(x_BxS, turn_ids.astype(jnp.int32))[:, 1:]


def turn_lengths(turn_ids: Array, num_turns: int) -> Array:
  """[B, S] int -> [B, T] int32: L_t, the number of response tokens of turn t."""
  return _turn_sum(jnp.ones_like(turn_ids, jnp.int32), turn_ids, num_turns)


def turn_mean(x_BxS: Array, turn_ids: Array, num_turns: int) -> Array:
  """[B, S] -> [B, T]: mean of x over each turn's tokens; 0 for an empty turn."""
  lengths_BxT = turn_lengths(turn_ids, num_turns)
  sums_BxT = _turn_sum(_float(x_BxS), turn_ids, num_turns)
  return sums_BxT / jnp.maximum(lengths_BxT, 1)


def turns_to_tokens(x_BxT: Array, turn_ids: Array) -> Array:
  """[B, T], [B, S] -> [B, S]: gives each response token its turn's value; 0 elsewhere."""
  padded_Bx1plusT = jnp.pad(x_BxT, ((0, 0), (1, 0)))  # Column 0 serves turn id 0.
  return jnp.take_along_axis(
      padded_Bx1plusT, turn_ids.astype(jnp.int32), axis=1, mode="fill", fill_value=0
  )


def response_mask(turn_ids: Array, num_turns: int | None = None) -> Array:
  """[B, S] -> [B, S] bool: the tokens that are trained (turn id in 1..T, or > 0)."""
  in_turn = turn_ids > 0
  return in_turn if num_turns is None else in_turn & (turn_ids <= num_turns)


# ----------------------------------------------------------------------------------------
# (E6) Teacher confidence.
# ----------------------------------------------------------------------------------------


def turn_confidence(
    top1: Array | None,
    entropy: Array | None,
    turn_ids: Array,
    num_turns: int,
    mode: str = "turn_mean_top1",
    vocab_size: int | None = None,
) -> Array:
  """Token-aligned teacher stats [B, S] -> c [B, T] ([B, S] for `token_top1`), in [0, 1].

  Args:
    top1: [B, S] max_v nu(v | h) per token (modes `turn_mean_top1`, `token_top1`).
    entropy: [B, S] H(nu(. | h)) in nats per token (mode `neg_entropy`).
    turn_ids: [B, S] int, 0 off-response.
    num_turns: T.
    mode: one of CONFIDENCE_MODES.
    vocab_size: the teacher's V, for `neg_entropy`'s log V.

  Empty turns get 0 in every turn-level mode (`none` included); `token_top1` is 0 off the
  response tokens.
  """
  def need(x, name):
    if x is None:
      raise ValueError(f"turn_confidence: mode={mode!r} needs `{name}`.")
    return x

  if mode == "turn_mean_top1":
    return turn_mean(need(top1, "top1"), turn_ids, num_turns)
  if mode == "neg_entropy":
    if vocab_size is None or vocab_size < 2:
      raise ValueError(f"turn_confidence: mode='neg_entropy' needs vocab_size >= 2, got {vocab_size}.")
    mean_h_BxT = turn_mean(need(entropy, "entropy"), turn_ids, num_turns)
    nonempty_BxT = turn_lengths(turn_ids, num_turns) > 0
    c_BxT = jnp.clip(1.0 - mean_h_BxT / jnp.log(float(vocab_size)), 0.0, 1.0)
    return jnp.where(nonempty_BxT, c_BxT, 0.0)
  if mode == "none":
    return (turn_lengths(turn_ids, num_turns) > 0).astype(jnp.float32)
  if mode == "token_top1":
    return jnp.where(response_mask(turn_ids, num_turns), _float(need(top1, "top1")), 0.0)
  raise ValueError(f"turn_confidence: unknown mode {mode!r}; expected one of {CONFIDENCE_MODES}.")


def teacher_confidence(
    teacher_logits: Array, turn_ids: Array, num_turns: int, mode: str = "turn_mean_top1"
) -> Array:
  """[B, S, V], [B, S] -> c [B, T] ([B, S] for `token_top1`): (E6) from full logits."""
  logq_BxSxV = _log_softmax(teacher_logits)
  top1_BxS = align_to_tokens(jnp.exp(jnp.max(logq_BxSxV, axis=-1)))
  entropy_BxS = align_to_tokens(_entropy(logq_BxSxV)) if mode == "neg_entropy" else None
  return turn_confidence(
      top1_BxS, entropy_BxS, turn_ids, num_turns, mode, vocab_size=teacher_logits.shape[-1]
  )


# ----------------------------------------------------------------------------------------
# (E5, E7, E8) Intervention, selective score, normalisation.
# ----------------------------------------------------------------------------------------


def intervention_weights(labels: Array, alpha: float = 0.5) -> Array:
  """[B, T] int -> [B, T] float32: (E5) Skip -> 0, Weak -> alpha, Strong -> 1.

  Codes other than Weak/Strong (padding turns) weigh 0; `validate_batch` rejects them on
  the host.
  """
  if isinstance(alpha, (int, float)):
    _check_alpha(alpha)
  return jnp.where(
      labels == Label.STRONG, 1.0, jnp.where(labels == Label.WEAK, alpha, 0.0)
  ).astype(jnp.float32)


def _normalise(
    score: Array,
    count: Array,
    axis_name: str | None,
    global_num_tokens: Array | None,
    global_weight_sum: Array | None,
) -> Array:
  """(E8) w = s * N / sum(count * s), same shape as `score` ([B, T] or [B, S]).

  `count` is L_t for turn scores or the response mask for token scores. The totals are
  psum'd over `axis_name`; caller-given global totals (over micro-batches and devices)
  replace them. An all-zero score gives w = 0 with finite gradients.
  """
  if (global_num_tokens is None) != (global_weight_sum is None):
    raise ValueError(
        "Pass both global_num_tokens and global_weight_sum (or neither) to normalise."
    )
  score = _float(score)
  count = count.astype(score.dtype)
  if global_num_tokens is None:
    num_tokens, weight_sum = jnp.sum(count), jnp.sum(count * score)
    if axis_name is not None:
      num_tokens, weight_sum = jax.lax.psum((num_tokens, weight_sum), axis_name)
  else:
    num_tokens, weight_sum = _float(global_num_tokens), _float(global_weight_sum)
  positive = weight_sum > 0
  # The safe denominator keeps inf/NaN out of the untaken branch's gradient.
  scale = num_tokens / jnp.where(positive, weight_sum, 1.0)
  return jnp.where(positive, score * scale, 0.0)


def sage_turn_weights(
    intervention: Array,
    confidence: Array,
    turn_lengths: Array,
    normalize: bool = True,
    axis_name: str | None = None,
    *,
    global_num_tokens: Array | None = None,
    global_weight_sum: Array | None = None,
) -> Array:
  """[B, T] x3 -> w [B, T]: (E7) s = i * c, then (E8) w = s * N / sum(L * s).

  Args:
    intervention: [B, T] i_t (from `intervention_weights`, or ones).
    confidence: [B, T] c_t (from `turn_confidence`, or ones).
    turn_lengths: [B, T] L_t.
    normalize: False gives w = s (the `sage_opd_no_norm` ablation).
    axis_name: mesh axis (inside shard_map) over which N and sum(L * s) are psum'd.
    global_num_tokens, global_weight_sum: N and sum(L * s) already summed over every
      micro-batch and device (see `loss_totals`); they replace the local/psum'd sums.
  """
  score_BxT = _float(intervention) * _float(confidence)
  if not normalize:
    return score_BxT
  return _normalise(score_BxT, turn_lengths, axis_name, global_num_tokens, global_weight_sum)


# ----------------------------------------------------------------------------------------
# (E4) The policy-gradient surrogate of the sampled estimator.
# ----------------------------------------------------------------------------------------


def ppo_clip_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
    log_ratio_clamp: float = 20.0,
) -> Array:
  """[B, S] x3 -> per-token loss [B, S]: -min(r A, clip(r, 1 -+ eps) A), dual-clipped.

  r = exp(clamp(log pi - log pi_old, +-log_ratio_clamp)). For A < 0 the loss is further
  capped at -dual_clip * A (None disables it). `advantages` must be stop-gradient already.
  """
  _check_dual_clip(dual_clip)
  log_ratio = jnp.clip(_float(logprobs) - _float(old_logprobs), -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  advantages = _float(advantages)
  loss = jnp.maximum(-ratio * advantages, -jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
  if dual_clip is not None:
    loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
  return loss


# ----------------------------------------------------------------------------------------
# The registry: one decorated function per method, mapping a batch to token scores s, and
# the loss options, checked once when they are built.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """Every option of `sage_opd_loss`: frozen and hashable (jit may treat it as static), and checked once, here.

  `LossOptions.for_method` also applies the method's registered defaults; `config.validate`
  builds one from `config.method` and `config.loss`, so a run fails where the loss would.
  """

  method: str = "sage_opd"  # A registered name (`registered_losses()`).
  estimator: str = "sampled"  # "sampled" (E4: PPO-clip on the k1 estimate) or "full" (E2, E10).
  divergence: str = "reverse_kl"  # reverse_kl | forward_kl | jsd; the last two need estimator="full".
  jsd_beta: float = 0.5  # GKD's beta, strictly inside (0, 1): both ends are identically zero.
  alpha: float = 0.5  # i of a Weak turn (E5), in [0, 1].
  confidence: str = "turn_mean_top1"  # One of CONFIDENCE_MODES (E6).
  aggregation: str = "token_mean"  # token_mean (sum w l / N) | seq_mean_token_mean (mean of row means).
  ppo_clip: float = 0.2  # Ratio clip epsilon (E4).
  dual_clip: float | None = 3.0  # Cap for negative advantages, > 1; None turns it off.
  log_ratio_clamp: float = 20.0  # |log pi - log pi_old| is clamped to this before exp.
  old_logprobs: str = "batch"  # "batch": the sampler's log pi_old; "current": stop_gradient(log pi_theta).
  num_turns: int | None = None  # T when the batch has no labels (turn-level confidence needs it).
  teacher_vocab_size: int | None = None  # V for `neg_entropy` when no teacher logits are given.

  def __post_init__(self):
    variant(self.method)
    _one_of("estimator", self.estimator, ESTIMATORS)
    _one_of("divergence", self.divergence, DIVERGENCES)
    _one_of("confidence", self.confidence, CONFIDENCE_MODES)
    _one_of("aggregation", self.aggregation, AGGREGATIONS)
    _one_of("old_logprobs", self.old_logprobs, ("batch", "current"))
    if self.divergence != "reverse_kl" and self.estimator != "full":
      raise LossOptionError("divergence", f"divergence={self.divergence!r} needs estimator='full' (the teacher's "
                                          "distribution).")
    _check_jsd_beta(self.jsd_beta)
    _check_alpha(self.alpha)
    _check_range("ppo_clip", self.ppo_clip, self.ppo_clip > 0, "be > 0")
    _check_dual_clip(self.dual_clip)
    _check_range("log_ratio_clamp", self.log_ratio_clamp, self.log_ratio_clamp > 0, "be > 0")
    for field in ("num_turns", "teacher_vocab_size"):
      value = getattr(self, field)
      _check_range(field, value, value is None or value >= 1, "be >= 1 or None")

  @classmethod
  def for_method(cls, method: str = "sage_opd", **fields: Any) -> "LossOptions":
    """The options of `method`: its registered defaults, then `fields` (LossOptions field names)."""
    return _replace(cls(method=method, **dict(variant(method).defaults)), **fields)


def _check_names(what: str, fields: Mapping[str, Any]) -> None:
  """A misspelt option must raise, not vanish."""
  known = [f.name for f in dataclasses.fields(LossOptions)]
  unknown = set(fields) - set(known)
  if unknown:
    raise ValueError(f"{what}: unknown loss option(s) {sorted(unknown)}; known: {known}.")


def _replace(options: LossOptions, **fields: Any) -> LossOptions:
  """`options` with `fields` (LossOptions field names) changed."""
  _check_names("loss options", fields)
  return dataclasses.replace(options, **fields) if fields else options


def _resolve(options: LossOptions | None, fields: Mapping[str, Any]) -> LossOptions:
  """The options a loss function runs with: `options` (or the method's own) with `fields` changed."""
  if options is None:
    return LossOptions.for_method(**fields)
  return _replace(options, **fields)


ScoreFn = Callable[[Batch, LossOptions], Array]


@dataclasses.dataclass(frozen=True)
class LossVariant:
  """A registered method: its token score, and what the training loop must provide for it."""

  name: str
  score_fn: ScoreFn  # (batch, options) -> s [B, S], token-level, before (E8).
  normalize: bool  # Apply (E8) to s.
  objective: str  # "distill" (E4/E2/E10 per the estimator) or "cross_entropy" (sft).
  needs_labels: bool  # The score reads batch["labels"]: the loop runs the judge (E5).
  rollouts: int  # 2: a second rollout, in which the teacher replaces the turns the judge labels Strong, joins.
  defaults: tuple[tuple[str, Any], ...]  # (LossOptions field, value) pairs `for_method` starts from.

  @property
  def needs_teacher(self) -> bool:
    """Whether the loop scores the batch with the teacher: cross entropy reads the tokens only."""
    return self.objective == "distill"

  @property
  def uses_judge(self) -> bool:
    """Whether the loop asks the judge: for the labels, or to pick the turns of the second rollout."""
    return self.needs_labels or self.rollouts > 1


_REGISTRY: dict[str, LossVariant] = {}


def register_loss(
    name: str,
    *,
    normalize: bool = True,
    objective: str = "distill",
    needs_labels: bool = False,
    rollouts: int = 1,
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[ScoreFn], ScoreFn]:
  """Decorator: registers `score_fn(batch, options) -> s [B, S]` as method `name`.

  Args:
    name: the method name (`config.method`, `config.pipeline.methods`).
    normalize: apply (E8) to the scores.
    objective: "distill" (the estimator's divergence to the teacher) or "cross_entropy" (no teacher).
    needs_labels: the score reads batch["labels"] (`batch_intervention`), so the loop runs the judge.
    rollouts: 1, or 2 for a second, teacher-intervened rollout of the same tasks (`opd_two_rollout`).
    defaults: LossOptions fields that differ for this method when a caller leaves them unset
      (`LossOptions.for_method`; `config.loss` sets every field).
  """
  if objective not in ("distill", "cross_entropy"):
    raise ValueError(f"register_loss({name!r}): objective={objective!r}; expected 'distill' or 'cross_entropy'.")
  if rollouts not in (1, 2):
    raise ValueError(f"register_loss({name!r}): rollouts={rollouts}; expected 1 or 2.")
  _check_names(f"register_loss({name!r}) defaults", defaults or {})
  defaults = tuple(sorted((defaults or {}).items()))

  def decorate(score_fn: ScoreFn) -> ScoreFn:
    if name in _REGISTRY:
      raise ValueError(f"register_loss: a loss named {name!r} is already registered.")
    _REGISTRY[name] = LossVariant(name, score_fn, normalize, objective, needs_labels, rollouts, defaults)
    return score_fn

  return decorate


def registered_losses() -> tuple[str, ...]:
  """The method names `LossOptions(method=...)` accepts."""
  return tuple(sorted(_REGISTRY))


def variant(name: str) -> LossVariant:
  """The registered method `name`; unknown names raise, listing the registered ones."""
  if name not in _REGISTRY:
    raise LossOptionError("method", f"method={name!r}: not a registered loss; registered: {registered_losses()}.")
  return _REGISTRY[name]


def get_loss(name: str) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """The loss function `(student_logits, batch, **options) -> (loss, metrics)` of `name`."""
  variant(name)
  return functools.partial(sage_opd_loss, method=name)


def _require(batch: Batch, key: str, why: str) -> Array:
  if key not in batch:
    raise ValueError(f"batch[{key!r}] is missing; it is needed for {why}.")
  return batch[key]


def batch_intervention(batch: Batch, options: LossOptions) -> Array:
  """-> [B, S]: (E5) i_t of each response token's turn, from batch["labels"] [B, T]."""
  labels_BxT = _require(batch, "labels", "turn-level intervention (E5)")
  return turns_to_tokens(intervention_weights(labels_BxT, options.alpha), batch["turn_ids"])


def _teacher_stat(batch: Batch, key: str, why: str) -> Array:
  """A token-aligned teacher statistic, from its own key or else from teacher_logits."""
  if key in batch:
    return batch[key]
  if "teacher_logits" in batch:
    return teacher_token_stats(batch["teacher_logits"], batch["tokens"])[key]
  raise ValueError(f"batch[{key!r}] (or batch['teacher_logits']) is missing; needed for {why}.")


def _confidence_available(batch: Batch, options: LossOptions) -> bool:
  if options.confidence == "none" or "teacher_logits" in batch:
    return True
  key = "teacher_entropy" if options.confidence == "neg_entropy" else "teacher_top1"
  return key in batch


def batch_confidence(batch: Batch, options: LossOptions) -> Array:
  """-> [B, S]: (E6) c of each response token (its turn's c_t, or c_{t,j} for token_top1)."""
  mode, why = options.confidence, f"confidence={options.confidence!r} (E6)"
  if options.num_turns is None:
    raise ValueError(f"num_turns is needed for {why}; pass it or batch['labels'].")
  top1 = entropy = None
  if mode in ("turn_mean_top1", "token_top1"):
    top1 = _teacher_stat(batch, "teacher_top1", why)
  elif mode == "neg_entropy":
    entropy = _teacher_stat(batch, "teacher_entropy", why)
  vocab_size = options.teacher_vocab_size
  if vocab_size is None and "teacher_logits" in batch:
    vocab_size = batch["teacher_logits"].shape[-1]
  c = turn_confidence(top1, entropy, batch["turn_ids"], options.num_turns, mode, vocab_size)
  return c if mode == "token_top1" else turns_to_tokens(c, batch["turn_ids"])


def _ones(batch: Batch, options: LossOptions) -> Array:
  del options
  return jnp.ones(batch["turn_ids"].shape, jnp.float32)


register_loss("sft", normalize=False, objective="cross_entropy")(_ones)
register_loss("opd", normalize=False)(_ones)
# The second, teacher-intervened rollout is stacked onto the batch by the loop; the loss itself
# is plain OPD on every row.
register_loss("opd_two_rollout", normalize=False, rollouts=2)(_ones)


@register_loss("sage_opd", needs_labels=True)
def _sage_opd(batch: Batch, options: LossOptions) -> Array:
  return batch_intervention(batch, options) * batch_confidence(batch, options)


@register_loss("sage_opd_no_intervention")
def _sage_opd_no_intervention(batch: Batch, options: LossOptions) -> Array:
  return batch_confidence(batch, options)


@register_loss("sage_opd_no_confidence", needs_labels=True)
def _sage_opd_no_confidence(batch: Batch, options: LossOptions) -> Array:
  return batch_intervention(batch, options)


@register_loss("sage_opd_no_norm", normalize=False, needs_labels=True)
def _sage_opd_no_norm(batch: Batch, options: LossOptions) -> Array:
  return batch_intervention(batch, options) * batch_confidence(batch, options)


# ----------------------------------------------------------------------------------------
# (E3, E9) The composed loss.
# ----------------------------------------------------------------------------------------


def _full_divergence(student_logits: Array, batch: Batch, divergence: str, beta: float) -> Array:
  """-> [B, S]: (E2)/(E10) from teacher_logits (exact) or else from the teacher's top-k."""
  if "teacher_logits" in batch:
    teacher_logits = batch["teacher_logits"]
    if divergence == "reverse_kl":
      return full_reverse_kl(student_logits, teacher_logits)
    if divergence == "forward_kl":
      return forward_kl(student_logits, teacher_logits)
    return jsd(student_logits, teacher_logits, beta)
  if "teacher_topk_ids" in batch and "teacher_topk_logprobs" in batch:
    return topk_divergence(student_logits, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                           divergence, beta)
  raise ValueError("batch['teacher_logits'] (or batch['teacher_topk_ids'] and "
                   "batch['teacher_topk_logprobs']) is missing; needed for estimator='full' (E2/E10).")


def _check_shapes(student: Array, batch: Batch) -> None:
  """Static shape checks (`student`: the logits [B, S, V] or log-probs [B, S]), so a mis-built batch fails
  before it compiles."""
  bs = student.shape[:2]
  for key in ("tokens", "turn_ids"):
    _require(batch, key, "every loss")
  for key in ("tokens", "turn_ids", "behaviour_logprobs", "teacher_logprobs",
              "teacher_top1", "teacher_entropy"):
    if key in batch and tuple(batch[key].shape) != tuple(bs):
      raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}; expected {bs} (= logits [B, S]).")
  for key in ("teacher_logits", "teacher_topk_ids", "teacher_topk_logprobs", "student_support"):
    if key in batch and tuple(batch[key].shape[:2]) != tuple(bs):
      raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}; expected {bs} + (V or K,).")
  if "labels" in batch and (batch["labels"].ndim != 2 or batch["labels"].shape[0] != bs[0]):
    raise ValueError(f"batch['labels'] has shape {batch['labels'].shape}; expected ({bs[0]}, T).")


def _with_batch_turns(options: LossOptions, batch: Batch) -> LossOptions:
  """`options` with num_turns = batch["labels"]'s T, when the batch has labels."""
  if "labels" not in batch:
    return options
  labels_t = batch["labels"].shape[1]
  if options.num_turns is not None and options.num_turns != labels_t:
    raise ValueError(f"num_turns={options.num_turns} disagrees with batch['labels'] T={labels_t}.")
  return dataclasses.replace(options, num_turns=labels_t)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _safe_div(num: Array, den: Array) -> Array:
  return num / jnp.where(den > 0, den, 1.0)


def loss_totals(
    batch: Batch, options: LossOptions | None = None, *, axis_name: str | None = None, **fields: Any
) -> dict[str, Array]:
  """-> this batch's contribution to the normalisers, as `sage_opd_loss`'s global_* kwargs.

  For micro-batch accumulation: sum these over every micro-batch (they are already psum'd
  over `axis_name`), then pass the sums to each micro-batch's `sage_opd_loss(**totals)`.
  Returns scalars `global_num_tokens` (N), `global_weight_sum` (sum of s over response
  tokens = sum_t L_t s_t) and `global_num_sequences` (rows with >= 1 response token).
  `options` (or `fields`, LossOptions field names) as for `sage_opd_loss`.
  """
  options = _with_batch_turns(_resolve(options, fields), batch)
  mask_BxS = response_mask(batch["turn_ids"], options.num_turns).astype(jnp.float32)
  score_BxS = _float(variant(options.method).score_fn(batch, options)) * mask_BxS
  totals = {
      "global_num_tokens": jnp.sum(mask_BxS),
      "global_weight_sum": jnp.sum(score_BxS),
      "global_num_sequences": jnp.sum(jnp.any(mask_BxS > 0, axis=1).astype(jnp.float32)),
  }
  return _psum(totals, axis_name)


def token_weights(
    batch: Batch,
    options: LossOptions | None = None,
    *,
    axis_name: str | None = None,
    global_num_tokens: Array | None = None,
    global_weight_sum: Array | None = None,
    **fields: Any,
) -> Array:
  """-> w [B, S]: each response token's weight under the method ((E7), then (E8) unless the
  method opts out); 0 off response tokens. Under stop-gradient: weights are never trained.

  `sage_opd_loss` weighs its per-token loss with exactly this; it is public so that logs and
  transcripts show the weights the update used. `options` (or `fields`) as for `sage_opd_loss`.
  """
  batch = jax.tree.map(jax.lax.stop_gradient, dict(batch))
  options = _with_batch_turns(_resolve(options, fields), batch)
  method = variant(options.method)
  mask_BxS = response_mask(batch["turn_ids"], options.num_turns)
  score_BxS = jnp.where(mask_BxS, _float(method.score_fn(batch, options)), 0.0)
  if method.normalize:
    score_BxS = _normalise(score_BxS, mask_BxS.astype(jnp.float32), axis_name, global_num_tokens,
                           global_weight_sum)
  return jax.lax.stop_gradient(score_BxS)


class Objective(NamedTuple):
  """The per-token objective of a batch: what `aggregate` and `loss_metrics` read."""

  loss_BxS: Array  # l, with w folded in; exactly 0 where w = 0.
  student_logp_BxS: Array  # log pi(token), token-aligned.
  divergence_BxS: Array | None  # The per-token divergence to the teacher (None for cross entropy).
  clipped_BxS: Array | None  # Trained tokens whose PPO ratio left [1 - eps, 1 + eps] (sampled estimator).


def needs_student_logits(options: LossOptions) -> bool:
  """Whether the objective reads the student's whole distribution ([B, S, V] logits), not only its
  tokens' log-probs: the exact divergences (estimator='full') do; sft and the sampled estimator do not."""
  return variant(options.method).objective != "cross_entropy" and options.estimator != "sampled"


def per_token_objective(student_logits: Array | None, batch: Batch, w_BxS: Array, options: LossOptions,
                        student_logprobs: Array | None = None) -> Objective:
  """[B, S, V] logits, batch, weights [B, S] -> the per-token loss (E3/E4 or E2/E10, or sft's cross entropy).

  `student_logprobs` [B, S] (`chunked_token_logprobs`) stand in for the logits where the objective reads
  only the tokens' log-probs (sft, estimator='sampled').
  """
  trained_BxS = w_BxS > 0
  if student_logprobs is None:
    student_logp_BxS = token_logprobs(student_logits, batch["tokens"], batch.get("student_support"))
  else:
    student_logp_BxS = _float(student_logprobs)
    if student_logits is None and needs_student_logits(options):
      raise ValueError(f"estimator={options.estimator!r} needs the student's [B, S, V] logits, not its "
                       "token log-probs (student_logprobs).")
  clipped_BxS = None
  if variant(options.method).objective == "cross_entropy":
    loss_BxS, divergence_BxS = -w_BxS * student_logp_BxS, None
  elif options.estimator == "sampled":
    teacher_logp = _float(_teacher_stat(batch, "teacher_logprobs", "estimator='sampled'"))
    if options.old_logprobs == "batch":
      old_logp = _float(_require(batch, "behaviour_logprobs", "estimator='sampled' (PPO ratio)"))
    else:
      old_logp = jax.lax.stop_gradient(student_logp_BxS)
    # (E4) A = -w (log pi_old - log nu); the where keeps padding garbage out of A.
    advantage_BxS = jnp.where(trained_BxS, -w_BxS * (old_logp - teacher_logp), 0.0)
    loss_BxS = ppo_clip_loss(student_logp_BxS, old_logp, advantage_BxS, clip_eps=options.ppo_clip,
                             dual_clip=options.dual_clip, log_ratio_clamp=options.log_ratio_clamp)
    divergence_BxS = sampled_reverse_kl(jax.lax.stop_gradient(student_logp_BxS), teacher_logp)
    ratio = jnp.exp(jnp.clip(jax.lax.stop_gradient(student_logp_BxS) - old_logp,
                             -options.log_ratio_clamp, options.log_ratio_clamp))
    clipped_BxS = trained_BxS & ((ratio > 1.0 + options.ppo_clip) | (ratio < 1.0 - options.ppo_clip))
  else:
    divergence_BxS = _full_divergence(student_logits, batch, options.divergence, options.jsd_beta)
    loss_BxS = w_BxS * divergence_BxS
  # Untrained tokens (w = 0) add exactly 0, even where a divergence is inf (-inf teacher logits).
  return Objective(jnp.where(trained_BxS, loss_BxS, 0.0), student_logp_BxS, divergence_BxS, clipped_BxS)


def aggregate(
    loss_BxS: Array,
    mask_BxS: Array,
    aggregation: str,
    axis_name: str | None = None,
    global_num_tokens: Array | None = None,
    global_num_sequences: Array | None = None,
) -> Array:
  """(E3/E9) per-token loss [B, S] -> scalar, divided by global normalisers (`loss_totals`) when given.

  token_mean: sum l / N. seq_mean_token_mean: each row's mean over its response tokens, then
  the mean over rows that have any.
  """
  maskf_BxS = mask_BxS.astype(jnp.float32)
  if aggregation == "token_mean":
    num_tokens = _psum(jnp.sum(maskf_BxS), axis_name) if global_num_tokens is None else _float(global_num_tokens)
    return _safe_div(_psum(jnp.sum(loss_BxS), axis_name), num_tokens)
  row_tokens_B = jnp.sum(maskf_BxS, axis=1)
  row_means_B = _safe_div(jnp.sum(loss_BxS, axis=1), row_tokens_B)
  if global_num_sequences is None:
    num_rows = _psum(jnp.sum((row_tokens_B > 0).astype(jnp.float32)), axis_name)
  else:
    num_rows = _float(global_num_sequences)
  return _safe_div(_psum(jnp.sum(row_means_B), axis_name), num_rows)


# The count each ratio metric of `loss_metrics` divides by (a "num_*" metric reported beside it):
# micro-batches combine a ratio weighted by its own count, the only exact way. Unlisted ratios
# are over response tokens.
RATIO_COUNTS = {
    "kl_mean": "num_trained_tokens", "clip_frac": "num_trained_tokens",
    **{f"{label.name.lower()}_frac": "num_turns" for label in Label},
    "confidence_mean": "num_confidence_terms",
}


def loss_metrics(
    batch: Batch, options: LossOptions, w_BxS: Array, objective: Objective, axis_name: str | None = None
) -> dict[str, Array]:
  """The scalars `sage_opd_loss` reports besides the loss: sums psum'd before dividing, so global over the mesh."""
  turn_ids = batch["turn_ids"]
  mask_BxS = response_mask(turn_ids, options.num_turns)
  trained_BxS = w_BxS > 0
  count = lambda x: _psum(jnp.sum(x.astype(jnp.float32)), axis_name)
  num_tokens, num_trained = count(mask_BxS), count(trained_BxS)
  metrics = {"num_tokens": num_tokens, "num_trained_tokens": num_trained,
             "weight_mean": _safe_div(_psum(jnp.sum(w_BxS), axis_name), num_tokens)}
  if objective.clipped_BxS is not None:
    metrics["clip_frac"] = _safe_div(count(objective.clipped_BxS), num_trained)
  if objective.divergence_BxS is None:
    nll = _psum(jnp.sum(jnp.where(mask_BxS, -objective.student_logp_BxS, 0.0)), axis_name)
    metrics["nll_mean"] = jax.lax.stop_gradient(_safe_div(nll, num_tokens))
  else:
    divergence_BxS = jax.lax.stop_gradient(objective.divergence_BxS)
    kl_max = jnp.max(jnp.where(trained_BxS, divergence_BxS, -jnp.inf))
    kl_max = kl_max if axis_name is None else jax.lax.pmax(kl_max, axis_name)
    metrics["kl_mean"] = _safe_div(_psum(jnp.sum(jnp.where(trained_BxS, divergence_BxS, 0.0)), axis_name), num_trained)
    metrics["kl_max"] = jnp.where(num_trained > 0, kl_max, 0.0)
  if options.num_turns is None:
    return metrics
  lengths_BxT = turn_lengths(turn_ids, options.num_turns)
  nonempty_BxT = lengths_BxT > 0
  num_turns_nonempty = count(nonempty_BxT)
  metrics["num_turns"] = num_turns_nonempty
  if "labels" in batch:
    for label in Label:
      metrics[f"{label.name.lower()}_frac"] = _safe_div(count(nonempty_BxT & (batch["labels"] == label)),
                                                       num_turns_nonempty)
  if variant(options.method).objective == "distill" and _confidence_available(batch, options):
    c_BxS = batch_confidence(batch, options)
    if options.confidence == "token_top1":
      metrics["num_confidence_terms"] = num_tokens
      metrics["confidence_mean"] = _safe_div(_psum(jnp.sum(c_BxS), axis_name), num_tokens)
    else:
      # Mean over non-empty turns: each turn's c_t counted once (sum over tokens / L_t).
      c_BxT = _safe_div(_turn_sum(c_BxS, turn_ids, options.num_turns), lengths_BxT.astype(jnp.float32))
      metrics["num_confidence_terms"] = num_turns_nonempty
      metrics["confidence_mean"] = _safe_div(_psum(jnp.sum(c_BxT), axis_name), num_turns_nonempty)
  return metrics


def sage_opd_loss(
    student_logits: Array | None,
    batch: Batch,
    options: LossOptions | None = None,
    *,
    axis_name: str | None = None,
    global_num_tokens: Array | None = None,
    global_weight_sum: Array | None = None,
    global_num_sequences: Array | None = None,
    student_logprobs: Array | None = None,
    **fields: Any,
) -> tuple[Array, dict[str, Array]]:
  """(E3)/(E9) for every row of docs/method.md's table: [B, S, V] logits + batch -> (loss, metrics).

  Batch keys (token-level ones are [B, S] and token-aligned, see the module docstring):
    tokens: int, the episode's tokens. Always.
    turn_ids: int, 0 off-response, k for turn k. Always.
    labels: [B, T] int Label codes (E5). Methods with intervention; also sets T.
    teacher_logprobs: log nu(token). estimator="sampled" (or computed from teacher_logits).
    behaviour_logprobs: log pi_old(token), from the sampler. estimator="sampled" with
      old_logprobs="batch"; old_logprobs="current" uses stop_gradient(log pi_theta)
      instead (one update per batch: r = 1 exactly).
    teacher_top1, teacher_entropy: per-token max_v nu and H(nu), for the confidence modes.
    teacher_logits: [B, S, V], optional. Exact estimator="full" (E2, E10); when given,
      missing teacher_* statistics are computed from it.
    teacher_topk_ids, teacher_topk_logprobs: [B, S, K], estimator="full" without
      teacher_logits: the divergence on the teacher's top-k support (`topk_divergence`).
    student_support: [B, S, K] int, optional: per token, the ids constrained decoding allowed
      there (-1 padded; none listed: unconstrained). log pi_theta is then renormalised over them
      (`token_logprobs`), the policy the sampler drew from (the expert teacher's batches carry it).
  Everything from the batch is under stop-gradient; only `student_logits` is trained.

  Args:
    options: a `LossOptions` (the method and every option); None: `LossOptions.for_method`.
    axis_name: inside shard_map, psums N, sum(L s), the row count, the loss and metrics.
    global_num_tokens, global_weight_sum, global_num_sequences: totals over every
      micro-batch and device (`loss_totals`); then the returned losses of all micro-batches
      (and devices, when psum'd via axis_name) sum to the global loss.
    student_logprobs: [B, S] token-aligned log pi_theta(token) (`chunked_token_logprobs`), in place of
      `student_logits` (then None) where the method needs no more (`needs_student_logits` is False).
    **fields: LossOptions fields that replace those of `options`, e.g. `method="opd"`.

  Returns:
    loss: scalar. With axis_name it is the psum of every device's share (the same value on
      each device); its gradient is the global gradient.
    metrics: scalars. num_tokens (response tokens, N), num_trained_tokens (w > 0),
      weight_mean (token mean of w over response tokens), and for distillation kl_mean,
      kl_max (the per-token divergence over trained tokens), clip_frac (sampled),
      skip_frac/weak_frac/strong_frac (over non-empty turns; when labels are given),
      confidence_mean (over non-empty turns, or response tokens for token_top1; when the
      teacher statistics are given); for sft nll_mean.
  """
  if (student_logits is None) == (student_logprobs is None):
    raise ValueError("sage_opd_loss: pass exactly one of student_logits [B, S, V] and student_logprobs [B, S].")
  _check_shapes(student_logits if student_logprobs is None else student_logprobs, batch)
  batch = jax.tree.map(jax.lax.stop_gradient, dict(batch))
  options = _with_batch_turns(_resolve(options, fields), batch)
  w_BxS = token_weights(batch, options, axis_name=axis_name, global_num_tokens=global_num_tokens,
                        global_weight_sum=global_weight_sum)
  objective = per_token_objective(student_logits, batch, w_BxS, options, student_logprobs)
  loss = aggregate(objective.loss_BxS, response_mask(batch["turn_ids"], options.num_turns), options.aggregation,
                   axis_name, global_num_tokens, global_num_sequences)
  return loss, {"loss": loss, **loss_metrics(batch, options, w_BxS, objective, axis_name)}


def validate_batch(batch: Batch, num_turns: int) -> None:
  """Host-side value checks a jitted loss cannot make; raises ValueError naming the key."""
  turn_ids = jnp.asarray(_require(batch, "turn_ids", "validation"))
  if turn_ids.ndim != 2:
    raise ValueError(f"batch['turn_ids'] must be [B, S], got shape {turn_ids.shape}.")
  if bool(jnp.any(turn_ids[:, 0] != 0)):
    raise ValueError("batch['turn_ids'][:, 0] must be 0: position 0 has no predicting logits.")
  if bool(jnp.any((turn_ids < 0) | (turn_ids > num_turns))):
    raise ValueError(f"batch['turn_ids'] must lie in [0, {num_turns}] (num_turns).")
  if "labels" in batch:
    labels = jnp.asarray(batch["labels"])
    if labels.shape != (turn_ids.shape[0], num_turns):
      raise ValueError(f"batch['labels'] has shape {labels.shape}; expected {(turn_ids.shape[0], num_turns)}.")
    if bool(jnp.any((labels < Label.SKIP) | (labels > Label.STRONG))):
      raise ValueError("batch['labels'] must hold Label codes 0 (Skip), 1 (Weak), 2 (Strong).")
