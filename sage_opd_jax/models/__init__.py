"""The decoder (Qwen3 / Qwen2 / Llama) in Flax NNX: config, KV cache, sharding, HF weights I/O."""

from sage_opd_jax.models.cache import KVCache, init_cache
from sage_opd_jax.models.config import ModelConfig
from sage_opd_jax.models.hf import load_hf_checkpoint, load_tokenizer, save_hf_checkpoint
from sage_opd_jax.models.sharding import (LOGICAL_RULES, batch_sharding, cache_sharding,
                                          create_model, make_mesh, replicated, shard_model,
                                          state_shardings)
from sage_opd_jax.models.transformer import Transformer, packed_allowed

__all__ = [
    "KVCache", "LOGICAL_RULES", "ModelConfig", "Transformer", "batch_sharding", "cache_sharding",
    "create_model",
    "init_cache", "load_hf_checkpoint", "load_tokenizer", "make_mesh", "packed_allowed", "replicated",
    "save_hf_checkpoint", "shard_model", "state_shardings",
]
