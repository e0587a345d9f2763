"""Logical parameter axes -> mesh axes, the device mesh, and building a model onto it.

Every parameter carries `logical_axes` metadata (one name per dimension, set in
transformer.py). `LOGICAL_RULES` maps each logical name to a mesh axis or to None
(replicated). The mesh always has the three axes ("data", "fsdp", "tensor"):
  * fsdp shards the hidden ("embed") dimension of every weight matrix; the batch is split
    over ("data", "fsdp"), so fsdp is ZeRO-3-style data parallelism.
  * tensor shards heads, kv heads, the MLP width and the vocabulary (Megatron-style).
  * data replicates parameters.
Activations are pinned to their rows (`pin_rows`) inside a program traced `on_mesh`: where a weight's
hidden dimension and the rows both want `fsdp`, the partitioner would otherwise be free to gather the
rows' activations over the batch instead of the weight.
A dimension whose size the mesh axis does not divide is an error naming the parameter, never
a silent replication.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sage_opd_jax.models.cache import KVCache
from sage_opd_jax.models.config import ModelConfig
# A module import (Transformer is read at call time): transformer.py imports this module for `pin_rows`.
from sage_opd_jax.models import transformer

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
}


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ("data", "fsdp", "tensor") from e.g. {"fsdp": 4, "tensor": 2}.

  Missing axes have size 1; the sizes must multiply to the number of devices (all of
  `jax.devices()` by default).
  """
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"make_mesh: unknown mesh axes {unknown}; known: {MESH_AXES}")
  shape = tuple(int(axes.get(name, 1)) for name in MESH_AXES)
  if any(size <= 0 for size in shape):
    raise ValueError(f"make_mesh: axis sizes must be positive, got {dict(axes)}")
  devices = list(jax.devices() if devices is None else devices)
  if math.prod(shape) != len(devices):
    raise ValueError(f"make_mesh: axes {dict(zip(MESH_AXES, shape))} need {math.prod(shape)} "
                     f"devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec for a tuple of logical axis names."""
  mesh_axes = []
  for name in logical_axes:
    if name is None:
      mesh_axes.append(None)
      continue
    if name not in rules:
      raise ValueError(f"no sharding rule for logical axis {name!r}; rules: {sorted(rules)}")
    mesh_axes.append(rules[name])
  return PartitionSpec(*mesh_axes)


def named_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   name: str = "<array>",
                   rules: Mapping[str, str | None] = LOGICAL_RULES) -> NamedSharding:
  """The NamedSharding of one array; a dimension the mesh axis does not divide is an error."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"{name}: logical axes {tuple(logical_axes)} do not match shape "
                     f"{tuple(shape)}")
  spec = logical_to_spec(logical_axes, rules)
  for dim, (size, axis) in enumerate(zip(shape, spec)):
    if axis is not None and size % mesh.shape[axis]:
      raise ValueError(f"{name}: dimension {dim} ({logical_axes[dim]}={size}) is not divisible "
                       f"by mesh axis {axis!r} of size {mesh.shape[axis]}")
  return NamedSharding(mesh, spec)


def state_shardings(state: Any, mesh: Mesh,
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> Any:
  """The state's structure with each Variable's value replaced by its NamedSharding.

  Works for any nnx State (model params, optimizer state): Variables carrying
  `logical_axes` metadata are sharded by the rules, the rest (step counters) replicated.
  """

  def one(path, variable):
    if not isinstance(variable, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
      return variable.replace(value=NamedSharding(mesh, PartitionSpec()))
    value = variable.get_value()
    return variable.replace(
        value=named_sharding(axes, value.shape, mesh, jax.tree_util.keystr(path), rules))

  return jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] batch array: B split over ("data", "fsdp")."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def cache_sharding(config: ModelConfig, mesh: Mesh) -> KVCache:
  """A KVCache of NamedShardings: batch over ("data", "fsdp"), kv heads over "tensor".

  Matches the parameter rules, so each device holds the keys of its own heads and rows.
  """
  if config.num_kv_heads % mesh.shape["tensor"]:
    raise ValueError(f"cache_sharding: num_kv_heads={config.num_kv_heads} is not divisible by "
                     f"mesh axis 'tensor' of size {mesh.shape['tensor']}")
  kv = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None, LOGICAL_RULES["kv_heads"], None))
  layers = (kv,) * config.num_layers
  return KVCache(k=layers, v=layers, lengths=batch_sharding(mesh))


def on_mesh(fn: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
  """`fn` traced with `mesh` as the abstract mesh in context, so its `pin_rows` constraints apply.

  For the body of a jitted program whose inputs live on `mesh`; `mesh=None` returns `fn` unchanged.
  """
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced


def pin_rows(x: jax.Array, *, axis: int = 0, replicate_rest: bool = False) -> jax.Array:
  """`x` constrained to have its `axis` (the rows) split over ("data", "fsdp") of the mesh in context.

  The other dimensions are left to the partitioner, or replicated with `replicate_rest` (a
  decoder block's [B, S, D] activations: the hidden dimension is whole on every device, as FSDP
  and Megatron keep it). A no-op without a mesh in context (`on_mesh`), on a mesh without both
  batch axes, or when the rows do not divide over them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  devices = math.prod(mesh.shape[name] for name in BATCH_AXES)
  if devices == 1 or x.shape[axis] % devices:
    return x
  rest = None if replicate_rest else PartitionSpec.UNCONSTRAINED
  spec = [rest] * x.ndim
  spec[axis] = BATCH_AXES
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def abstract_model(config: ModelConfig) -> transformer.Transformer:
  """The model with ShapeDtypeStruct leaves: no parameter memory is allocated."""
  return nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=16)
def _jitted_init(config: ModelConfig, mesh: Mesh | None) -> Callable[[jax.Array], Any]:
  """The compiled initialiser of a (config, mesh) pair, reused across seeds."""
  _, abstract_state = nnx.split(abstract_model(config))

  def init(seed):
    return nnx.split(transformer.Transformer(config, rngs=nnx.Rngs(jax.random.key(seed))))[1]

  out_shardings = None if mesh is None else state_shardings(abstract_state, mesh)
  return jax.jit(init, out_shardings=out_shardings)


def create_model(config: ModelConfig, mesh: Mesh | None = None, seed: int = 0) -> transformer.Transformer:
  """A randomly initialised model, its params created directly in their shardings.

  Initialisation runs as one jitted computation (eager NNX init would compile every
  parameter's initialiser separately); without a mesh the params land on the default device.
  """
  graphdef, _ = nnx.split(abstract_model(config))
  state = _jitted_init(config, mesh)(jnp.asarray(seed, jnp.uint32))
  return nnx.merge(graphdef, state)


def shard_model(model: transformer.Transformer, mesh: Mesh) -> transformer.Transformer:
  """Moves an existing model's params onto the mesh (e.g. a model built unsharded)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
