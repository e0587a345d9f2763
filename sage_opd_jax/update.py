"""The train state, the optimiser and the pure update step: no environment, judge or rollout.

The update is a pure function `(state, batch) -> (state, metrics)`, jitted with explicit
shardings and a donated state. It accumulates gradients over micro-batches with
`lax.scan`; every normaliser (token counts, the weight sum of E8) is computed once over
the *whole* global batch before the scan, so micro-batching and device count never
change the result. Under `jit` the batch is one global array sharded over the mesh, so
those sums are global over devices too without any explicit collective.

`train.py` is the host loop around it: rollouts, teacher scores, judge, eval, checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sage_opd_jax import losses
from sage_opd_jax.models import sharding

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(model, micro_batch, totals) -> (loss, metrics). The loss of one micro-batch is
# already divided by the global normaliser in `totals`, so micro-batch losses add up
# to the full-batch loss; `_combine_metrics` says how metrics combine.
LossFn = Callable[[nnx.Module, Batch, Mapping[str, jax.Array]], tuple[jax.Array, Metrics]]
TotalsFn = Callable[[Batch], Mapping[str, jax.Array]]


@flax.struct.dataclass
class TrainState:
  params: nnx.State  # The student's nnx.Param leaves.
  opt_state: optax.OptState  # Adam moments, the last update's learning rate, non-finite counters.
  step: jax.Array  # [] int32, updates applied or skipped so far.
  rng: jax.Array  # [2] uint32 raw key data; split explicitly, never a global seed.


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, then constant or cosine decay to 0 at `num_steps`."""
  if optim.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1)),
         optax.constant_schedule(optim.learning_rate)],
        boundaries=[optim.warmup_steps],
    )
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate, optim.warmup_steps, max(num_steps, optim.warmup_steps + 1)
    )
  raise ValueError(f"optim.schedule={optim.schedule!r}: must be 'constant' or 'cosine'.")


def _adamw(learning_rate: jax.Array, b1: float, b2: float, eps: float,
           weight_decay: float) -> optax.GradientTransformation:
  """`optax.adamw` at the rate `learning_rate`, cast to each update's dtype as a schedule's rate is
  (`optax.scale_by_schedule`): a float32 rate would make bf16 params' updates float32."""
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay),
                     optax.scale_by_schedule(lambda _: -learning_rate))


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Grad-norm clipping then AdamW; a non-finite gradient skips the whole update.

  `apply_if_finite` leaves params and moments untouched on a NaN/inf gradient, so a
  bad batch can never corrupt the model; its counters are reported as metrics. The
  learning rate is an input of every update (`make_update_fn`), held in the state as
  AdamW's one injected hyperparameter (float32, whatever the params' dtype): a schedule
  baked into the optimizer would make every stage's length (and peak rate) another
  compiled update.
  """
  adamw = optax.inject_hyperparams(_adamw, static_args=("b1", "b2", "eps", "weight_decay"),
                                   hyperparam_dtype=jnp.float32)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      adamw(learning_rate=0.0, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
  )
  return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)


def learning_rates(optim: ml_collections.ConfigDict, num_steps: int) -> np.ndarray:
  """[num_steps] float32: `learning_rate_schedule`'s rate at each update 0 .. num_steps - 1, the update's input."""
  schedule = learning_rate_schedule(optim, num_steps)
  return np.asarray(jax.jit(schedule)(jnp.arange(num_steps)), np.float32)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
  params = nnx.state(model, nnx.Param)
  return TrainState(
      params=params,
      opt_state=tx.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.PRNGKey(seed),
  )


def split_micro(batch: Batch, micro_batches: int) -> Batch:
  """[B, ...] -> [M, B/M, ...], so `lax.scan` walks the micro-batches; micro-batch m is rows i * M + m.

  Strided, not contiguous: with the rows split over the devices in contiguous blocks, every
  micro-batch then holds the same number of each device's rows, and pinned to the row sharding it
  is computed where it lies. Contiguous micro-batches would each be one device's rows, which the
  partitioner gathers so that every device computes all of them. The update sums over micro-batches,
  so their order and membership do not change the result.
  """

  def split(x):
    if x.shape[0] % micro_batches:
      raise ValueError(f"Batch size {x.shape[0]} is not divisible by micro_batches={micro_batches}.")
    x_IxMx = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
    return sharding.pin_rows(jnp.swapaxes(x_IxMx, 0, 1), axis=1)

  return jax.tree.map(split, dict(batch))


def _combine_metrics(stacked: Metrics) -> Metrics:
  """Micro-batch metrics [M] -> one value each.

  "loss" and counts ("num_*") add up (each micro-batch loss is already divided by the global
  normaliser); "*_max" takes the max; every other metric is a ratio, averaged with weights its
  own count (`losses.RATIO_COUNTS`, default "num_tokens"), which makes the average exact: a
  micro-batch with no trained token must not dilute `kl_mean` by its response tokens.
  """
  combined = {}
  for key, value in stacked.items():
    count = stacked.get(losses.RATIO_COUNTS.get(key, "num_tokens"))
    if key == "loss" or key.startswith("num_"):
      combined[key] = value.sum(0)
    elif key.endswith("_max"):
      combined[key] = value.max(0)
    elif count is None:
      combined[key] = value.mean(0)
    else:
      combined[key] = jnp.tensordot(count / jnp.maximum(count.sum(), 1.0), value, axes=1)
  return combined


def all_finite(tree: Any) -> jax.Array:
  """[] bool: whether every float in `tree` is finite (one fused reduction per leaf, no copies)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_update_fn(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    totals_fn: TotalsFn,
    *,
    micro_batches: int,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """Builds the pure update `(state, batch, learning_rate) -> (state, metrics)`; jit it with `jit_update`.

  `learning_rate` ([] float32; `learning_rates` gives a stage's) is an input, not a constant: stages of other
  lengths and peak rates (the warm start, the `sft` row) then run one compiled program.
  """

  def update(state: TrainState, batch: Batch, learning_rate: jax.Array) -> tuple[TrainState, Metrics]:
    totals = totals_fn(batch)  # Global normalisers over the whole batch, every device.

    def micro_step(grads_acc, micro):
      micro = jax.tree.map(sharding.pin_rows, micro)

      def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params), micro, totals)

      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
      return jax.tree.map(jnp.add, grads_acc, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (micro_losses, metrics) = jax.lax.scan(micro_step, zeros, split_micro(batch, micro_batches))
    opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=learning_rate)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _combine_metrics(dict(metrics, loss=micro_losses))
    metrics["grad_norm"] = optax.tree.norm(grads)
    # `apply_if_finite` sees the gradient only: a finite gradient can still make non-finite params
    # or moments (a NaN learning rate, an overflowing second moment). Any of those keeps the old state.
    applied = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & all_finite((params, opt_state))
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
    metrics["update_skipped"] = jnp.logical_not(applied)
    metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics

  return update


def jit_update(
    update: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]],
    state_sharding: Any,
    batch_sharding: Any,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """jit with explicit in/out shardings and the state donated (updated in place); the learning rate replicated.

  Traced on the batch's mesh (`sharding.on_mesh`), so micro-batches and activations stay on their rows.
  """
  meshes = {s.mesh for s in jax.tree.leaves(batch_sharding) if isinstance(s, jax.sharding.NamedSharding)}
  mesh = meshes.pop() if len(meshes) == 1 else None
  return jax.jit(
      sharding.on_mesh(update, mesh),
      in_shardings=(state_sharding, batch_sharding, None if mesh is None else sharding.replicated(mesh)),
      out_shardings=(state_sharding, None),
      donate_argnums=(0,),
  )


def student_hidden_states(model: nnx.Module, batch: Batch) -> jax.Array:
  """[B, S, D] final hidden states of the batch's rows, each token read in the context it was sampled under.

  A rollout batch packs turns past the history window in their own segments
  (`rollout.RolloutBatch`: `positions`, `segments`, `reach`), so the loss's log pi_theta of a
  sampled token is that of the windowed policy that acted; a batch without them (SFT) is one
  causal sequence per row.
  """
  if "segments" not in batch:
    return model.hidden_states(batch["tokens"], attention_mask=batch["attention_mask"])
  return model.hidden_states(batch["tokens"], batch["positions"], batch["attention_mask"], segments=batch["segments"],
                             reach=batch["reach"])


def student_logits(model: nnx.Module, batch: Batch) -> jax.Array:
  """[B, S, V] float32 logits of the batch's rows (`student_hidden_states` through the LM head)."""
  return model.lm_logits(student_hidden_states(model, batch))


def make_loss_fns(options: losses.LossOptions | Mapping[str, Any], loss_chunk: int = 0) -> tuple[LossFn, TotalsFn]:
  """The (loss_fn, totals_fn) pair of `make_update_fn` for `train.loss_options(...)` (or its fields).

  `loss_chunk` > 0: where the objective reads only the tokens' log-probs (`losses.needs_student_logits`),
  the LM head runs over that many positions at a time (`losses.chunked_token_logprobs`): the same loss
  and gradients without the [B, S, V] logits. 0: the whole logits at once.
  """
  if not isinstance(options, losses.LossOptions):
    options = losses.LossOptions.for_method(**options)
  chunked = loss_chunk > 0 and not losses.needs_student_logits(options)

  def loss_fn(model, micro, totals):
    if not chunked:
      return losses.sage_opd_loss(student_logits(model, micro), micro, options, **totals)
    # The loss reads the response tokens' log-probs only: the LM head skips the rest.
    logp_BxS = losses.chunked_token_logprobs(model.lm_logits, student_hidden_states(model, micro), micro["tokens"],
                                             loss_chunk, micro.get("student_support"),
                                             read=losses.response_mask(micro["turn_ids"]))
    return losses.sage_opd_loss(None, micro, options, student_logprobs=logp_BxS, **totals)

  def totals_fn(batch):
    return losses.loss_totals(batch, options)

  return loss_fn, totals_fn


def place_state(state: TrainState, mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
  """Puts every leaf of the state on the mesh; returns it with its sharding pytree.

  Params (and the Adam moments built from them) already carry their NamedShardings;
  counters and the rng are replicated.
  """
  replicated = sharding.replicated(mesh)

  def leaf_sharding(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh else replicated

  shardings = jax.tree.map(leaf_sharding, state)
  return jax.device_put(state, shardings), shardings


# Token-level ([B, S, ...]) and turn-level ([B, T]) keys of a training batch.
_TOKEN_KEYS = ("tokens", "attention_mask", "turn_ids", "behaviour_logprobs", "positions", "segments", "reach",
               "teacher_logprobs", "teacher_top1", "teacher_entropy", "teacher_topk_ids", "teacher_topk_logprobs",
               "student_support")
_TURN_KEYS = ("labels", "response_lengths", "valid", "repeated", "intervened")


def loss_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
  """The batch keys the update consumes: token- and turn-level arrays only."""
  return [k for k in arrays if k in _TOKEN_KEYS or k in _TURN_KEYS]
