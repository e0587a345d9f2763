"""A decoder-only transformer (Qwen3 / Qwen2 / Llama) in Flax NNX.

Layer parameters are stacked along a leading `layers` axis and the blocks run under one
`jax.lax.scan`: compile time stays flat in depth (Qwen3-8B has 36 layers). The cached pass
(prefill and decode steps of the sampler) unrolls the layers instead, over a KV cache with one
`[B, T, K, H]` buffer per layer, so each layer scatters its new keys in place and attention
reads the buffer as stored (no per-step copy of a layer's slice out of a stacked cache).
The block itself is a pure function of arrays (`_block`); the modules only own parameters.

Shape letters: B batch, S chunk length, T cache slots (or S without a cache), D hidden,
F intermediate, N query heads, K kv heads, G = N / K query heads per kv head, H head_dim,
V vocab, L layers.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sage_opd_jax.models import sharding
from sage_opd_jax.models.cache import KVCache
from sage_opd_jax.models.config import ModelConfig

_INIT_STD = 0.02
# Masked scores use a finite floor rather than -inf so a query with no visible key (a padding
# row) gets a uniform softmax instead of NaNs that would poison gradients.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype: jnp.dtype,
           logical_axes: tuple[str | None, ...], init: str = "normal") -> nnx.Param:
  """A parameter carrying its logical axis names (see sharding.py) as `logical_axes`."""
  if init == "normal":
    value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value.astype(dtype), logical_axes=logical_axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, statistics in float32 (as HF does); returns x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * weight.astype(x.dtype)


def rope_cos_sin(positions_BxS: jax.Array, head_dim: int,
                 theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B, S, H/2] in float32 for the half-split (rotate_half) RoPE."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BxSxH2 = positions_BxS.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_BxSxH2), jnp.sin(angles_BxSxH2)


def apply_rope(x_BxSxNxH: jax.Array, cos_BxSxH2: jax.Array, sin_BxSxH2: jax.Array) -> jax.Array:
  """Rotates the two halves of head_dim (HF's rotate_half convention), in float32.

  Written as x * [cos, cos] + swap_halves(x) * [-sin, sin]: swapping the halves is a reverse
  over an axis of size 2, so the rotation is one elementwise fusion in both passes, where a
  split and a concatenate of x cost a copy each (forward and backward).
  """
  B, S, N, H = x_BxSxNxH.shape
  x = x_BxSxNxH.astype(jnp.float32)
  swapped = jnp.flip(x.reshape(B, S, N, 2, H // 2), axis=3).reshape(B, S, N, H)
  cos_BxSx1xH = jnp.concatenate([cos_BxSxH2, cos_BxSxH2], axis=-1)[:, :, None, :]
  sin_BxSx1xH = jnp.concatenate([-sin_BxSxH2, sin_BxSxH2], axis=-1)[:, :, None, :]
  return (x * cos_BxSx1xH + swapped * sin_BxSx1xH).astype(x_BxSxNxH.dtype)


def _attend_one(q_Bx1xKxGxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                allowed_Bx1xT: jax.Array) -> jax.Array:
  """`_attend` for a single query per row (the decode step); returns [B, 1, K, G, H].

  Batching the dots over (b, k) makes XLA:CPU transpose every layer's cache slice to
  [B, K, T, H] on each step, which dominated the step at long caches. Here the cache is read
  in its stored layout as a [B, T, K*H] matrix against a block-diagonal query [B, K*H, K*G]
  (zero where the kv head differs), and the K diagonal blocks of the output are kept: K times
  the score FLOPs, which are negligible next to reading the cache once.
  """
  B, _, K, G, H = q_Bx1xKxGxH.shape
  T = k_BxTxKxH.shape[1]
  eye_KxK = jnp.eye(K, dtype=q_Bx1xKxGxH.dtype)
  q_BxKHxKG = jnp.einsum("bkgh,kj->bkhjg", q_Bx1xKxGxH[:, 0], eye_KxK).reshape(B, K * H, K * G)
  scores_BxTxKG = jnp.einsum("btx,bxy->bty", k_BxTxKxH.reshape(B, T, K * H), q_BxKHxKG,
                             preferred_element_type=jnp.float32)
  scores_BxTxKG = jnp.where(allowed_Bx1xT[:, 0, :, None], scores_BxTxKG, _MASK_VALUE)
  probs_BxTxKG = jax.nn.softmax(scores_BxTxKG, axis=1).astype(q_Bx1xKxGxH.dtype)
  out_BxKGxKH = jnp.einsum("bty,btx->byx", probs_BxTxKG, v_BxTxKxH.reshape(B, T, K * H))
  # Diagonal blocks by static slices (not a product with the identity, so no 0 * x ever
  # enters), stacked kv-head-major: the [B, K, G, H] result is the o_proj input as stored, so
  # XLA does not transpose o_proj's weight at every step to match a [G, H, K] layout.
  out_BxKxGxH = jnp.stack([out_BxKGxKH[:, k * G:(k + 1) * G, k * H:(k + 1) * H]
                           for k in range(K)], axis=1)
  return out_BxKxGxH[:, None]


def _attend(q_BxKxGxSxH: jax.Array, k_BxKxTxH: jax.Array, v_BxKxTxH: jax.Array,
            allowed_BxSxT: jax.Array) -> jax.Array:
  """Masked softmax attention, heads-major; scores and softmax in float32; [B, K, G, S, H].

  Heads-major operands put the dots' batch axes (b, k) first and their contracting axis
  last, which XLA:CPU runs without transposing the [.., S, T] scores: 1.4-2.2x faster than
  the same einsums over [B, S, K, G, H] at S = 256-1024 (docs/benchmarks.md).
  """
  scores_BxKxGxSxT = jnp.einsum("bkgsh,bkth->bkgst", q_BxKxGxSxH, k_BxKxTxH,
                                preferred_element_type=jnp.float32)
  scores_BxKxGxSxT = jnp.where(allowed_BxSxT[:, None, None], scores_BxKxGxSxT, _MASK_VALUE)
  probs_BxKxGxSxT = jax.nn.softmax(scores_BxKxGxSxT, axis=-1).astype(q_BxKxGxSxH.dtype)
  return jnp.einsum("bkgst,bkth->bkgsh", probs_BxKxGxSxT, v_BxKxTxH)


class CausalMask(NamedTuple):
  """Which keys the queries of causal self-attention may read, kept per token instead of as [B, S, S].

  Query i reads key j when j <= i, key j is real (`key_valid_BxS`; None: every key) and, in a
  row that packs segments (`segments_BxS`, `reach_BxS`; None: one sequence), `packed_allowed`
  lets it. At the paper's 40,960-token rows the [B, S, S] mask is 1.7 GB a row; attention derives
  each block's [B, q, k] mask from these [B, S] vectors instead (`block`).
  """
  key_valid_BxS: jax.Array | None = None
  segments_BxS: jax.Array | None = None
  reach_BxS: jax.Array | None = None

  def block(self, q_start: Any, num_q: int, k_start: Any, num_k: int) -> jax.Array:
    """[B, num_q, num_k] bool (B = 1 with no per-row vector): queries [q_start, +num_q), keys [k_start, +num_k).

    The starts may be traced; the vectors must cover both ranges (`pad`), as a dynamic slice
    past the end would be moved back, not cut.
    """
    q_idx = q_start + jnp.arange(num_q, dtype=jnp.int32)
    k_idx = k_start + jnp.arange(num_k, dtype=jnp.int32)
    allowed_BxQxK = (k_idx[None, :] <= q_idx[:, None])[None]
    rows = lambda x, start, size: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    if self.key_valid_BxS is not None:
      allowed_BxQxK = allowed_BxQxK & rows(self.key_valid_BxS, k_start, num_k)[:, None, :]
    if self.segments_BxS is not None:
      allowed_BxQxK = allowed_BxQxK & _packed(
          rows(self.segments_BxS, q_start, num_q), rows(self.reach_BxS, q_start, num_q),
          rows(self.segments_BxS, k_start, num_k), k_idx)
    return allowed_BxQxK

  def pad(self, extra: int) -> CausalMask:
    """The mask of `extra` more positions at the end: padding keys, which no real query reads."""
    pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, extra)))
    return CausalMask(*(pad(x) for x in self))


def _allowed_block(allowed: jax.Array | CausalMask, q_start: Any, num_q: int, k_start: Any,
                   num_k: int) -> jax.Array:
  """The [B, num_q, num_k] mask of one block of queries and keys, from a mask array or a CausalMask."""
  if isinstance(allowed, CausalMask):
    return allowed.block(q_start, num_q, k_start, num_k)
  return jax.lax.dynamic_slice(allowed, (0, q_start, k_start), (allowed.shape[0], num_q, num_k))


# Query block of causal attention when `attention_chunk` is 0. Block i reads keys [0, end of
# block i) only, so most of the masked upper triangle is never computed: at S = 1024 the
# attention ran 3.9x faster forward and 2.6x with its backward than one S x S block, and 128
# was as fast as 64 or 256 (2-core CPU, docs/benchmarks.md).
_CAUSAL_BLOCK = 128
# With `attention_chunk`, causal attention over at most this many positions stays a Python loop of
# rematerialised blocks: however XLA orders them, all blocks' float32 scores are at most 2 MiB a head
# and row, and the loop's backward recomputes each block once, where `_causal_blockwise` recomputes
# each score tile twice (its grad step ran 1.3-1.5x slower at S = 1024, chunk 256, on a 2-core CPU).
_UNROLLED_MAX_LEN = 1024


def _causal_blockwise(q_BxKxGxSxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array,
                      allowed: jax.Array | CausalMask, block: int) -> jax.Array:
  """Causal attention with one query block live at a time (flash-style); returns [B, K, G, S, H].

  `lax.map` over query blocks, each an online softmax (`lax.scan`) over the key blocks, where
  `lax.cond` skips the blocks above the diagonal. Each query block is rematerialised in the
  backward pass and each key block within it too, so the float32 scores are one [B, K, G,
  block, block] tile and the saved residuals per query block are the running max, sum and
  output per key block. A Python loop of many query blocks leaves their order to XLA, which
  kept many blocks' [B, K, G, block, T] scores live at once (over 1,000 GiB a device for every
  paper student's update at 40,960 tokens, docs/reproducing.md).
  """
  B, K, G, S, H = q_BxKxGxSxH.shape
  dt = q_BxKxGxSxH.dtype
  n = -(-S // block)
  pad = n * block - S
  if pad:
    pad_s = lambda x, axis: jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
    q_BxKxGxSxH, k_BxKxSxH, v_BxKxSxH = pad_s(q_BxKxGxSxH, 3), pad_s(k_BxKxSxH, 2), pad_s(v_BxKxSxH, 2)
    allowed = allowed.pad(pad) if isinstance(allowed, CausalMask) else pad_s(pad_s(allowed, 1), 2)
  q_nxBxKxGxCxH = jnp.moveaxis(q_BxKxGxSxH.reshape(B, K, G, n, block, H), 3, 0)
  k_nxBxKxCxH = jnp.moveaxis(k_BxKxSxH.reshape(B, K, n, block, H), 2, 0)
  v_nxBxKxCxH = jnp.moveaxis(v_BxKxSxH.reshape(B, K, n, block, H), 2, 0)

  def query_block(i_and_q):
    i, q_BxKxGxCxH = i_and_q

    def key_block(carry, j_k_v):
      j, k_BxKxCxH, v_BxKxCxH = j_k_v

      def visit(carry):
        max_BxKxGxC, sum_BxKxGxC, out_BxKxGxCxH = carry
        scores_BxKxGxCxC = jnp.einsum("bkgqh,bkch->bkgqc", q_BxKxGxCxH, k_BxKxCxH,
                                      preferred_element_type=jnp.float32)
        allowed_BxCxC = _allowed_block(allowed, i * block, block, j * block, block)
        scores_BxKxGxCxC = jnp.where(allowed_BxCxC[:, None, None], scores_BxKxGxCxC, _MASK_VALUE)
        new_max_BxKxGxC = jnp.maximum(max_BxKxGxC, scores_BxKxGxCxC.max(axis=-1))
        # The running sum and output were taken against the old max: rescale them to the new one.
        rescale_BxKxGxC = jnp.exp(max_BxKxGxC - new_max_BxKxGxC)
        probs_BxKxGxCxC = jnp.exp(scores_BxKxGxCxC - new_max_BxKxGxC[..., None])
        new_sum_BxKxGxC = sum_BxKxGxC * rescale_BxKxGxC + probs_BxKxGxCxC.sum(axis=-1)
        new_out_BxKxGxCxH = out_BxKxGxCxH * rescale_BxKxGxC[..., None] + jnp.einsum(
            "bkgqc,bkch->bkgqh", probs_BxKxGxCxC.astype(dt), v_BxKxCxH, preferred_element_type=jnp.float32)
        return new_max_BxKxGxC, new_sum_BxKxGxC, new_out_BxKxGxCxH

      # Key blocks past the query block's last query are masked for all of its queries.
      return jax.lax.cond(j <= i, visit, lambda carry: carry, carry), None

    # The running max starts at the mask value, not -inf: a query whose keys so far are all masked
    # then sums them with weight 1, and the first allowed key's max rescales them by exp(-huge) = 0.
    init = (jnp.full((B, K, G, block), _MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, block), jnp.float32),
            jnp.zeros((B, K, G, block, H), jnp.float32))
    # prevent_cse=False is safe under scan and lets XLA share the recomputation.
    (_, sum_BxKxGxC, out_BxKxGxCxH), _ = jax.lax.scan(
        jax.checkpoint(key_block, prevent_cse=False), init,
        (jnp.arange(n, dtype=jnp.int32), k_nxBxKxCxH, v_nxBxKxCxH))
    return (out_BxKxGxCxH / sum_BxKxGxC[..., None]).astype(dt)

  out_nxBxKxGxCxH = jax.lax.map(jax.checkpoint(query_block, prevent_cse=False),
                                (jnp.arange(n, dtype=jnp.int32), q_nxBxKxGxCxH))
  return jnp.moveaxis(out_nxBxKxGxCxH, 0, 3).reshape(B, K, G, n * block, H)[:, :, :, :S]


def attention(q_BxSxKxGxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
              allowed: jax.Array | CausalMask, chunk: int = 0, causal: bool = False) -> jax.Array:
  """GQA attention of S queries over T keys; returns [B, S, K, G, H].

  Args:
    q_BxSxKxGxH: queries, already scaled; query head k * G + g reads kv head k.
    k_BxTxKxH, v_BxTxKxH: keys and values.
    allowed: which keys each query may read: [B, S, T] bool, or a `CausalMask` (with `causal`).
    chunk: if > 0, queries go in blocks of `chunk`, each rematerialised in the backward pass,
      so the float32 score buffer is [B, K, G, chunk, T] and the saved residuals stay O(S).
      Causal attention over more than `_UNROLLED_MAX_LEN` positions runs `_causal_blockwise`:
      one [B, K, G, chunk, chunk] score tile at a time.
    causal: the keys are the queries' own positions (T == S) and `allowed` is at most
      causal. Query blocks (of `chunk`, else `_CAUSAL_BLOCK`) then read only the keys up to
      their last query; the keys they skip are masked for all of their queries, whose
      softmax is unchanged. A query with no allowed key at all (a row of pure padding) gets
      a uniform average over the keys it visited instead of all T: a padding output either way.
  """
  B, S, K, G, H = q_BxSxKxGxH.shape
  if isinstance(allowed, CausalMask) and not causal:
    raise ValueError("attention: a CausalMask needs causal=True")
  if S == 1:
    return _attend_one(q_BxSxKxGxH, k_BxTxKxH, v_BxTxKxH,
                       _allowed_block(allowed, 0, 1, 0, k_BxTxKxH.shape[1]))
  if causal and k_BxTxKxH.shape[1] != S:
    raise ValueError(f"attention: causal needs keys at the queries' positions, got S={S} "
                     f"queries and T={k_BxTxKxH.shape[1]} keys")
  q_BxKxGxSxH = q_BxSxKxGxH.transpose(0, 2, 3, 1, 4)
  k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3)
  v_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3)
  if causal and chunk > 0 and S > _UNROLLED_MAX_LEN:
    out_BxKxGxSxH = _causal_blockwise(q_BxKxGxSxH, k_BxKxTxH, v_BxKxTxH, allowed, chunk)
  elif causal:
    # A Python loop: each block has its own key length, so the blocks cannot share a lax.map.
    block = chunk or _CAUSAL_BLOCK
    attend = jax.checkpoint(_attend) if chunk > 0 else _attend
    out_BxKxGxSxH = jnp.concatenate([
        attend(q_BxKxGxSxH[:, :, :, i:i + block], k_BxKxTxH[:, :, :i + block], v_BxKxTxH[:, :, :i + block],
               _allowed_block(allowed, i, min(block, S - i), 0, min(i + block, S)))
        for i in range(0, S, block)], axis=3)
  elif chunk <= 0 or S <= chunk:
    out_BxKxGxSxH = _attend(q_BxKxGxSxH, k_BxKxTxH, v_BxKxTxH, allowed)
  else:
    n = -(-S // chunk)
    pad = n * chunk - S
    q = jnp.pad(q_BxKxGxSxH, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    allowed = jnp.pad(allowed, ((0, 0), (0, pad), (0, 0)))
    q_nxBxKxGxCxH = jnp.moveaxis(q.reshape(B, K, G, n, chunk, H), 3, 0)
    allowed_nxBxCxT = allowed.reshape(B, n, chunk, -1).swapaxes(0, 1)
    out_nxBxKxGxCxH = jax.lax.map(lambda qa: jax.checkpoint(_attend)(qa[0], k_BxKxTxH, v_BxKxTxH, qa[1]),
                                  (q_nxBxKxGxCxH, allowed_nxBxCxT))
    out_BxKxGxSxH = jnp.moveaxis(out_nxBxKxGxCxH, 0, 3).reshape(B, K, G, n * chunk, H)[:, :, :, :S]
  return out_BxKxGxSxH.transpose(0, 3, 1, 2, 4)


class DecoderLayers(nnx.Module):
  """All L decoder blocks' parameters, stacked on a leading `layers` axis."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    L, D, F, N, K, H = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                        c.num_kv_heads, c.head_dim)
    pd = c.jnp_param_dtype
    self.input_norm = _param(rngs, (L, D), pd, ("layers", "norm"), "ones")
    self.q_proj = _param(rngs, (L, D, N, H), pd, ("layers", "embed", "heads", "head_dim"))
    self.k_proj = _param(rngs, (L, D, K, H), pd, ("layers", "embed", "kv_heads", "head_dim"))
    self.v_proj = _param(rngs, (L, D, K, H), pd, ("layers", "embed", "kv_heads", "head_dim"))
    self.o_proj = _param(rngs, (L, N, H, D), pd, ("layers", "heads", "head_dim", "embed"))
    if c.qkv_bias:
      self.q_bias = _param(rngs, (L, N, H), pd, ("layers", "heads", "head_dim"), "zeros")
      self.k_bias = _param(rngs, (L, K, H), pd, ("layers", "kv_heads", "head_dim"), "zeros")
      self.v_bias = _param(rngs, (L, K, H), pd, ("layers", "kv_heads", "head_dim"), "zeros")
    if c.qk_norm:
      self.q_norm = _param(rngs, (L, H), pd, ("layers", "head_dim"), "ones")
      self.k_norm = _param(rngs, (L, H), pd, ("layers", "head_dim"), "ones")
    self.post_attn_norm = _param(rngs, (L, D), pd, ("layers", "norm"), "ones")
    self.gate_proj = _param(rngs, (L, D, F), pd, ("layers", "embed", "mlp"))
    self.up_proj = _param(rngs, (L, D, F), pd, ("layers", "embed", "mlp"))
    self.down_proj = _param(rngs, (L, F, D), pd, ("layers", "mlp", "embed"))

  def stacked(self) -> dict[str, jax.Array]:
    """The raw stacked parameter arrays, by name."""
    return {name: value[...] for name, value in vars(self).items()
            if isinstance(value, nnx.Param)}

  def unstacked(self) -> tuple[dict[str, jax.Array], ...]:
    """Each layer's parameters, by name (static slices of the stacked arrays).

    For the cached forward pass (see `Transformer.hidden_states`): under jit the slices are
    materialised where they are taken, so a decode loop takes them once, before the loop,
    instead of copying every layer's weights out of the stacked arrays at every step.
    """
    stacked = self.stacked()
    return tuple({name: value[i] for name, value in stacked.items()}
                 for i in range(self.input_norm.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x_BxSxI: jax.Array, w: jax.Array, out_dtype: Any = None, transposed: bool = False) -> jax.Array:
  """x @ w over x's last axis and w's first ([I, *O]), or w's last when `transposed` ([O, I]).

  The product of every projection and the LM head; returns [B, S, *O]. Its backward is two
  2-D dots of the operands as stored. Left to autodiff, XLA:CPU wrote the products' output
  gradients a second time, transposed to [O, B * S], for the weights' dots (27m train step:
  docs/benchmarks.md).
  """
  B, S, I = x_BxSxI.shape
  x_NxI = x_BxSxI.reshape(B * S, I)
  if transposed:
    return jnp.einsum("ni,oi->no", x_NxI, w, preferred_element_type=out_dtype).reshape(B, S, -1)
  y_NxO = jnp.matmul(x_NxI, w.reshape(I, -1), preferred_element_type=out_dtype)
  return y_NxO.reshape(B, S, *w.shape[1:])


def _dense_fwd(x_BxSxI, w, out_dtype, transposed):
  return dense(x_BxSxI, w, out_dtype, transposed), (x_BxSxI, w)


def _dense_bwd(out_dtype, transposed, residuals, g_BxSxO):
  del out_dtype
  x_BxSxI, w = residuals
  B, S, I = x_BxSxI.shape
  x_NxI = x_BxSxI.reshape(B * S, I)
  g_NxO = g_BxSxO.reshape(B * S, -1).astype(x_BxSxI.dtype)
  if transposed:
    return (g_NxO @ w).reshape(B, S, I), jnp.einsum("no,ni->oi", g_NxO, x_NxI)
  w_IxO = w.reshape(I, -1)
  dw_IxO = jnp.einsum("ni,no->io", x_NxI, g_NxO)
  return (g_NxO @ w_IxO.T).reshape(B, S, I), dw_IxO.reshape(w.shape)


dense.defvjp(_dense_fwd, _dense_bwd)


def _fuse_projections(config: ModelConfig, p: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """One layer's params with q/k/v and gate/up joined, for one matmul each in `_block`.

  Fewer, wider dots run faster on CPU (measured in docs/benchmarks.md), and the backward sums
  one input gradient instead of three. The parameters stay separate (HF's layout, the
  sharding rules); the join is a copy of the weights per call, cheap next to a training
  chunk's matmuls but not next to a decode step's, so the cached path does not use it. It is
  made inside the layer scan, one layer at a time (and remade by remat in the backward pass):
  joined for all layers at once, the copy and its gradient accumulator each held the device's
  share of every layer's projections (1.1 GiB a device more in Qwen3-4B's update).
  q/k/v join per kv head as [D, K, G + 2, H] (G query heads, then k, then v) and gate/up
  as [D, 2, F], so the kv-head and MLP axes keep their tensor sharding.
  """
  c = config
  D, K, G, H = c.hidden_size, c.num_kv_heads, c.num_groups, c.head_dim
  fused = {k: v for k, v in p.items()
           if k not in ("q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias",
                        "gate_proj", "up_proj")}
  fused["qkv_proj"] = jnp.concatenate(
      [p["q_proj"].reshape(D, K, G, H), p["k_proj"][:, :, None], p["v_proj"][:, :, None]], axis=2)
  if c.qkv_bias:
    fused["qkv_bias"] = jnp.concatenate(
        [p["q_bias"].reshape(K, G, H), p["k_bias"][:, None], p["v_bias"][:, None]], axis=1)
  fused["gate_up_proj"] = jnp.stack([p["gate_proj"], p["up_proj"]], axis=1)
  return fused


def _block(config: ModelConfig, p: dict[str, jax.Array], x_BxSxD: jax.Array,
           cos_BxSxH2: jax.Array, sin_BxSxH2: jax.Array, allowed: jax.Array | CausalMask,
           write_kv: Any, causal: bool) -> tuple[jax.Array, Any]:
  """One pre-norm decoder block: x + attn(norm(x)), then + swiglu(norm(.)).

  `write_kv(k_BxSxKxH, v_BxSxKxH) -> (k_BxTxKxH, v_BxTxKxH, aux)` supplies the keys the chunk
  attends to: the chunk itself without a cache (and into an empty one), the updated layer
  cache otherwise; `causal` says which (see `attention`).
  """
  c = config
  dt = c.jnp_dtype
  B, S, _ = x_BxSxD.shape
  K, G, H = c.num_kv_heads, c.num_groups, c.head_dim

  h = rms_norm(x_BxSxD, p["input_norm"], c.rms_norm_eps)
  if "qkv_proj" in p:  # Fused by `_fuse_projections` (the no-cache path).
    qkv_BxSxKxJxH = dense(h, p["qkv_proj"].astype(dt))
    if c.qkv_bias:
      qkv_BxSxKxJxH += p["qkv_bias"].astype(dt)
    q_BxSxNxH = qkv_BxSxKxJxH[:, :, :, :G].reshape(B, S, K * G, H)
    k_BxSxKxH, v_BxSxKxH = qkv_BxSxKxJxH[:, :, :, G], qkv_BxSxKxJxH[:, :, :, G + 1]
  else:
    q_BxSxNxH = dense(h, p["q_proj"].astype(dt))
    k_BxSxKxH = dense(h, p["k_proj"].astype(dt))
    v_BxSxKxH = dense(h, p["v_proj"].astype(dt))
    if c.qkv_bias:
      q_BxSxNxH += p["q_bias"].astype(dt)
      k_BxSxKxH += p["k_bias"].astype(dt)
      v_BxSxKxH += p["v_bias"].astype(dt)
  if c.qk_norm:
    q_BxSxNxH = rms_norm(q_BxSxNxH, p["q_norm"], c.rms_norm_eps)
    k_BxSxKxH = rms_norm(k_BxSxKxH, p["k_norm"], c.rms_norm_eps)
  q_BxSxNxH = apply_rope(q_BxSxNxH, cos_BxSxH2, sin_BxSxH2)
  k_BxSxKxH = apply_rope(k_BxSxKxH, cos_BxSxH2, sin_BxSxH2)

  keys_BxTxKxH, values_BxTxKxH, aux = write_kv(k_BxSxKxH, v_BxSxKxH)
  # Query head n = k * G + g shares kv head k (HF's repeat_kv order).
  q_BxSxKxGxH = q_BxSxNxH.reshape(B, S, K, G, H) * jnp.asarray(H ** -0.5, dt)
  attn_BxSxKxGxH = attention(q_BxSxKxGxH, keys_BxTxKxH.astype(dt), values_BxTxKxH.astype(dt),
                             allowed, c.attention_chunk, causal)
  # One flattened (n, h) contraction: for "bsnh,nhd" jnp.einsum orders the contracting dims
  # (h, n), and XLA then transposes o_proj's weight (and the activations) at every call.
  attn_BxSxNH = attn_BxSxKxGxH.reshape(B, S, K * G * H)
  x_BxSxD = x_BxSxD + dense(attn_BxSxNH, p["o_proj"].reshape(K * G * H, -1).astype(dt))

  if c.mlp_chunk and S > c.mlp_chunk:
    return _over_position_chunks(functools.partial(_mlp_residual, c, p), x_BxSxD, c.mlp_chunk), aux
  return _mlp_residual(c, p, x_BxSxD), aux


def _mlp_residual(config: ModelConfig, p: dict[str, jax.Array], x_BxSxD: jax.Array) -> jax.Array:
  """x + swiglu(post_attn_norm(x)): the second half of `_block`, position by position."""
  dt = config.jnp_dtype
  h = rms_norm(x_BxSxD, p["post_attn_norm"], config.rms_norm_eps)
  if "gate_up_proj" in p:
    gate_up_BxSx2xF = dense(h, p["gate_up_proj"].astype(dt))
    gate_BxSxF, up_BxSxF = gate_up_BxSx2xF[:, :, 0], gate_up_BxSx2xF[:, :, 1]
  else:
    gate_BxSxF = dense(h, p["gate_proj"].astype(dt))
    up_BxSxF = dense(h, p["up_proj"].astype(dt))
  return x_BxSxD + dense(jax.nn.silu(gate_BxSxF) * up_BxSxF, p["down_proj"].astype(dt))


def _over_position_chunks(fn: Any, x_BxSxD: jax.Array, chunk: int) -> jax.Array:
  """`fn(x)` for a position-wise `fn` ([B, C, D] -> [B, C, D]), over `chunk` positions at a time.

  A rematerialised `lax.map` over the chunks: neither pass holds more than one chunk's
  intermediates (the MLP's [B, chunk, 2, F] gate and up, where a whole 40,960-token row's are
  GiBs a layer), and the saved residuals are the chunks' inputs, i.e. x itself. The weights are
  closed over, so their gradients sum over the chunks in the weights' own dtype: `fn` casts float32
  parameters to the compute dtype inside, so the sum runs in float32, as one whole-row matmul's would.
  """
  B, S, D = x_BxSxD.shape
  n = -(-S // chunk)
  # Padding positions are zeros through a position-wise fn and cut off below.
  x_BxSxD = jnp.pad(x_BxSxD, ((0, 0), (0, n * chunk - S), (0, 0)))
  x_nxBxCxD = jnp.moveaxis(x_BxSxD.reshape(B, n, chunk, D), 1, 0)
  pinned = lambda x_BxCxD: sharding.pin_rows(fn(sharding.pin_rows(x_BxCxD)))
  # prevent_cse=False is safe under lax.map (a scan) and lets XLA share the recomputation.
  y_nxBxCxD = jax.lax.map(jax.checkpoint(pinned, prevent_cse=False), x_nxBxCxD)
  return jnp.moveaxis(y_nxBxCxD, 0, 1).reshape(B, n * chunk, D)[:, :S]


def _remat_keeping_bits(block: Any) -> Any:
  """`jax.checkpoint(block)` for `block(x, p, consts) -> y` with a bf16 x, keeping x for the backward pass as bits.

  Under the layer scan, what remat keeps is the stack of every layer's input x, and XLA:CPU slices a bf16
  stack in float32: it made a float32 copy of the whole [layers, B, S, D] stack ahead of the backward loop,
  next to the bf16 one (4.4 GiB a device for Qwen3-0.6B's update at 40,960 tokens). A uint16 stack is sliced
  as stored; the bitcasts are free (jax.checkpoint keeps its inputs in their own dtype, and a uint16 carry
  would carry no gradient). The backward pass recomputes the block from x, as jax.checkpoint does,
  and differentiates x and the parameters p; `consts` (RoPE tables, the mask) get zero cotangents.
  """

  @jax.custom_vjp
  def remat(x, p, consts):
    return block(x, p, consts)

  def forward(x, p, consts):
    return block(x, p, consts), (jax.lax.bitcast_convert_type(x, jnp.uint16), p, consts)

  def backward(residuals, dy):
    x_bits, p, consts = residuals
    _, vjp = jax.vjp(lambda x, p: block(x, p, consts), jax.lax.bitcast_convert_type(x_bits, jnp.bfloat16), p)
    zero = lambda a: (jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact)
                      else np.zeros(a.shape, jax.dtypes.float0))
    return (*vjp(dy), jax.tree.map(zero, consts))

  remat.defvjp(forward, backward)
  return remat


def _packed(segments_q_BxQ: jax.Array, reach_q_BxQ: jax.Array, segments_k_BxK: jax.Array,
            k_idx_K: jax.Array) -> jax.Array:
  """[B, Q, K] bool: `packed_allowed` for queries and keys at their own positions (a block of it)."""
  key_seg_Bx1xK = segments_k_BxK[:, None, :]
  return jnp.where(key_seg_Bx1xK == 0, k_idx_K[None, None, :] < reach_q_BxQ[:, :, None],
                   key_seg_Bx1xK == segments_q_BxQ[:, :, None])


def packed_allowed(segments_BxW: jax.Array, reach_BxW: jax.Array) -> jax.Array:
  """[B, W, W] bool: query i may read key j if j is in segment 0 before i's reach, or in i's segment.

  Segment 0 is the row's shared transcript; the others are a turn past the history window
  (`rollout.RolloutBatch`) or a judge question (`judge.PackedQuestions`). The model adds
  causality and padding, and derives the mask block by block (`CausalMask`) rather than as this array.
  """
  return _packed(segments_BxW, reach_BxW, segments_BxW, jnp.arange(segments_BxW.shape[1], dtype=jnp.int32))


class Transformer(nnx.Module):
  """Decoder-only LM. `model(ids)` -> float32 logits; with `cache=` also the new cache."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    pd = c.jnp_param_dtype
    self.embed = _param(rngs, (c.vocab_size, c.hidden_size), pd, ("vocab", "embed"))
    self.layers = DecoderLayers(config, rngs=rngs)
    self.final_norm = _param(rngs, (c.hidden_size,), pd, ("norm",), "ones")
    if not c.tie_embeddings:
      self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), pd, ("embed", "vocab"))

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, cache: KVCache | None = None,
               layer_params: Sequence[dict[str, jax.Array]] | None = None):
    """Logits [B, S, V] in float32, or (logits, new_cache) when a cache is given."""
    if cache is None:
      return self.lm_logits(self.hidden_states(input_ids, positions, attention_mask))
    hidden_BxSxD, new_cache = self.hidden_states(input_ids, positions, attention_mask, cache,
                                                 layer_params)
    return self.lm_logits(hidden_BxSxD), new_cache

  def lm_logits(self, hidden_BxSxD: jax.Array) -> jax.Array:
    """Final-normed hidden states -> float32 logits [B, S, V] (usable chunk by chunk)."""
    dt = self.config.jnp_dtype
    if self.config.tie_embeddings:  # The embedding is [V, D].
      logits_BxSxV = dense(hidden_BxSxD.astype(dt), self.embed[...].astype(dt), jnp.float32, transposed=True)
    else:
      logits_BxSxV = dense(hidden_BxSxD.astype(dt), self.lm_head[...].astype(dt), jnp.float32)
    return sharding.pin_rows(logits_BxSxV)  # Each device's rows' logits, never the batch's.

  def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                    attention_mask: jax.Array | None = None, cache: KVCache | None = None,
                    layer_params: Sequence[dict[str, jax.Array]] | None = None,
                    fresh: bool = False, segments: jax.Array | None = None,
                    reach: jax.Array | None = None):
    """Final-normed hidden states [B, S, D] (compute dtype), plus the new cache if given.

    With a cache the layer loop is unrolled (one in-place update of each layer's buffer, no
    slice of a stacked carry); without one the layers run under `lax.scan`.

    Args:
      input_ids: [B, S] int token ids.
      positions: [B, S] RoPE positions; default `arange(S)`, or `cache.lengths[b] + arange(S)`.
      attention_mask: [B, S], 1 for real tokens and 0 for padding. Without a cache it masks
        padding keys (combined with causal); with a cache the chunk must be right-padded and
        the mask only sets how far `lengths` advances.
      cache: a KVCache to append this chunk to.
      layer_params: with a cache only: `self.layers.unstacked()`, taken once outside a decode
        loop; default: sliced here.
      fresh: with a cache only, a static promise that every row of it is empty
        (`cache.lengths` all 0), as in a prompt's prefill. The chunk then attends causally
        to itself, as without a cache, instead of to all T slots, and is written to slots
        [0, S) in one contiguous update.
      segments, reach: without a cache only, both or neither: [B, S] int, a row that packs several
        sequences sharing a prefix (a turn past the history window, the transcript judge's
        questions, each reading the transcript up to its own `reach`) with `positions` that
        restart each one after its prefix; `packed_allowed` says which keys each query reads,
        combined with the causal and padding masks.
    """
    if (segments is None) != (reach is None):
      raise ValueError("hidden_states: segments and reach go together")
    if segments is not None and cache is not None:
      raise ValueError("hidden_states: segments and reach are only used without a cache")
    if layer_params is not None and cache is None:
      raise ValueError("hidden_states: layer_params is only used with a cache")
    if fresh and (cache is None or input_ids.shape[1] > cache.max_len):
      raise ValueError(f"hidden_states: fresh needs a cache of at least the chunk's "
                       f"{input_ids.shape[1]} slots")
    c = self.config
    dt = c.jnp_dtype
    B, S = input_ids.shape
    arange_S = jnp.arange(S, dtype=jnp.int32)
    no_mask = attention_mask is None
    if no_mask:
      attention_mask = jnp.ones((B, S), jnp.int32)
    if positions is None:
      start_B = cache.lengths if cache is not None else jnp.zeros((B,), jnp.int32)
      positions = start_B[:, None] + arange_S[None, :]
    cos_BxSxH2, sin_BxSxH2 = rope_cos_sin(positions, c.head_dim, c.rope_theta)

    x_BxSxD = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
    params = self.layers.stacked()
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)

    if cache is None:
      mask = CausalMask(None if no_mask else attention_mask != 0, segments, reach)

      def block(x, p, rope_and_mask):
        # Rows pinned on both sides of the block: the partitioner gathers the weights (FSDP), never the rows.
        x, _ = _block(c, _fuse_projections(c, p), sharding.pin_rows(x, replicate_rest=True), *rope_and_mask,
                      lambda k, v: (k, v, None), causal=True)
        return sharding.pin_rows(x, replicate_rest=True)

      if c.remat and dt == jnp.bfloat16:
        block = _remat_keeping_bits(block)
      elif c.remat:
        # prevent_cse=False is safe under scan and lets XLA share the recomputation.
        block = jax.checkpoint(block, prevent_cse=False)
      rope_and_mask = (cos_BxSxH2, sin_BxSxH2, mask)
      x_BxSxD, _ = jax.lax.scan(lambda x, xs: (block(x, xs[0], rope_and_mask), None), x_BxSxD,
                                (params, layer_ids), unroll=min(c.scan_unroll, c.num_layers))
      return sharding.pin_rows(rms_norm(x_BxSxD, self.final_norm[...], c.rms_norm_eps), replicate_rest=True)

    T = cache.max_len
    slots_BxS = cache.lengths[:, None] + arange_S[None, :]
    rows_BxS = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, S))
    if fresh:
      # Right-padded chunk: padding keys sit after every real query, so causal masks them.
      allowed = CausalMask()
    else:
      allowed = jnp.arange(T, dtype=jnp.int32)[None, None, :] <= slots_BxS[:, :, None]

    if cache.num_layers != c.num_layers:
      raise ValueError(f"hidden_states: cache has {cache.num_layers} layers, the model "
                       f"{c.num_layers}")
    if layer_params is None:
      layer_params = self.layers.unstacked()
    elif len(layer_params) != c.num_layers:
      raise ValueError(f"hidden_states: layer_params has {len(layer_params)} layers, the "
                       f"model {c.num_layers}")

    def layer(x, p, ck, cv):
      def write_kv(k_BxSxKxH, v_BxSxKxH):
        if fresh:
          nk = jax.lax.dynamic_update_slice(ck, k_BxSxKxH.astype(ck.dtype), (0, 0, 0, 0))
          nv = jax.lax.dynamic_update_slice(cv, v_BxSxKxH.astype(cv.dtype), (0, 0, 0, 0))
          return k_BxSxKxH, v_BxSxKxH, (nk, nv)
        # mode="drop": padding slots past max_len are discarded, never clamped onto history.
        nk = ck.at[rows_BxS, slots_BxS].set(k_BxSxKxH.astype(ck.dtype), mode="drop")
        nv = cv.at[rows_BxS, slots_BxS].set(v_BxSxKxH.astype(cv.dtype), mode="drop")
        return nk, nv, (nk, nv)

      return _block(c, p, x, cos_BxSxH2, sin_BxSxH2, allowed, write_kv, causal=fresh)

    layer = jax.checkpoint(layer) if c.remat else layer
    new_k, new_v = [], []
    for p, ck, cv in zip(layer_params, cache.k, cache.v):
      x_BxSxD, (nk, nv) = layer(x_BxSxD, p, ck, cv)
      new_k.append(nk)
      new_v.append(nv)
    new_lengths = cache.lengths + jnp.sum(attention_mask != 0, axis=-1).astype(jnp.int32)
    new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), lengths=new_lengths)
    return rms_norm(x_BxSxD, self.final_norm[...], c.rms_norm_eps), new_cache
