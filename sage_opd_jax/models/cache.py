"""The KV cache: an explicit pytree threaded through the jitted forward pass."""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from sage_opd_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, with a per-row count of valid slots.

  A forward pass with a cache writes a chunk's S tokens at slots `lengths[b] + arange(S)` of
  row b, lets chunk token j attend to slots `< lengths[b] + j + 1`, and advances `lengths` by
  the chunk's real (attention_mask == 1) token count. Chunks are right-padded: padding slots
  are written but lie beyond `lengths`, so the next chunk overwrites them. Writes past
  `max_len` are dropped; keeping `lengths + S <= max_len` for real tokens is the caller's job.

  Each layer has its own buffer rather than one stacked `[L, ...]` array: the cached forward
  unrolls its layer loop, so every layer's new keys are scattered into its buffer in place
  and attention reads that buffer directly. A stacked cache carried through the layer scan
  cost a copy of each layer's `[B, T, K, H]` slice at every decode step (the decode step
  at 2048 slots was 1.7x slower; docs/benchmarks.md).

  Attributes:
    k: L arrays [B, max_len, K, H], layer by layer: keys (after q/k-norm and RoPE).
    v: L arrays [B, max_len, K, H]: values.
    lengths: [B] int32, valid slots per row.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0]

  def map_kv(self, fn: Callable[[jax.Array], jax.Array]) -> KVCache:
    """The cache with `fn` applied to every layer's key and value buffer (lengths kept)."""
    return self.replace(k=tuple(fn(a) for a in self.k), v=tuple(fn(a) for a in self.v))


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: jnp.dtype | str | None = None) -> KVCache:
  """An empty cache (lengths = 0); dtype defaults to the config's compute dtype."""
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch_size and max_len must be positive, got "
                     f"batch_size={batch_size}, max_len={max_len}")
  dtype = jnp.dtype(dtype if dtype is not None else config.dtype)
  shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
  layers = range(config.num_layers)
  return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                 v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                 lengths=jnp.zeros((batch_size,), jnp.int32))
