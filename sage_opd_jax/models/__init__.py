"""The decoder (Qwen3 / Qwen2 / Llama) in Flax NNX: config, KV cache, sharding, HF weights I/O."""

from sage_opd_jax.models.cache import KVCache, init_cache
from sage_opd_jax.models.config import ModelConfig
from sage_opd_jax.models.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer", "init_cache"]
