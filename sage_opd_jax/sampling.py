"""Jitted sampling over a static-size KV cache, with constraints and multi-turn prefix reuse.

Device side (pure, jitted): `generate` appends one right-padded chunk per row to a `KVCache`
(a prompt, a turn's new observation, or a rebuilt history window) in one forward pass, then
decodes in a `lax.while_loop` until every row has stopped (EOS, a stop sequence, a completed
constrained string) or `max_new_tokens` is reached. Every sampled token is fed back into the
cache, the last one included, so after a call the cache holds exactly the row's context plus
its response: the next turn only appends its new observation tokens.

Host side: `build_token_trie` compiles the allowed token sequences of each row (for example the
env's admissible actions) into small dense arrays; `EpisodeCache` keeps the cache of B lockstep
episodes between turns and reuses, per row, the longest cached prefix of the new context, so a
turn costs its new tokens and a history window that slides costs one re-prefill of that row.

Behaviour log-probs are those of the distribution actually sampled from: the model's logits,
masked by the row's constraint, divided by the temperature, truncated by top-k then top-p, and
renormalised. Greedy decoding (temperature 0) is a point mass; for it the log-probs returned are
those of the (constrained) model distribution at temperature 1, the quantity a greedy transcript
is scored with. A forced token (the only one a constraint allows) has log-prob 0.

Constrained decoding: a row's allowed sequences must each end with the stop text (for example
the tokens of `go to desk 1</action>`), so "the string is complete" and "the stop sequence has
been emitted" are one event: the row stops on reaching a leaf of its trie. Constraints start
either at the first generated token (the caller ends the chunk with a forced `<action>`, or puts
`<action>` at the head of every allowed sequence) or, when `SamplingConfig.constraint_trigger`
is set, right after the row generates that token sequence (free thinking, then a valid action).
A thought budget (`SamplingConfig.max_thought_tokens`) bounds that free part: a row still waiting
for its trigger when the budget is spent, or when only the trigger and its longest allowed
sequence still fit in `max_new_tokens`, is forced through the trigger into its constraint, so
its response ends in an allowed sequence even if the model never emits the trigger itself.
Token-level matching (stop sequences, the trigger) sees token ids, not text: a tokenizer that
merges `>` with the next word never emits the trigger's tokens, so use a trigger only with
tokens the tokenizer keeps whole (added special tokens). A stop text that BPE merges with its
neighbours is a stop PATTERN (`SamplingConfig.stop_patterns`): per position, the tokens that may
spell it there (Qwen's `</action>\n` is `</`, `action`, `>\n`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sage_opd_jax import models

_NEG_INF = float("-inf")
# Trie nodes: a row at node -1 is unconstrained; at -2 it waits for its constraint trigger.
_FREE = -1
_WAITING = -2


# ----------------------------------------------------------------------------------------------
# Configuration and shape buckets.


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static decoding settings (hashable: one jit specialisation per distinct value).

  Attributes:
    max_new_tokens: the most tokens generated per row per call.
    temperature: 0 means greedy; otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0: off).
    top_p: keep the smallest most-likely set whose mass reaches top_p (1.0: off).
    eos_ids: token ids that end a row (the EOS token is emitted and counted).
    stop_sequences: token sequences that end a row once its generated tokens end with one.
    pad_id: the id written after a row's last token.
    constraint_trigger: if set, a constrained row generates freely until its generated tokens
      end with this sequence, and is constrained from the next token on.
    max_thought_tokens: the thought budget of a constrained row waiting for `constraint_trigger`
      (0: none, the row may think until `max_new_tokens`). A row that has generated this many
      tokens, or has only room left for the trigger and its longest allowed sequence, is forced
      to emit the trigger (log-prob 0) and is then constrained. Needs the trigger, and a trie
      built with it (`build_token_trie(..., trigger=...)`).
    stop_patterns: like `stop_sequences`, with a set of alternative tokens per position: a row
      ends once its last generated tokens match one pattern position by position.
    vocab_limit: ids >= this are never sampled (the embedding's padding rows past the
      tokenizer, e.g. Qwen3's 151669-151935); 0: every id of the model.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  pad_id: int = 0
  constraint_trigger: tuple[int, ...] = ()
  max_thought_tokens: int = 0
  stop_patterns: tuple[tuple[tuple[int, ...], ...], ...] = ()
  vocab_limit: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.temperature == 0.0 and (self.top_k or self.top_p < 1.0):
      raise ValueError("top_k/top_p have no effect with temperature 0 (greedy); unset them")
    # Normalise lists to tuples so that the config stays hashable for jit.
    object.__setattr__(self, "eos_ids", tuple(int(t) for t in self.eos_ids))
    object.__setattr__(
        self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
    object.__setattr__(self, "constraint_trigger", tuple(int(t) for t in self.constraint_trigger))
    for i, seq in enumerate(self.stop_sequences):
      if not seq:
        raise ValueError(f"stop_sequences[{i}] is empty")
    object.__setattr__(self, "stop_patterns", tuple(
        tuple(tuple(sorted({int(t) for t in alts})) for alts in pattern) for pattern in self.stop_patterns))
    for i, pattern in enumerate(self.stop_patterns):
      if not pattern or not all(pattern):
        raise ValueError(f"stop_patterns[{i}] is empty or has a position without tokens")
    if self.vocab_limit < 0:
      raise ValueError(f"vocab_limit must be >= 0 (0 is off), got {self.vocab_limit}")
    if self.max_thought_tokens < 0:
      raise ValueError(f"max_thought_tokens must be >= 0 (0 is off), got {self.max_thought_tokens}")
    if self.max_thought_tokens and not self.constraint_trigger:
      raise ValueError("max_thought_tokens bounds the thought before constraint_trigger; set the trigger")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def bucket_length(n: int, minimum: int = 16) -> int:
  """The smallest bucket >= n among {2^k, 3 * 2^(k-1)} that is >= `minimum`.

  Two buckets per octave: at most 1.5x padding, and about 2 * log2(max / min) shapes a run.
  """
  if n < 0:
    raise ValueError(f"bucket_length: n must be >= 0, got {n}")
  size = max(minimum, 1)
  while size < n:
    half = size // 2
    # From 2^k step to 3 * 2^(k-1) when that is a bucket of its own, else to 2^(k+1).
    size = size + half if (half and size & (size - 1) == 0) else _next_pow2(size + 1)
  return size


def _next_pow2(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# ----------------------------------------------------------------------------------------------
# Constraints: a token trie as dense arrays.


@flax.struct.dataclass
class TokenTrie:
  """Per-row allowed token sequences as one node table, for masking inside the decode loop.

  Attributes:
    child_tokens: [N, C] int32, the token labelling each child edge of a node; -1 pads.
    child_nodes: [N, C] int32, the node each edge leads to; -1 pads.
    terminal: [N] bool, True at the node reached by a complete allowed sequence (a leaf).
    roots: [B] int32, the root node of each row; -1 marks an unconstrained row.
    budget_roots: [B] int32, where a row goes when its thought budget is spent: a chain of the
      trigger's tokens that ends at its root; -1 for an unconstrained row or a trie built
      without a trigger.
    budget_lengths: [B] int32, the longest sequence from each row's budget root (the trigger
      plus the row's longest allowed sequence); 0 where there is none.
  """

  child_tokens: jax.Array
  child_nodes: jax.Array
  terminal: jax.Array
  roots: jax.Array
  budget_roots: jax.Array
  budget_lengths: jax.Array


def build_token_trie(
    allowed: Sequence[Sequence[Sequence[int]] | None],
    vocab_size: int,
    trigger: Sequence[int] = (),
    min_nodes: int = 1,
    min_width: int = 1,
) -> TokenTrie:
  """Compiles each row's allowed token sequences into a `TokenTrie` (host side, numpy).

  Args:
    allowed: per row, the allowed token sequences (each should end with the stop tokens, e.g.
      those of `</action>`), or None for an unconstrained row.
    vocab_size: the model's vocabulary size; every token must lie in [0, vocab_size).
    trigger: the sampler's `constraint_trigger` when it has a thought budget: each constrained
      row then also gets a budget root whose sequences are the trigger then its allowed ones.
    min_nodes, min_width: pad the node and child counts to at least these (`EpisodeCache` passes
      the largest it has built, so its later, smaller tries reuse that compiled shape).

  Returns:
    The trie; node and child counts are padded to powers of two to bound recompiles.

  Raises:
    ValueError: for an empty set or sequence, an out-of-range token, or a sequence that is a
      proper prefix of another (stopping at its end would make the longer one unreachable).
  """
  trigger = [int(t) for t in trigger]
  bad = [t for t in trigger if not 0 <= t < vocab_size]
  if bad:
    raise ValueError(f"trigger has tokens outside [0, {vocab_size}): {bad}")
  children: list[dict[int, int]] = []
  terminal: list[bool] = []

  def new_node() -> int:
    children.append({})
    terminal.append(False)
    return len(children) - 1

  roots, budget_roots, budget_lengths = [], [], []
  for row, seqs in enumerate(allowed):
    if seqs is None:
      roots.append(_FREE)
      budget_roots.append(_FREE)
      budget_lengths.append(0)
      continue
    if len(seqs) == 0:
      raise ValueError(f"allowed[{row}] is an empty set of sequences; pass None for no constraint")
    root = new_node()
    roots.append(root)
    for i, seq in enumerate(seqs):
      seq = [int(t) for t in seq]
      if not seq:
        raise ValueError(f"allowed[{row}][{i}] is an empty token sequence")
      bad = [t for t in seq if not 0 <= t < vocab_size]
      if bad:
        raise ValueError(f"allowed[{row}][{i}] has tokens outside [0, {vocab_size}): {bad}")
      node = root
      for tok in seq:
        if terminal[node]:
          raise ValueError(f"allowed[{row}][{i}] extends another allowed sequence of that row")
        if tok not in children[node]:
          children[node][tok] = new_node()
        node = children[node][tok]
      if children[node]:
        raise ValueError(f"allowed[{row}][{i}] is a proper prefix of another allowed sequence")
      terminal[node] = True
    if trigger:
      # The trigger's chain joins the row's own trie at its root, so no sequence is stored twice.
      chain = [new_node() for _ in trigger] + [root]
      for i, tok in enumerate(trigger):
        children[chain[i]][tok] = chain[i + 1]
      budget_roots.append(chain[0])
      budget_lengths.append(len(trigger) + max(len(seq) for seq in seqs))
    else:
      budget_roots.append(_FREE)
      budget_lengths.append(0)

  num_nodes = _next_pow2(max(len(children), min_nodes, 1))
  width = _next_pow2(max([len(c) for c in children] + [min_width, 1]))
  child_tokens = np.full((num_nodes, width), -1, np.int32)
  child_nodes = np.full((num_nodes, width), -1, np.int32)
  for node, edges in enumerate(children):
    for j, (tok, nxt) in enumerate(sorted(edges.items())):
      child_tokens[node, j] = tok
      child_nodes[node, j] = nxt
  terminal_arr = np.zeros((num_nodes,), bool)
  terminal_arr[: len(terminal)] = terminal
  return TokenTrie(
      child_tokens=child_tokens,
      child_nodes=child_nodes,
      terminal=terminal_arr,
      roots=np.asarray(roots, np.int32),
      budget_roots=np.asarray(budget_roots, np.int32),
      budget_lengths=np.asarray(budget_lengths, np.int32),
  )


def _allowed_mask(trie: TokenTrie, node_B: jax.Array, vocab_size: int) -> jax.Array:
  """[B, V] bool: the tokens each row may emit next (all of them for unconstrained rows)."""
  batch = node_B.shape[0]
  tokens_BxC = trie.child_tokens[jnp.maximum(node_B, 0)]
  # -1 pads must not wrap around to the last token: send them out of range and drop them.
  tokens_BxC = jnp.where(tokens_BxC >= 0, tokens_BxC, vocab_size)
  rows_BxC = jnp.broadcast_to(jnp.arange(batch)[:, None], tokens_BxC.shape)
  allowed_BxV = jnp.zeros((batch, vocab_size), bool).at[rows_BxC, tokens_BxC].set(
      True, mode="drop")
  return jnp.where((node_B >= 0)[:, None], allowed_BxV, True)


def _advance(trie: TokenTrie, node_B: jax.Array, token_B: jax.Array) -> jax.Array:
  """[B] int32: each constrained row's node after emitting `token_B` (others unchanged)."""
  safe_B = jnp.maximum(node_B, 0)
  hit_BxC = trie.child_tokens[safe_B] == token_B[:, None]
  nxt_B = jnp.take_along_axis(
      trie.child_nodes[safe_B], jnp.argmax(hit_BxC, axis=-1)[:, None], axis=-1)[:, 0]
  return jnp.where(node_B >= 0, nxt_B, node_B)


# ----------------------------------------------------------------------------------------------
# The sampling distribution.


def sampling_logits(logits_BxV: jax.Array, config: SamplingConfig,
                    allowed_BxV: jax.Array | None = None) -> jax.Array:
  """[B, V] float32 logits of the distribution sampled from (-inf outside its support).

  Order: the ids past `config.vocab_limit`, constraint mask, temperature, top-k, top-p (as in HF
  transformers). Greedy returns the masked logits at temperature 1.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  if config.vocab_limit and config.vocab_limit < logits_BxV.shape[-1]:
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < config.vocab_limit, logits_BxV, _NEG_INF)
  if allowed_BxV is not None:
    logits_BxV = jnp.where(allowed_BxV, logits_BxV, _NEG_INF)
  if config.greedy:
    return logits_BxV
  logits_BxV = logits_BxV / config.temperature
  vocab = logits_BxV.shape[-1]
  if config.top_k and config.top_k < vocab:
    kth_Bx1 = jax.lax.top_k(logits_BxV, config.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, _NEG_INF)
  if config.top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # The most likely token always stays, so the support is never empty.
    kept_B = jnp.maximum(jnp.sum(mass_before_BxV < config.top_p, axis=-1), 1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, _NEG_INF)
  return logits_BxV


def greedy_token(logits_BxV: jax.Array) -> jax.Array:
  """[B] int32 `jnp.argmax` (the first maximum) of NaN-free logits, as two plain reductions.

  XLA:CPU runs argmax's (value, index) reduction unvectorised: over a batch-16, 8192-token
  vocabulary it was the largest op after the LM head's dot in a 6M-parameter model's step.
  """
  vocab = logits_BxV.shape[-1]
  max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
  ids_1xV = jnp.arange(vocab, dtype=jnp.int32)[None]
  return jnp.min(jnp.where(logits_BxV == max_Bx1, ids_1xV, vocab), axis=-1)


def _choose(logits_BxV: jax.Array, key: jax.Array, config: SamplingConfig
            ) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row from the sampling logits; returns (token_B, logprob_B).

  `key`: one [2] key for the batch, or [B, 2], one per row.
  """
  logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  if config.greedy:
    token_B = greedy_token(logits_BxV)
  else:
    # Inverse-CDF sampling: one uniform per row instead of V Gumbel draws (the RNG would cost
    # more than the rest of the step on CPU). u lies in (0, 1], so the chosen token is the
    # first whose CDF reaches u * total > 0: never a zero-probability one.
    cdf_BxV = _cumsum_last(jnp.exp(logp_BxV))
    if key.ndim == 2:  # [B, 2] keys, one per row: a row's draw does not depend on the batch it is in.
      u_Bx1 = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, (1,), jnp.float32))(key)
    else:
      u_Bx1 = 1.0 - jax.random.uniform(key, (logits_BxV.shape[0], 1), jnp.float32)
    token_B = jnp.sum(cdf_BxV < u_Bx1 * cdf_BxV[:, -1:], axis=-1).astype(jnp.int32)
    # Float rounding where the blocks of `_cumsum_last` meet could land on a zero-probability id
    # (about once in 1e7 draws); the most likely token stands in for it.
    token_B = jnp.where(jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0] > -jnp.inf, token_B,
                        greedy_token(logits_BxV))
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


_CUMSUM_BLOCK = 1024


def _cumsum_last(x_BxV: jax.Array) -> jax.Array:
  """[B, V] -> [B, V] `jnp.cumsum` over V, in blocks: a cumsum within each block, then of the block totals.

  `jnp.cumsum` lowers to a reduce_window as wide as V; with V sharded (the mesh's tensor axis) XLA
  partitions it in time quadratic in V (about 8 s per decode step at Qwen3's 151,936 on CPU).
  The blocked form only scans short rows.
  """
  batch, vocab = x_BxV.shape
  if vocab <= _CUMSUM_BLOCK:
    return jnp.cumsum(x_BxV, axis=-1)
  num_blocks = -(-vocab // _CUMSUM_BLOCK)
  x_BxNxC = jnp.pad(x_BxV, ((0, 0), (0, num_blocks * _CUMSUM_BLOCK - vocab))).reshape(batch, num_blocks, -1)
  within_BxNxC = jnp.cumsum(x_BxNxC, axis=-1)
  totals_BxN = jnp.cumsum(within_BxNxC[..., -1], axis=-1)
  offsets_BxN = jnp.pad(totals_BxN[:, :-1], ((0, 0), (1, 0)))
  return (offsets_BxN[..., None] + within_BxNxC).reshape(batch, -1)[:, :vocab]


def _step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key of decode step `step`: of the batch's [2] key, or of each row's ([B, 2] keys)."""
  if rng.ndim == 2:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, step)
  return jax.random.fold_in(rng, step)


def _suffix_match(recent_BxL: jax.Array, count_B: jax.Array,
                  sequences: Sequence[Sequence[int]]) -> jax.Array:
  """[B] bool: whether a row's last generated tokens end with one of `sequences`."""
  return _pattern_match(recent_BxL, count_B, [[(t,) for t in seq] for seq in sequences])


def _pattern_match(recent_BxL: jax.Array, count_B: jax.Array,
                   patterns: Sequence[Sequence[Sequence[int]]]) -> jax.Array:
  """[B] bool: whether a row's last generated tokens match one of `patterns` (alternatives per position)."""
  width = recent_BxL.shape[1]
  hit_B = jnp.zeros(recent_BxL.shape[:1], bool)
  for pattern in patterns:
    match_B = count_B >= len(pattern)
    for i, alts in enumerate(pattern):
      match_B &= jnp.isin(recent_BxL[:, width - len(pattern) + i], jnp.asarray(alts, jnp.int32))
    hit_B |= match_B
  return hit_B


# ----------------------------------------------------------------------------------------------
# The jitted generate.


class GenerateOutput(NamedTuple):
  """What one `generate` call returns (device arrays).

  tokens: [B, N] int32 generated tokens, `pad_id` after each row's last one.
  logprobs: [B, N] float32 behaviour log-probs of those tokens, 0 after the last one.
  lengths: [B] int32 tokens generated per row (0 for inactive rows).
  stopped: [B] bool, True where the row ended on EOS / a stop sequence / a complete constrained
    string, False where it ran out of `max_new_tokens` (or was inactive).
  cache: the cache after the call; its rows hold context + response.
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  cache: Any


def _generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: Any,
    chunk_BxP: jax.Array,
    chunk_lengths_B: jax.Array,
    active_B: jax.Array,
    rng: jax.Array,
    trie: TokenTrie | None,
    config: SamplingConfig,
    fresh: bool,
) -> GenerateOutput:
  """Appends each active row's chunk to the cache, then decodes (see `generate`)."""
  model = nnx.merge(graphdef, state)
  batch, chunk_len = chunk_BxP.shape
  steps = config.max_new_tokens
  # Per-layer weights sliced once here: inside the loop, every step would copy them out of
  # the stacked arrays (XLA:CPU materialises each slice).
  layer_params = model.layers.unstacked()

  # One chunked forward for the new tokens of every row; only the last real position's hidden
  # state becomes logits, so [B, P, V] is never materialised.
  chunk_lengths_B = jnp.where(active_B, chunk_lengths_B, 0).astype(jnp.int32)
  mask_BxP = (jnp.arange(chunk_len)[None, :] < chunk_lengths_B[:, None]).astype(jnp.int32)
  hidden_BxPxD, cache = model.hidden_states(chunk_BxP, attention_mask=mask_BxP, cache=cache,
                                            layer_params=layer_params, fresh=fresh)
  last_Bx1x1 = jnp.maximum(chunk_lengths_B - 1, 0)[:, None, None]
  hidden_Bx1xD = jnp.take_along_axis(hidden_BxPxD, last_Bx1x1, axis=1)
  logits_BxV = model.lm_logits(hidden_Bx1xD)[:, 0].astype(jnp.float32)
  vocab = logits_BxV.shape[-1]

  if trie is not None:
    roots_B = jnp.asarray(trie.roots, jnp.int32)
    start_B = jnp.where((roots_B >= 0) & bool(config.constraint_trigger), _WAITING, roots_B)
  else:
    start_B = jnp.full((batch,), _FREE, jnp.int32)
  watched = tuple(config.stop_sequences) + tuple(config.stop_patterns) + (
      (config.constraint_trigger,) if config.constraint_trigger else ())
  window = max([len(s) for s in watched] + [1])

  carry = dict(
      step=jnp.zeros((), jnp.int32),
      logits=logits_BxV,
      cache=cache,
      alive=active_B.astype(bool),
      stopped=jnp.zeros((batch,), bool),
      lengths=jnp.zeros((batch,), jnp.int32),
      tokens=jnp.full((batch, steps), config.pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, steps), jnp.float32),
      recent=jnp.full((batch, window), -1, jnp.int32),
      node=start_B,
  )

  def cond(c):
    return (c["step"] < steps) & jnp.any(c["alive"])

  def body(c):
    alive_B, node_B = c["alive"], c["node"]
    if trie is not None and config.max_thought_tokens:
      # A row still thinking when its budget is spent, or when only the trigger and its longest
      # allowed sequence still fit, enters the chain that forces the trigger into its trie.
      spent_B = ((c["lengths"] >= config.max_thought_tokens)
                 | (steps - c["lengths"] <= jnp.asarray(trie.budget_lengths, jnp.int32)))
      node_B = jnp.where((node_B == _WAITING) & spent_B, jnp.asarray(trie.budget_roots, jnp.int32),
                         node_B)
    allowed_BxV = _allowed_mask(trie, node_B, vocab) if trie is not None else None
    token_B, logp_B = _choose(sampling_logits(c["logits"], config, allowed_BxV),
                              _step_key(rng, c["step"]), config)
    token_B = jnp.where(alive_B, token_B, config.pad_id)
    logp_B = jnp.where(alive_B, logp_B, 0.0)
    count_B = c["lengths"] + alive_B
    recent_BxL = jnp.where(alive_B[:, None],
                           jnp.concatenate([c["recent"][:, 1:], token_B[:, None]], axis=1),
                           c["recent"])
    end_B = _suffix_match(recent_BxL, count_B, config.stop_sequences)
    if config.stop_patterns:
      end_B |= _pattern_match(recent_BxL, count_B, config.stop_patterns)
    if config.eos_ids:
      end_B |= jnp.isin(token_B, jnp.asarray(config.eos_ids, jnp.int32))
    if trie is not None and config.max_thought_tokens:
      # Under a budget a thinking row ends only through an allowed string: a stop text or EOS
      # written inside the thought (a tiny model's `</action>`) would end the turn with no action.
      end_B &= node_B != _WAITING
    if trie is not None:
      node_B = _advance(trie, node_B, token_B)
      end_B |= (node_B >= 0) & jnp.asarray(trie.terminal)[jnp.maximum(node_B, 0)]
      if config.constraint_trigger:
        triggered_B = (node_B == _WAITING) & _suffix_match(
            recent_BxL, count_B, [config.constraint_trigger])
        node_B = jnp.where(triggered_B, jnp.asarray(trie.roots, jnp.int32), node_B)
    end_B &= alive_B
    # Feed every token emitted this step, the final ones too, so that the cache ends up
    # holding the whole response and the next turn appends only new observation tokens.
    logits_Bx1xV, cache = model(token_B[:, None], attention_mask=alive_B[:, None].astype(
        jnp.int32), cache=c["cache"], layer_params=layer_params)
    return dict(
        step=c["step"] + 1,
        logits=logits_Bx1xV[:, 0].astype(jnp.float32),
        cache=cache,
        alive=alive_B & ~end_B,
        stopped=c["stopped"] | end_B,
        lengths=count_B,
        tokens=jax.lax.dynamic_update_slice(c["tokens"], token_B[:, None], (0, c["step"])),
        logprobs=jax.lax.dynamic_update_slice(c["logprobs"], logp_B[:, None], (0, c["step"])),
        recent=recent_BxL,
        node=node_B,
    )

  carry = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(tokens=carry["tokens"], logprobs=carry["logprobs"],
                        lengths=carry["lengths"], stopped=carry["stopped"],
                        cache=carry["cache"])


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "config", "fresh"),
                        donate_argnames=("cache",))


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: Any,
    chunk_BxP: jax.Array,
    chunk_lengths_B: jax.Array,
    active_B: jax.Array,
    rng: jax.Array,
    *,
    config: SamplingConfig,
    trie: TokenTrie | None = None,
    fresh: bool = False,
) -> GenerateOutput:
  """Appends a chunk per row to `cache`, then samples up to `config.max_new_tokens` per row.

  Jitted; `graphdef` and `config` are static, so bucket the shapes (`bucket_length`) to bound
  the number of compiles. The input cache is donated: use the returned one.

  Args:
    graphdef: from `nnx.split(model)`.
    state: from `nnx.split(model)`; may be sharded over a Mesh.
    cache: a `models.KVCache`; row b's new chunk is written at slots `cache.lengths[b] + j`.
      It needs `max_len >= lengths[b] + P` and `>= lengths[b] + chunk_lengths[b] + N + 1` for
      every row (slots past a row's end are written with padding and must exist).
    chunk_BxP: right-padded new tokens per row (prompt, new observation or rebuilt window).
    chunk_lengths_B: real tokens per row in the chunk; >= 1 for every active row, since the
      first sampled token is predicted from the chunk's last token.
    active_B: rows to extend and sample; inactive rows keep their cache and emit nothing.
    rng: a `jax.random` key for the batch, or [B, 2] keys, one per row (unused by greedy decoding).
    config: the static decoding settings.
    trie: optional per-row constraints from `build_token_trie` (B roots).
    fresh: the cache is empty (every `cache.lengths` is 0), as for a new prompt: the chunk is
      then pre-filled as without a cache, attending only to itself (`hidden_states`).

  Returns:
    A `GenerateOutput`; `cache.lengths` grows by chunk_lengths + lengths on active rows.
  """
  if trie is not None and config.max_thought_tokens and np.any(
      (np.asarray(trie.roots) >= 0) & (np.asarray(trie.budget_roots) < 0)):
    raise ValueError("config.max_thought_tokens is set but the trie has no budget roots: build it "
                     "with build_token_trie(..., trigger=config.constraint_trigger)")
  return _generate_jit(graphdef, state, cache, chunk_BxP, chunk_lengths_B, active_B, rng,
                       trie, config=config, fresh=fresh)


def compile_count() -> int:
  """How many specialisations of the jitted generate exist in this process (for tests)."""
  return _generate_jit._cache_size()  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# Host side: multi-turn episodes.


class SampleBatch(NamedTuple):
  """Host (numpy) results of one turn, indexed by episode.

  tokens: [E, N] int32; logprobs: [E, N] float32; lengths: [E] int32; stopped: [E] bool
  (see `GenerateOutput`). appended: [E] int32, the context tokens that this turn had to encode
  (the rest were reused from the cache); 0 for finished episodes.
  """

  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  appended: np.ndarray


def windowed_context(prefix: Sequence[int], turns: Sequence[Sequence[int]],
                     history_turns: int | None) -> list[int]:
  """The token context `prefix + turns[-history_turns:]` (all turns when None).

  A turn's tokens are whatever the prompt puts in it (e.g. observation + response); the last
  element of `turns` is usually the current observation alone.
  """
  if history_turns is not None and history_turns < 1:
    raise ValueError(f"history_turns must be >= 1 or None, got {history_turns}")
  kept = turns if history_turns is None else turns[-history_turns:]
  out = list(prefix)
  for turn in kept:
    out.extend(turn)
  return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


class EpisodeCache:
  """The KV cache of E episodes decoded in lockstep, kept between their turns.

  Each turn, the caller passes every episode's full context (token ids: prompt + history window
  + new observation) or None once the episode is finished. Per row, the cache keeps the longest
  prefix it shares with the new context and encodes only the rest in one chunked forward, then
  samples the response (which joins the cached tokens). With a growing history that is just the
  new observation; when the history window slides, the shared prefix ends at the first dropped
  turn and the row is re-encoded from there, exactly as a fresh encoding of the window would be
  (positions restart where the prefix ends). Finished episodes release their row; when few are
  left, the live rows are gathered into a smaller batch so they stop paying for the others.

  Build contexts at the token level (concatenate the generated ids, never re-tokenise the
  response text): a re-tokenised response that differs from the sampled ids still gives correct
  results, but costs a re-encoding from the first difference.
  """

  def __init__(
      self,
      model: nnx.Module,
      num_episodes: int,
      *,
      min_len: int = 64,
      min_chunk: int = 16,
      min_batch: int = 1,
      min_trie_shape: tuple[int, int] = (1, 1),
      compact: bool = True,
      reuse: bool = True,
      cache_dtype: Any = None,
      batch_sharding: jax.sharding.Sharding | None = None,
  ):
    """Creates an empty cache.

    Args:
      model: the `models.Transformer` to sample from (its params are read, never changed).
      num_episodes: E, the episodes driven in lockstep.
      min_len: the smallest cache length bucket; the cache grows by buckets as contexts grow.
      min_chunk: the smallest chunk-width bucket; a larger one trades padded prefill work for
        fewer compiled shapes (a turn's observation and the first prompt share one width).
      min_batch: the smallest batch to compact to (the batch-sharding size under a Mesh).
      min_trie_shape: the smallest (nodes, children) of its constraint tries: each trie shape
        compiles the decode loop again, so a floor at the largest one a run builds means one.
      compact: gather live episodes into a smaller power-of-two batch when they fit one.
      reuse: False re-encodes every context from scratch (the no-reuse benchmark baseline).
      cache_dtype: KV cache dtype (default: the model's compute dtype).
      batch_sharding: optional sharding for `[B, ...]` host inputs and the cache's batch axis.
    """
    if num_episodes < 1:
      raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    self._graphdef, self._state = nnx.split(model)
    self._model_config = model.config
    self._vocab = model.config.vocab_size
    self._cache_dtype = cache_dtype
    self._min_len = min_len
    self._min_chunk = min_chunk
    self._min_batch = max(1, min_batch)
    self._compact = compact
    self._reuse = reuse
    self._sharding = batch_sharding
    batch = max(_next_pow2(num_episodes), self._min_batch) if compact else num_episodes
    self._row_of = np.arange(num_episodes, dtype=np.int64)
    self._cached: list[list[int]] = [[] for _ in range(batch)]
    self._cache = self._new_cache(batch, bucket_length(1, min_len))
    # (nodes, width) of the largest trie built so far: later tries pad to it. Each turn's admissible actions
    # give another trie size, and each size was another compile of `generate` (dozens in one ALFWorld rollout).
    self._trie_shape = tuple(min_trie_shape)

  @property
  def batch_size(self) -> int:
    return len(self._cached)

  @property
  def max_len(self) -> int:
    return self._cache.max_len

  def _new_cache(self, batch: int, max_len: int) -> Any:
    # The cache is left where jit puts it: after the first call it keeps the layout XLA chose
    # for the sharded computation.
    return models.init_cache(self._model_config, batch, max_len, dtype=self._cache_dtype)

  def _place(self, array_BxX: np.ndarray) -> jax.Array:
    """A host `[B, ...]` input on device, batch-sharded when a sharding was given."""
    if self._sharding is None:
      return jnp.asarray(array_BxX)
    return jax.device_put(array_BxX, self._sharding)

  def _take_rows(self, rows: np.ndarray) -> None:
    """Keeps cache rows `rows` (in that order), dropping the others."""
    idx = jnp.asarray(rows)
    cache = self._cache.map_kv(lambda kv_BxTxKxH: jnp.take(kv_BxTxKxH, idx, axis=0))
    self._cache = cache.replace(lengths=jnp.take(cache.lengths, idx, axis=0))

  def _maybe_compact(self, live: np.ndarray) -> None:
    target = max(_next_pow2(len(live)), self._min_batch)
    if not self._compact or target >= self.batch_size:
      return
    old_rows = self._row_of[live]
    taken = set(old_rows.tolist())
    free = [r for r in range(self.batch_size) if r not in taken]
    rows = np.concatenate([old_rows, np.asarray(free[: target - len(live)], np.int64)])
    self._take_rows(rows)
    self._cached = [self._cached[r] if i < len(live) else [] for i, r in enumerate(rows)]
    self._row_of[:] = -1
    self._row_of[live] = np.arange(len(live))

  def _grow(self, need: int) -> None:
    new_len = bucket_length(need, self._min_len)
    if new_len <= self.max_len:
      return
    pad = ((0, 0), (0, new_len - self.max_len), (0, 0), (0, 0))
    self._cache = self._cache.map_kv(lambda kv_BxTxKxH: jnp.pad(kv_BxTxKxH, pad))

  def generate(
      self,
      contexts: Sequence[Sequence[int] | None],
      rng: jax.Array,
      config: SamplingConfig,
      allowed: Sequence[Sequence[Sequence[int]] | None] | None = None,
  ) -> SampleBatch:
    """Samples one response per live episode.

    Args:
      contexts: per episode, the full context token ids for this turn, or None once the
        episode is finished (its row is released and it must stay None afterwards).
      rng: a `jax.random` key for this turn, or [E, 2] keys, one per episode: an episode's
        response then depends on its own key only, not on which rows it shares the batch with.
      config: decoding settings.
      allowed: optional, per episode, allowed token sequences (see `build_token_trie`).

    Returns:
      A `SampleBatch` indexed by episode.
    """
    num_episodes = len(self._row_of)
    if len(contexts) != num_episodes:
      raise ValueError(f"contexts has {len(contexts)} entries, expected {num_episodes}")
    if allowed is not None and len(allowed) != num_episodes:
      raise ValueError(f"allowed has {len(allowed)} entries, expected {num_episodes}")
    for e, ctx in enumerate(contexts):
      if ctx is None:
        if self._row_of[e] >= 0:
          self._cached[self._row_of[e]] = []
          self._row_of[e] = -1
      elif self._row_of[e] < 0:
        raise ValueError(f"contexts[{e}] is given but episode {e} was already finished")
      elif len(ctx) == 0:
        raise ValueError(f"contexts[{e}] is empty; a live episode needs >= 1 context token")
    live = np.asarray([e for e, c in enumerate(contexts) if c is not None], np.int64)
    out = SampleBatch(
        tokens=np.full((num_episodes, config.max_new_tokens), config.pad_id, np.int32),
        logprobs=np.zeros((num_episodes, config.max_new_tokens), np.float32),
        lengths=np.zeros((num_episodes,), np.int32),
        stopped=np.zeros((num_episodes,), bool),
        appended=np.zeros((num_episodes,), np.int32))
    if len(live) == 0:
      return out
    self._maybe_compact(live)

    batch = self.batch_size
    keep = np.zeros((batch,), np.int64)    # reused cached tokens per row
    chunks: list[list[int]] = [[] for _ in range(batch)]
    active = np.zeros((batch,), bool)
    for e in live:
      row, ctx = self._row_of[e], list(contexts[e])
      # At least the last context token is re-encoded: its logits give the first sample.
      shared = _common_prefix(self._cached[row], ctx) if self._reuse else 0
      keep[row] = min(shared, len(ctx) - 1)
      chunks[row] = ctx[keep[row]:]
      active[row] = True
    chunk_lengths = np.asarray([len(c) for c in chunks], np.int32)
    width = bucket_length(int(chunk_lengths.max()), self._min_chunk)
    chunk = np.full((batch, width), config.pad_id, np.int32)
    for row, toks in enumerate(chunks):
      chunk[row, : len(toks)] = toks
    self._grow(int(np.max(keep + np.maximum(width, chunk_lengths + config.max_new_tokens + 1))))

    trie = None
    if allowed is not None:
      per_row: list[Any] = [None] * batch
      for e in live:
        per_row[self._row_of[e]] = allowed[e]
      longest = max((len(s) for seqs in per_row if seqs for s in seqs), default=0)
      if longest > config.max_new_tokens:
        raise ValueError(f"allowed has a sequence of {longest} tokens, longer than "
                         f"max_new_tokens={config.max_new_tokens}")
      trie = build_token_trie(
          per_row, self._vocab, trigger=config.constraint_trigger if config.max_thought_tokens else (),
          min_nodes=self._trie_shape[0], min_width=self._trie_shape[1])
      self._trie_shape = trie.child_tokens.shape

    # Truncating a row to its shared prefix is exact: slot i only ever depended on tokens <= i.
    self._cache = self._cache.replace(lengths=self._place(keep.astype(np.int32)))
    # Rows that are not active hold no episode (finished rows are released), so with nothing
    # kept every row starts empty: the cheaper fresh prefill.
    if np.ndim(rng) == 2:  # Per-episode keys -> per-row keys (free rows draw from a zero key, unused).
      episode_keys = np.asarray(rng)
      if len(episode_keys) != num_episodes:
        raise ValueError(f"rng holds {len(episode_keys)} keys for {num_episodes} episodes")
      row_keys = np.zeros((batch, episode_keys.shape[1]), episode_keys.dtype)
      row_keys[self._row_of[live]] = episode_keys[live]
      rng = self._place(row_keys)
    result = generate(self._graphdef, self._state, self._cache, self._place(chunk),
                      self._place(chunk_lengths), self._place(active), rng, config=config,
                      trie=trie, fresh=not keep.any())
    self._cache = result.cache
    tokens, logprobs, lengths, stopped, cache_lengths = jax.device_get(
        (result.tokens, result.logprobs, result.lengths, result.stopped, result.cache.lengths))

    for e in live:
      row = self._row_of[e]
      n = int(lengths[row])
      self._cached[row] = list(contexts[e]) + tokens[row, :n].tolist()
      if cache_lengths[row] != len(self._cached[row]):
        raise ValueError(f"KV cache row {row} holds {cache_lengths[row]} tokens after generate, "
                         f"expected {len(self._cached[row])}: the model broke the cache contract")
      out.tokens[e], out.logprobs[e] = tokens[row], logprobs[row]
      out.lengths[e], out.stopped[e] = n, stopped[row]
      out.appended[e] = chunk_lengths[row]
    return out


def sample(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    config: SamplingConfig,
    allowed: Sequence[Sequence[Sequence[int]] | None] | None = None,
    **cache_kwargs,
) -> SampleBatch:
  """One-shot sampling of one response per prompt (a fresh `EpisodeCache`, bucketed shapes)."""
  episodes = EpisodeCache(model, len(prompts), **cache_kwargs)
  return episodes.generate(prompts, rng, config, allowed=allowed)
