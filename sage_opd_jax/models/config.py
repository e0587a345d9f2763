"""The decoder's configuration: one frozen dataclass for Qwen3, Qwen2/Qwen2.5 and Llama."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHS = ("qwen3", "qwen2", "llama")
_DTYPES = ("float32", "bfloat16")


def _dtype_name(value: Any, field: str) -> str:
  """Canonical dtype name ('float32' or 'bfloat16') for a string or dtype-like."""
  try:
    name = jnp.dtype(value).name
  except TypeError as e:
    raise ValueError(f"ModelConfig.{field}: not a dtype: {value!r}") from e
  if name not in _DTYPES:
    raise ValueError(f"ModelConfig.{field}: {name!r} is not one of {_DTYPES}")
  return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the decoder. Frozen and hashable, so it can be a static jit argument.

  Attributes:
    arch: "qwen3" (q/k RMSNorm), "qwen2" (QKV bias) or "llama".
    vocab_size: rows of the embedding table (V).
    hidden_size: residual width (D).
    intermediate_size: SwiGLU width (F).
    num_layers: decoder blocks (L).
    num_heads: query heads (N).
    num_kv_heads: key/value heads (K); N must be a multiple of K (grouped-query attention).
    head_dim: per-head width (H); need not equal D / N (Qwen3 uses 128 throughout).
    rope_theta: RoPE base frequency.
    rms_norm_eps: epsilon of every RMSNorm.
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
    qkv_bias: bias on the q/k/v projections (Qwen2).
    tie_embeddings: the output projection is the transposed embedding table.
    max_position_embeddings: the checkpoint's trained context; recorded, not enforced.
    param_dtype: storage dtype of the parameters ("float32" or "bfloat16").
    dtype: compute dtype of activations and matmuls; logits are always returned in float32.
    remat: rematerialise each block in the backward pass (jax.checkpoint).
    attention_chunk: if > 0, queries are processed in blocks of this many tokens, each
      rematerialised in the backward pass, bounding the attention score buffer to
      B x N x attention_chunk x T (long-sequence teacher scoring and training); 0 keeps no
      bound. Causal self-attention (no cache, or an empty one) goes in query blocks either
      way, of this size or 128, each reading only the keys up to its last query; past 1,024
      positions, one block at a time, an online softmax over key blocks
      (`transformer._causal_blockwise`: a [B, N, chunk, chunk] score tile).
    mlp_chunk: if > 0, each block's MLP (with its norm and residual add) runs over this many
      positions at a time, each chunk rematerialised in the backward pass, so neither pass
      holds more than one chunk's [B, mlp_chunk, 2, F] gate and up activations (a whole
      40,960-token row's are GiBs a layer); 0 runs it over the whole chunk at once. The MLP
      is position-wise: the numbers are the same.
    scan_unroll: layers per iteration of the layer `lax.scan` (its `unroll`); num_layers
      unrolls the loop fully, which makes the training step faster at the price of compile
      time growing with depth.
  """

  arch: str = "qwen3"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qk_norm: bool = True
  qkv_bias: bool = False
  tie_embeddings: bool = True
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  attention_chunk: int = 0
  mlp_chunk: int = 0
  scan_unroll: int = 1

  def __post_init__(self):
    if self.arch not in SUPPORTED_ARCHS:
      raise ValueError(f"ModelConfig.arch: unsupported architecture {self.arch!r}; "
                       f"supported: {SUPPORTED_ARCHS}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name}: must be a positive int, got {value!r}")
    if not isinstance(self.attention_chunk, int) or self.attention_chunk < 0:
      raise ValueError(f"ModelConfig.attention_chunk: must be an int >= 0, got "
                       f"{self.attention_chunk!r}")
    if not isinstance(self.mlp_chunk, int) or isinstance(self.mlp_chunk, bool) or self.mlp_chunk < 0:
      raise ValueError(f"ModelConfig.mlp_chunk: must be an int >= 0, got {self.mlp_chunk!r}")
    if not isinstance(self.scan_unroll, int) or isinstance(self.scan_unroll, bool) or (
        self.scan_unroll <= 0):
      raise ValueError(f"ModelConfig.scan_unroll: must be a positive int, got "
                       f"{self.scan_unroll!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
    if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
      raise ValueError("ModelConfig.rope_theta and rms_norm_eps must be positive, got "
                       f"{self.rope_theta!r} and {self.rms_norm_eps!r}")
    # Normalise dtype-likes (jnp.bfloat16, np.dtype) to names so the config stays hashable
    # and round-trips through ConfigDicts and JSON.
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
    object.__setattr__(self, "dtype", _dtype_name(self.dtype, "dtype"))
    object.__setattr__(self, "rope_theta", float(self.rope_theta))
    object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))

  @property
  def jnp_param_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, mapping: Mapping[str, Any]) -> ModelConfig:
    """Builds a config from a dict or ml_collections.ConfigDict; unknown keys are an error."""
    if hasattr(mapping, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
      mapping = mapping.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
      raise ValueError(f"ModelConfig.from_dict: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**dict(mapping))

  @classmethod
  def from_hf(cls, path_or_config: Any, **overrides: Any) -> ModelConfig:
    """Builds a config from a local HF checkpoint dir / config.json, or a transformers config.

    Args:
      path_or_config: a directory holding config.json, the config.json file itself, or a
        `transformers.PretrainedConfig`.
      **overrides: fields to set on top, typically `param_dtype`, `dtype` and `remat`.

    Raises:
      ValueError: the path does not exist, the architecture is unsupported (named), or the
        checkpoint uses a feature this decoder does not implement (named).
    """
    if isinstance(path_or_config, (str, os.PathLike)):
      hf_config = _read_hf_config(os.fspath(path_or_config))
    else:
      hf_config = path_or_config
    fields = hf_config_to_fields(hf_config)
    fields.update(overrides)
    return cls.from_dict(fields)


def _read_hf_config(path: str) -> Any:
  """Loads a transformers config from a local directory or config.json path (never the hub)."""
  import transformers  # pylint: disable=g-import-not-at-top  # heavy; only for HF I/O

  if not os.path.exists(path):
    raise ValueError(f"HF checkpoint path does not exist: {path!r}")
  config_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(config_file):
    raise ValueError(f"no config.json in HF checkpoint dir: {path!r}")
  try:
    with open(config_file, encoding="utf-8") as f:
      config_dict = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{config_file}: cannot read the HF config ({type(e).__name__}: {e}).") from None
  if not isinstance(config_dict, dict):
    raise ValueError(f"{config_file}: the HF config is a JSON {type(config_dict).__name__}, not an object.")
  model_type = config_dict.get("model_type")
  if model_type not in SUPPORTED_ARCHS:
    # Checked before transformers sees it: an unknown model_type must name itself, not fail
    # deep inside AutoConfig.
    raise ValueError(f"{config_file}: unsupported architecture model_type={model_type!r} "
                     f"(architectures={config_dict.get('architectures')}); "
                     f"supported: {SUPPORTED_ARCHS}")
  return transformers.AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(config_file)),
                                                 local_files_only=True)


def _rope_theta(hf_config: Any) -> float:
  """The RoPE base; only the plain ('default') RoPE is implemented, anything else is an error."""
  params = getattr(hf_config, "rope_parameters", None)
  if params is None:  # transformers < 5 layout
    scaling = getattr(hf_config, "rope_scaling", None)
    params = dict(scaling or {}, rope_theta=getattr(hf_config, "rope_theta", None))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"unsupported rope_type {rope_type!r} (only 'default' RoPE is implemented)")
  if params.get("rope_theta") is None:
    raise ValueError("HF config has no rope_theta")
  return float(params["rope_theta"])


def hf_config_to_fields(hf_config: Any) -> dict[str, Any]:
  """Maps a transformers Qwen3/Qwen2/Llama config to ModelConfig fields."""
  arch = getattr(hf_config, "model_type", None)
  if arch not in SUPPORTED_ARCHS:
    raise ValueError(f"unsupported architecture model_type={arch!r}; supported: {SUPPORTED_ARCHS}")
  if getattr(hf_config, "hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {hf_config.hidden_act!r} (only 'silu')")
  if getattr(hf_config, "use_sliding_window", False):
    raise ValueError("unsupported: use_sliding_window=True")
  if arch in ("qwen3", "llama") and getattr(hf_config, "attention_bias", False):
    raise ValueError(f"unsupported for {arch}: attention_bias=True")
  if getattr(hf_config, "mlp_bias", False):
    raise ValueError(f"unsupported for {arch}: mlp_bias=True")
  num_heads = hf_config.num_attention_heads
  head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
  return dict(
      arch=arch,
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=num_heads,
      num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
      head_dim=head_dim,
      rope_theta=_rope_theta(hf_config),
      rms_norm_eps=hf_config.rms_norm_eps,
      qk_norm=arch == "qwen3",
      qkv_bias=arch == "qwen2",
      tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      max_position_embeddings=hf_config.max_position_embeddings,
  )
