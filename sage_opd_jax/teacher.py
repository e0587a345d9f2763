"""Teacher scoring: one jitted, chunked forward of the frozen teacher over a rollout batch.

The teacher's per-token signals on the student's own tokens (E1, E6, E10 in docs/method.md):

  teacher_logprobs [B, S]  log nu(token s | tokens < s)
  teacher_top1     [B, S]  max_v nu(v | tokens < s)
  teacher_entropy  [B, S]  H(nu(. | tokens < s)) in nats
  teacher_topk_ids / teacher_topk_logprobs [B, S, K]   optional, for forward-KL / JSD variants

All are token-aligned like the rest of the batch (entry s describes the distribution that
predicts token s; entry 0 and padding are 0), so they merge straight into the loss batch.
A packed batch (`rollout.RolloutBatch`'s `positions`, `segments`, `reach`) is scored as the
student acted: each turn past the history window in its own segment, reading P and its
windowed context only (`models.packed_allowed`), so the teacher scores what the student saw.

The LM head is the memory hazard at scale ([B, S, V] float32 for a 150k vocabulary is tens of
GiB), so the trunk runs once to `hidden_states` and the head + log-softmax statistics run
chunk by chunk over the sequence under `lax.map`: only `[B, chunk + 1, V]` logits exist at a
time. Each chunk is handed to `losses.teacher_token_stats`, whose `align_to_tokens` is the
codebase's one shift; chunks therefore overlap by one position (the logits that predict a
chunk's first token sit at the previous chunk's last position).

With the transcript judge (`judge.mode='transcript'`) the same pass also answers the judge's
questions, packed after each transcript (`score_tokens(questions=)`, `models.packed_allowed`).

The teacher's params are a separate pytree (`nnx.split(teacher)`), possibly sharded unlike the
student's; they are read under `stop_gradient` and never trained.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sage_opd_jax import losses
from sage_opd_jax import update as update_lib
from sage_opd_jax.models import sharding

Array = jax.Array
Scores = dict[str, Array]

STAT_KEYS = ("teacher_logprobs", "teacher_top1", "teacher_entropy")
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs")
# The packed rows of `judge.PackedQuestions.arrays()` (the transcript judge's questions).
QUESTION_KEYS = ("tokens", "positions", "segments", "reach", "mask", "answer_at")
# A rollout batch's packing (`rollout.RolloutBatch`): each turn read in its sampling context.
PACKING_KEYS = ("positions", "segments", "reach")


def _chunk_stats(model: nnx.Module, hidden_BxWxD: Array, tokens_BxW: Array, top_k: int,
                 temperature: float, vocab_limit: int = 0) -> Scores:
  """One window of W = chunk + 1 positions -> token-aligned stats of its last W - 1 tokens."""
  logits_BxWxV = model.lm_logits(hidden_BxWxD).astype(jnp.float32) / temperature
  stats = losses.teacher_token_stats(logits_BxWxV, tokens_BxW)
  if top_k:
    logq_BxWxV = jax.nn.log_softmax(logits_BxWxV, axis=-1)
    if vocab_limit and vocab_limit < logq_BxWxV.shape[-1]:
      # The embedding's padding rows (no token of the tokenizer) never enter the support.
      logq_BxWxV = jnp.where(jnp.arange(logq_BxWxV.shape[-1]) < vocab_limit, logq_BxWxV, -jnp.inf)
    topk_logprobs_BxWxK, topk_ids_BxWxK = jax.lax.top_k(logq_BxWxV, top_k)
    stats["teacher_topk_logprobs"] = losses.align_to_tokens(topk_logprobs_BxWxK)
    stats["teacher_topk_ids"] = losses.align_to_tokens(topk_ids_BxWxK.astype(jnp.int32))
  # Window position 0 only serves as the predictor of position 1; its own entry belongs to the
  # previous window.
  return {key: value[:, 1:] for key, value in stats.items()}


def score_tokens(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BxS: Array,
    attention_mask_BxS: Array,
    *,
    chunk_size: int,
    top_k: int = 0,
    temperature: float = 1.0,
    questions: Mapping[str, Array] | None = None,
    vocab_limit: int = 0,
    packing: Mapping[str, Array] | None = None,
    micro_batches: int = 1,
) -> Scores:
  """The teacher's token-aligned statistics of a batch (un-jitted; see `make_scorer`).

  Args:
    graphdef, state: `nnx.split(teacher)`; the state is read under stop_gradient.
    tokens_BxS: int token ids, right-padded.
    attention_mask_BxS: 1 for real tokens, 0 for padding.
    chunk_size: sequence positions per LM-head chunk; need not divide S.
    top_k: also return the K most likely teacher tokens per position (0: off).
    vocab_limit: the top-K is taken among ids < this (the tokenizer's; e.g. Qwen3's embedding
      rows 151669-151935 are padding); 0: every id. It must leave >= K ids.
    temperature: every statistic is that of nu_tau, proportional to nu^(1/tau) (1: nu itself).
    questions: the transcript judge's packed rows (`judge.PackedQuestions.arrays()`, W >= S
      columns whose first S hold the batch's real tokens). The trunk then runs over them
      instead of the batch: a transcript position reads only transcript keys, so its
      statistics are unchanged, and the questions cost only the positions they add. Their
      first S columns carry the batch's packing.
    packing: the batch's `PACKING_KEYS` ([B, S] int32, `rollout.RolloutBatch`), when its rows
      pack turns past a history window; None reads each row as one causal sequence.
    micro_batches: rows scored in this many strided groups, one after the other (`update.split_micro`,
      as the update's micro-batches), so one group's activations are live at a time; it must divide B.

  Returns:
    `STAT_KEYS` -> [B, S] float32 (plus `TOPK_KEYS` -> [B, S, K] when top_k > 0). Entry s
    describes the teacher distribution that predicts token s; entry 0 and padding entries are 0.
    With `questions`, also `answer_logits` [B, R, V] float32: the next-token logits (at
    temperature 1) after each question's last token, `answer_at`.
  """
  if chunk_size < 1:
    raise ValueError(f"score_tokens: chunk_size must be >= 1, got {chunk_size}.")
  if top_k < 0:
    raise ValueError(f"score_tokens: top_k must be >= 0, got {top_k}.")
  if vocab_limit and top_k > vocab_limit:
    raise ValueError(f"score_tokens: top_k={top_k} exceeds vocab_limit={vocab_limit}.")
  if not temperature > 0:
    raise ValueError(f"score_tokens: temperature must be > 0, got {temperature}.")
  if tokens_BxS.shape != attention_mask_BxS.shape:
    raise ValueError(
        f"score_tokens: tokens {tokens_BxS.shape} and attention_mask {attention_mask_BxS.shape} differ.")
  batch, seq = tokens_BxS.shape
  if micro_batches > 1:
    if batch % micro_batches:
      raise ValueError(f"score_tokens: {batch} rows do not split into micro_batches={micro_batches}.")
    score = functools.partial(score_tokens, graphdef, state, chunk_size=chunk_size, top_k=top_k,
                              temperature=temperature, vocab_limit=vocab_limit)
    split = update_lib.split_micro(dict(tokens=tokens_BxS, mask=attention_mask_BxS, questions=questions,
                                        packing=packing), micro_batches)
    per_micro = jax.lax.map(lambda m: score(m["tokens"], m["mask"], questions=m["questions"], packing=m["packing"]),
                            split)  # Each [M, B / M, ...]; micro-batch m holds rows i * M + m.
    return jax.tree.map(lambda x: sharding.pin_rows(jnp.swapaxes(x, 0, 1).reshape(batch, *x.shape[2:])), per_micro)
  model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
  # Each device's rows stay its own (under `make_scorer(mesh=)`): the partitioner gathers the weights, never the rows.
  tokens_BxS, attention_mask_BxS, questions, packing = jax.tree.map(
      sharding.pin_rows, (tokens_BxS.astype(jnp.int32), attention_mask_BxS, questions, packing))
  answer_logits_BxRxV = None
  if questions is None and packing is None:
    hidden_BxSxD = model.hidden_states(tokens_BxS, attention_mask=attention_mask_BxS)
  elif questions is None:
    if sorted(packing) != sorted(PACKING_KEYS):
      raise ValueError(f"score_tokens: packing has keys {sorted(packing)}; expected {sorted(PACKING_KEYS)}.")
    hidden_BxSxD = model.hidden_states(tokens_BxS, packing["positions"], attention_mask_BxS,
                                       segments=packing["segments"], reach=packing["reach"])
  else:
    if sorted(questions) != sorted(QUESTION_KEYS):
      raise ValueError(f"score_tokens: questions has keys {sorted(questions)}; expected {sorted(QUESTION_KEYS)}.")
    width = questions["tokens"].shape[1]
    if questions["tokens"].shape[0] != batch or width < seq:
      raise ValueError(f"score_tokens: questions['tokens'] is {questions['tokens'].shape}; it needs the "
                       f"batch's {batch} rows and at least its {seq} positions.")
    hidden_BxWxD = model.hidden_states(questions["tokens"], questions["positions"], questions["mask"],
                                       segments=questions["segments"], reach=questions["reach"])
    answer_logits_BxRxV = model.lm_logits(
        jnp.take_along_axis(hidden_BxWxD, questions["answer_at"][..., None], axis=1)).astype(jnp.float32)
    hidden_BxSxD = hidden_BxWxD[:, :seq]

  # One leading dummy position makes window c = padded positions [c*C, c*C + C], i.e. real
  # positions [c*C - 1, c*C + C): the C tokens of chunk c plus the position predicting the first.
  num_chunks = -(-seq // chunk_size)
  pad_right = num_chunks * chunk_size - seq
  hidden_pad = jnp.pad(hidden_BxSxD, ((0, 0), (1, pad_right), (0, 0)))
  tokens_pad = jnp.pad(tokens_BxS, ((0, 0), (1, pad_right)))

  def one_chunk(c: Array) -> Scores:
    start = c * chunk_size
    hidden_BxWxD = jax.lax.dynamic_slice_in_dim(hidden_pad, start, chunk_size + 1, axis=1)
    tokens_BxW = jax.lax.dynamic_slice_in_dim(tokens_pad, start, chunk_size + 1, axis=1)
    return _chunk_stats(model, hidden_BxWxD, tokens_BxW, top_k, temperature, vocab_limit)

  per_chunk = jax.lax.map(one_chunk, jnp.arange(num_chunks))  # Each [num_chunks, B, C, ...].

  # Token 0 has no predicting position (its window entry came from the dummy) and padding
  # tokens were never sampled: both are 0.
  real_BxS = (attention_mask_BxS > 0) & (jnp.arange(seq)[None, :] > 0)
  scores = {}
  for key, value in per_chunk.items():
    value = jnp.moveaxis(value, 0, 1).reshape((batch, num_chunks * chunk_size) + value.shape[3:])
    value = value[:, :seq]
    real = real_BxS.reshape(real_BxS.shape + (1,) * (value.ndim - 2))
    scores[key] = jnp.where(real, value, jnp.zeros((), value.dtype))
  if answer_logits_BxRxV is not None:
    scores["answer_logits"] = answer_logits_BxRxV
  return scores


@functools.lru_cache(maxsize=16)
def make_scorer(
    graphdef: nnx.GraphDef, *, chunk_size: int, top_k: int = 0, temperature: float = 1.0, vocab_limit: int = 0,
    mesh: jax.sharding.Mesh | None = None, micro_batches: int = 1,
) -> Callable[..., Scores]:
  """A jitted `(state, tokens_BxS, attention_mask_BxS, questions=None, packing=None) -> scores` for one teacher graph.

  One compile per distinct [B, S]: the rollout's bucketed batch shapes are the student's, so
  the teacher compiles as often as the student's forward does. Sharding follows the inputs:
  the teacher state may live on its own layout, the token arrays on the batch sharding; with
  `mesh` (the batch's) the program is traced on it (`sharding.on_mesh`), so the rows' activations
  stay pinned to their devices as in the student's update.
  Cached per argument, so repeated calls share one jitted function.
  """
  return jax.jit(sharding.on_mesh(functools.partial(score_tokens, graphdef, chunk_size=chunk_size, top_k=top_k,
                                                    temperature=temperature, vocab_limit=vocab_limit,
                                                    micro_batches=micro_batches), mesh))


def score_batch(
    teacher: nnx.Module, tokens_BxS: Array, attention_mask_BxS: Array, *, chunk_size: int,
    top_k: int = 0, temperature: float = 1.0, questions: Mapping[str, Array] | None = None, vocab_limit: int = 0,
    packing: Mapping[str, Array] | None = None, micro_batches: int = 1,
) -> Scores:
  """Splits `teacher` and scores with the (cached) jitted scorer of its graph, on the tokens' mesh if they have one."""
  graphdef, state = nnx.split(teacher)
  tokens_BxS = jnp.asarray(tokens_BxS)
  mesh = tokens_BxS.sharding.mesh if isinstance(tokens_BxS.sharding, jax.sharding.NamedSharding) else None
  return make_scorer(graphdef, chunk_size=chunk_size, top_k=top_k, temperature=temperature,
                     vocab_limit=vocab_limit, mesh=mesh, micro_batches=micro_batches)(
      state, tokens_BxS, jnp.asarray(attention_mask_BxS), questions=questions, packing=packing)
