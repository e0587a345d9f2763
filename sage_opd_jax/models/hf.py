"""Hugging Face checkpoints in and out: config.json + safetensors <-> the NNX Transformer.

Loading never builds a full unsharded copy on a device: the model is first made abstract
(`nnx.eval_shape`), then every parameter is assembled with `jax.make_array_from_callback`,
whose callback reads only the requested shard from memory-mapped safetensors files. The
safetensors format (8-byte header length, JSON header, raw little-endian data) is read and
written here with numpy + ml_dtypes, so bfloat16 needs neither torch nor a device.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from sage_opd_jax.models import sharding as sharding_lib
from sage_opd_jax.models.config import ModelConfig
from sage_opd_jax.models.transformer import Transformer

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "llama": "LlamaForCausalLM"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "generation_config.json", "added_tokens.json")


# ----------------------------------------------------------------------------- key map


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One of our parameters and the HF tensor(s) it comes from.

  `hf_key` has a `{i}` placeholder for per-layer tensors (our param then has a leading layer
  axis). `to_ours` maps one HF tensor (numpy view) to our layout; `to_hf` the reverse.
  """
  path: tuple[str, ...]
  hf_key: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_key


def _same(x: np.ndarray) -> np.ndarray:
  return x


def key_map(config: ModelConfig) -> list[_Entry]:
  """The explicit parameter <-> HF tensor map for the config's architecture.

  HF Linear weights are [out, in]; ours are [in, ...out] with heads split out.
  """
  c = config
  D, F, N, K, H, V = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                      c.head_dim, c.vocab_size)
  lp = "model.layers.{i}."

  def linear_to_heads(heads):  # HF [heads*H, D] -> ours [D, heads, H]
    return lambda w: w.T.reshape(D, heads, H)

  def heads_to_linear(heads):
    return lambda w: w.reshape(D, heads * H).T

  entries = [
      _Entry(("embed",), "model.embed_tokens.weight", (V, D), _same, _same),
      _Entry(("final_norm",), "model.norm.weight", (D,), _same, _same),
      _Entry(("layers", "input_norm"), lp + "input_layernorm.weight", (D,), _same, _same),
      _Entry(("layers", "q_proj"), lp + "self_attn.q_proj.weight", (N * H, D),
             linear_to_heads(N), heads_to_linear(N)),
      _Entry(("layers", "k_proj"), lp + "self_attn.k_proj.weight", (K * H, D),
             linear_to_heads(K), heads_to_linear(K)),
      _Entry(("layers", "v_proj"), lp + "self_attn.v_proj.weight", (K * H, D),
             linear_to_heads(K), heads_to_linear(K)),
      _Entry(("layers", "o_proj"), lp + "self_attn.o_proj.weight", (D, N * H),
             lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T),
      _Entry(("layers", "post_attn_norm"), lp + "post_attention_layernorm.weight", (D,),
             _same, _same),
      _Entry(("layers", "gate_proj"), lp + "mlp.gate_proj.weight", (F, D), np.transpose,
             np.transpose),
      _Entry(("layers", "up_proj"), lp + "mlp.up_proj.weight", (F, D), np.transpose,
             np.transpose),
      _Entry(("layers", "down_proj"), lp + "mlp.down_proj.weight", (D, F), np.transpose,
             np.transpose),
  ]
  if c.qkv_bias:
    for name, heads in (("q", N), ("k", K), ("v", K)):
      entries.append(_Entry(("layers", f"{name}_bias"), lp + f"self_attn.{name}_proj.bias",
                            (heads * H,), lambda b, h=heads: b.reshape(h, H),
                            lambda b, h=heads: b.reshape(h * H)))
  if c.qk_norm:
    for name in ("q", "k"):
      entries.append(_Entry(("layers", f"{name}_norm"), lp + f"self_attn.{name}_norm.weight",
                            (H,), _same, _same))
  if not c.tie_embeddings:
    entries.append(_Entry(("lm_head",), "lm_head.weight", (V, D), np.transpose, np.transpose))
  return entries


def _hf_keys(entry: _Entry, num_layers: int) -> list[str]:
  if entry.per_layer:
    return [entry.hf_key.format(i=i) for i in range(num_layers)]
  return [entry.hf_key]


# ----------------------------------------------------------------------------- safetensors


class _SafetensorsReader:
  """Memory-mapped, lazily sliced access to the tensors of one or more safetensors files."""

  def __init__(self, files: list[str]):
    self._where: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
    self._maps: dict[str, np.memmap] = {}
    for file in files:
      data_start, header = _read_safetensors_header(file)
      for key, info in header.items():
        if key in self._where:
          raise ValueError(f"tensor {key!r} appears in both {self._where[key][0]} and {file}")
        self._where[key] = (file, _ST_DTYPES[info["dtype"]], tuple(info["shape"]),
                            data_start + info["data_offsets"][0])

  def keys(self) -> set[str]:
    return set(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key][2]

  def get(self, key: str) -> np.ndarray:
    """A read-only memory-mapped view: slicing it reads only the touched pages."""
    file, dtype, shape, offset = self._where[key]
    if file not in self._maps:
      self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
    nbytes = math.prod(shape) * dtype.itemsize
    return self._maps[file][offset:offset + nbytes].view(dtype).reshape(shape)


def _read_safetensors_header(file: str) -> tuple[int, dict[str, Any]]:
  """-> (data start, {tensor: header entry}) of one safetensors file, each entry checked against the file.

  A cut or damaged file is an error naming it: the 8-byte header length, the JSON header and
  every tensor's byte range (its dtype and shape's size, inside the file) are checked here,
  before a memory map could read past the end or reshape too few bytes.
  """
  size = os.path.getsize(file)
  if size < 8:
    raise ValueError(f"{file}: {size} bytes, too short for a safetensors file (an 8-byte header length first); "
                     "the file is truncated or not safetensors.")
  with open(file, "rb") as f:
    header_len = int(np.frombuffer(f.read(8), "<u8")[0])
    if header_len > size - 8:
      raise ValueError(f"{file}: the header length says {header_len} bytes, but only {size - 8} follow it; "
                       "the file is truncated or not safetensors.")
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{file}: the safetensors header is not valid JSON ({e}); the file is damaged.") from None
  if not isinstance(header, dict):
    raise ValueError(f"{file}: the safetensors header is a JSON {type(header).__name__}, not an object.")
  data_size = size - 8 - header_len
  tensors = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise ValueError(f"{file}: tensor {key!r} has a malformed header entry {info!r}.")
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{file}: tensor {key!r} has unsupported dtype {info['dtype']!r}; "
                       f"supported: {sorted(_ST_DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
      raise ValueError(f"{file}: tensor {key!r} has a malformed shape {shape!r} or data_offsets {offsets!r}.")
    begin, end = offsets
    nbytes = math.prod(shape) * _ST_DTYPES[info["dtype"]].itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
      raise ValueError(f"{file}: tensor {key!r} has data_offsets {offsets} for {nbytes} bytes of "
                       f"{info['dtype']} {shape}.")
    if end > data_size:
      raise ValueError(f"{file}: tensor {key!r} ends at byte {end} of the data, but the file holds only "
                       f"{data_size} bytes of data; the file is truncated.")
    tensors[key] = info
  return 8 + header_len, tensors


def _read_json(file: str, what: str) -> Any:
  """The JSON of `file`; a missing, unreadable or invalid file is an error naming it and `what` it is."""
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{file}: cannot read the {what} ({type(e).__name__}: {e}).") from None


def _checkpoint_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint dir: from the index if there is one, else all."""
  index_file = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index_file):
    index = _read_json(index_file, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_file}: no 'weight_map'")
    files = sorted({os.path.join(path, name) for name in weight_map.values()})
    for file in files:
      if not os.path.isfile(file):
        raise ValueError(f"{index_file} names a missing file: {file}")
    return files
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise ValueError(f"no *.safetensors files (and no model.safetensors.index.json) in {path!r}")
  return files


def _write_safetensors(file: str, tensors: list[tuple[str, Callable[[], np.ndarray]]],
                       shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype) -> None:
  """Writes tensors (produced lazily, one at a time) in safetensors format."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for key, _ in tensors:
    nbytes = math.prod(shapes[key]) * dtype.itemsize
    header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shapes[key]),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # data must start 8-byte aligned
  with open(file, "wb") as f:
    f.write(np.uint64(len(header_bytes)).tobytes())
    f.write(header_bytes)
    for key, make in tensors:
      array = np.ascontiguousarray(make(), dtype=dtype)
      if array.shape != tuple(shapes[key]):
        raise ValueError(f"internal: {key} has shape {array.shape}, planned {shapes[key]}")
      f.write(array.tobytes())


# ----------------------------------------------------------------------------- finite weights


def nonfinite_tensors(model: Transformer) -> list[str]:
  """The HF names of the model's tensors that hold a NaN or an infinity (per layer for stacked ones).

  Reduced on device, per tensor (and per layer), so a sharded model is never gathered.
  """
  state = dict(nnx.to_flat_state(nnx.state(model)))
  bad = []
  for entry in key_map(model.config):
    param = state[entry.path].get_value()
    if entry.per_layer:
      finite_L = np.asarray(jax.device_get(jnp.isfinite(param).all(axis=tuple(range(1, param.ndim)))))
      bad += [entry.hf_key.format(i=i) for i in np.flatnonzero(~finite_L)]
    elif not bool(jax.device_get(jnp.isfinite(param).all())):
      bad.append(entry.hf_key)
  return bad


def _named(keys: list[str]) -> str:
  return f"{keys[:5]}{f' (+{len(keys) - 5} more)' if len(keys) > 5 else ''}"


# ----------------------------------------------------------------------------- load


def _check_tensors(reader: _SafetensorsReader, config: ModelConfig, path: str) -> None:
  """Missing, extra and mis-shaped tensors are errors naming the key."""
  expected: dict[str, tuple[int, ...]] = {}
  for entry in key_map(config):
    for key in _hf_keys(entry, config.num_layers):
      expected[key] = entry.hf_shape
  present = reader.keys()
  missing = sorted(set(expected) - present)
  if missing:
    raise ValueError(f"{path}: missing tensors {missing[:5]}"
                     f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}")
  extra = sorted(present - set(expected))
  if config.tie_embeddings and "lm_head.weight" in extra:
    # Some tied checkpoints store the shared matrix twice; accept only an exact copy.
    if not np.array_equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
      raise ValueError(f"{path}: tie_word_embeddings=True but lm_head.weight differs from "
                       "model.embed_tokens.weight")
    extra.remove("lm_head.weight")
  if extra:
    raise ValueError(f"{path}: unexpected tensors {extra[:5]}"
                     f"{f' (+{len(extra) - 5} more)' if len(extra) > 5 else ''} "
                     f"for arch {config.arch!r}")
  for key, shape in expected.items():
    if reader.shape(key) != shape:
      raise ValueError(f"{path}: tensor {key!r} has shape {reader.shape(key)}, "
                       f"expected {shape}")


def _assemble(entry: _Entry, reader: _SafetensorsReader, num_layers: int,
              shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding
              ) -> jax.Array:
  """Builds one parameter shard by shard, each shard read from the memory-mapped files."""

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    if not entry.per_layer:
      return np.asarray(entry.to_ours(reader.get(entry.hf_key))[index], dtype=dtype)
    layers = range(num_layers)[index[0]]
    return np.stack([
        np.asarray(entry.to_ours(reader.get(entry.hf_key.format(i=i)))[index[1:]], dtype=dtype)
        for i in layers])

  return jax.make_array_from_callback(shape, sharding, shard)


def load_hf_checkpoint(path: str | os.PathLike, dtype: Any = "float32",
                       mesh: Mesh | None = None, *, param_dtype: Any = None,
                       **overrides: Any) -> Transformer:
  """Loads a local HF Qwen3 / Qwen2 / Llama checkpoint into a Transformer.

  Args:
    path: directory with config.json and one or more *.safetensors files (or a sharded
      model.safetensors.index.json).
    dtype: compute dtype, and parameter dtype unless `param_dtype` is given.
    mesh: place each parameter straight into its sharding on this mesh (see sharding.py);
      None puts everything on the first device.
    param_dtype: parameter storage dtype, default `dtype`.
    **overrides: further ModelConfig fields that the checkpoint does not fix, e.g.
      `remat=True` or `attention_chunk=1024`.

  Raises:
    ValueError: the path is missing, the architecture unsupported, a file truncated or
      damaged, a tensor missing, extra, mis-shaped or non-finite (each named).
  """
  path = os.fspath(path)
  config = ModelConfig.from_hf(path, dtype=dtype,
                               param_dtype=dtype if param_dtype is None else param_dtype,
                               **overrides)
  reader = _SafetensorsReader(_checkpoint_files(path))
  _check_tensors(reader, config, path)

  graphdef, abstract_state = nnx.split(sharding_lib.abstract_model(config))
  if mesh is not None:
    shardings = sharding_lib.state_shardings(abstract_state, mesh)
  else:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda v: v.replace(value=device), abstract_state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  flat_abstract = dict(nnx.to_flat_state(abstract_state))
  flat_shardings = dict(nnx.to_flat_state(shardings))
  entries = {entry.path: entry for entry in key_map(config)}
  if set(entries) != set(flat_abstract):
    raise ValueError(f"internal: key map {sorted(entries)} != params {sorted(flat_abstract)}")
  loaded = []
  for param_path, variable in flat_abstract.items():
    value = variable.get_value()
    array = _assemble(entries[param_path], reader, config.num_layers, value.shape,
                      np.dtype(value.dtype), flat_shardings[param_path].get_value())
    loaded.append((param_path, variable.replace(value=array)))
  model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
  if bad := nonfinite_tensors(model):
    raise ValueError(f"{path}: non-finite values (NaN or inf) in tensors {_named(bad)}: refusing to load them.")
  return model


# ----------------------------------------------------------------------------- save


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
  """config.json contents that transformers reads back into the same architecture."""
  c = config
  if c.arch == "qwen2" and c.head_dim * c.num_heads != c.hidden_size:
    raise ValueError(f"qwen2 cannot express head_dim={c.head_dim} != hidden_size/num_heads")
  # transformers fixes these per architecture; a mismatched config would load with missing
  # or ignored tensors.
  if c.qk_norm != (c.arch == "qwen3"):
    raise ValueError(f"HF {c.arch} cannot express qk_norm={c.qk_norm}")
  if c.qkv_bias != (c.arch == "qwen2"):
    raise ValueError(f"HF {c.arch} cannot express qkv_bias={c.qkv_bias}")
  fields = dict(
      model_type=c.arch,
      architectures=[_HF_ARCHITECTURES[c.arch]],
      vocab_size=c.vocab_size,
      hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      hidden_act="silu",
      max_position_embeddings=c.max_position_embeddings,
      rms_norm_eps=c.rms_norm_eps,
      rope_theta=c.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
      tie_word_embeddings=c.tie_embeddings,
      attention_bias=False,
      torch_dtype=c.param_dtype,
      dtype=c.param_dtype,
  )
  if c.arch == "qwen2":
    del fields["attention_bias"]
  return fields


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike, *,
                       source: str | os.PathLike | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes the model as an HF checkpoint (config.json + safetensors) that transformers loads.

  Args:
    model: the Transformer (sharded or not; each tensor is gathered to the host in turn).
    path: output directory (created).
    source: optional original HF checkpoint dir: its config.json supplies the fields we do
      not model (token ids, ...) and its tokenizer / generation files are copied along.
    max_shard_bytes: above this total, tensors are split over several files with an index.
  """
  path = os.fspath(path)
  config = model.config
  fields = hf_config_dict(config)  # Raises first for what HF cannot express.
  if bad := nonfinite_tensors(model):
    raise ValueError(f"Refusing to export to {path}: non-finite values (NaN or inf) in tensors {_named(bad)}.")
  os.makedirs(path, exist_ok=True)
  config_json = {}
  if source is not None:
    source = os.fspath(source)
    if not os.path.isfile(os.path.join(source, "config.json")):
      raise ValueError(f"save_hf_checkpoint: no config.json in source {source!r}")
    config_json = _read_json(os.path.join(source, "config.json"), "HF config")
    for name in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copy(os.path.join(source, name), os.path.join(path, name))
  config_json.update(fields)
  config_json.pop("rope_scaling", None)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config_json, f, indent=2, sort_keys=True)

  dtype = np.dtype(config.jnp_param_dtype)
  state = dict(nnx.to_flat_state(nnx.state(model)))
  tensors: list[tuple[str, Callable[[], np.ndarray]]] = []
  shapes: dict[str, tuple[int, ...]] = {}
  for entry in key_map(config):
    param = state[entry.path].get_value()
    for i, key in enumerate(_hf_keys(entry, config.num_layers)):
      shapes[key] = entry.hf_shape
      if entry.per_layer:
        tensors.append((key, lambda p=param, e=entry, i=i: e.to_hf(np.asarray(p[i]))))
      else:
        tensors.append((key, lambda p=param, e=entry: e.to_hf(np.asarray(p))))

  shards: list[list[tuple[str, Callable[[], np.ndarray]]]] = [[]]
  shard_bytes = 0
  for key, make in tensors:
    nbytes = math.prod(shapes[key]) * dtype.itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append((key, make))
    shard_bytes += nbytes
  for stale in glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(
      os.path.join(path, "model.safetensors.index.json")):
    os.remove(stale)  # a leftover shard would be read as extra tensors
  if len(shards) == 1:
    _write_safetensors(os.path.join(path, "model.safetensors"), shards[0], shapes, dtype)
    return
  weight_map = {}
  for n, shard in enumerate(shards, start=1):
    name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    _write_safetensors(os.path.join(path, name), shard, shapes, dtype)
    weight_map.update({key: name for key, _ in shard})
  total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
  with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike, *, require_chat_template: bool = True) -> Any:
  """The checkpoint's tokenizer via transformers.AutoTokenizer, from a local dir only."""
  import transformers  # pylint: disable=g-import-not-at-top  # heavy; only for HF I/O

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"tokenizer path is not a directory: {path!r}")
  files = [name for name in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
  for name in files:  # A cut JSON file would fail inside `tokenizers` with no file named.
    if name.endswith(".json"):
      _read_json(os.path.join(path, name), "tokenizer file")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except  # transformers' errors name no file.
    raise ValueError(f"cannot read the tokenizer in {path!r} (files {files}): {type(e).__name__}: {e}") from e
  if require_chat_template and not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"tokenizer in {path!r} has no chat_template")
  return tokenizer


def has_tokenizer(path: str | os.PathLike) -> bool:
  """Whether an HF directory ships a tokenizer of its own."""
  return any(os.path.isfile(os.path.join(path, name))
             for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))


def tokenizer_differences(reference: Any, other: Any) -> list[str]:
  """What differs between two tokenizers' token-to-id maps and special tokens; [] when they agree."""
  problems = []
  vocab, other_vocab = reference.get_vocab(), other.get_vocab()
  if vocab != other_vocab:
    differ = sorted(t for t in vocab.keys() | other_vocab.keys() if vocab.get(t) != other_vocab.get(t))
    examples = ", ".join(f"{t!r}: {vocab.get(t)} vs {other_vocab.get(t)}" for t in differ[:3])
    problems.append(f"{len(differ)} of {len(vocab.keys() | other_vocab.keys())} tokens have another id or are "
                    f"missing ({examples})")
  if reference.special_tokens_map != other.special_tokens_map:
    problems.append(f"special tokens {reference.special_tokens_map} vs {other.special_tokens_map}")
  elif reference.all_special_ids != other.all_special_ids:
    problems.append(f"special token ids {reference.all_special_ids} vs {other.all_special_ids}")
  return problems
