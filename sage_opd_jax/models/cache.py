"""The KV cache: an explicit pytree threaded through the jitted forward pass."""

from __future__ import annotations

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

  Attributes:
    k: [L, B, max_len, K, H] keys (after q/k-norm and RoPE).
    v: [L, B, max_len, K, H] values.
    lengths: [B] int32, valid slots per row.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: jnp.dtype | str | None = None) -> KVCache:
  """An empty cache (lengths = 0); dtype defaults to the config's compute dtype."""
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch_size and max_len must be positive, got "
                     f"batch_size={batch_size}, max_len={max_len}")
  dtype = jnp.dtype(dtype if dtype is not None else config.dtype)
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 lengths=jnp.zeros((batch_size,), jnp.int32))
