"""The update step: micro-batching, NaN safety and sharding never change the result."""

import os
import pathlib
import re
import subprocess
import sys

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import base
from sage_opd_jax import models
from sage_opd_jax import train
from sage_opd_jax import update as update_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _optim(**overrides):
  optim = ml_collections.ConfigDict(dict(learning_rate=1e-2, schedule="constant", warmup_steps=0,
                                         weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0))
  optim.update(overrides)
  return optim


def _mse_loss(model, micro, totals):
  # Sum over this micro-batch divided by the GLOBAL count, so micro losses add up.
  err = (model(micro["x"]) - micro["y"]) ** 2 * micro["mask"][:, None]
  return err.sum() / totals["count"], {"num_sq_err": err.sum(), "err_max": err.max()}


def _totals(batch):
  return {"count": batch["mask"].sum()}


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "x": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
      "mask": jnp.asarray(rng.integers(0, 2, size=n), jnp.float32).at[0].set(1.0),
  }


def _run(micro_batches, batch, steps=3, state_sharding=None, batch_sharding=None):
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  graphdef = nnx.graphdef(model)
  tx = update_lib.make_optimizer(_optim())
  state = update_lib.init_train_state(model, tx, seed=0)
  update = update_lib.make_update_fn(graphdef, tx, _mse_loss, _totals, micro_batches=micro_batches)
  if state_sharding is not None:
    state = jax.device_put(state, state_sharding)
    update = update_lib.jit_update(update, state_sharding, batch_sharding)
    batch = jax.device_put(batch, batch_sharding)
  else:
    update = jax.jit(update)
  for learning_rate in update_lib.learning_rates(_optim(), steps):
    state, metrics = update(state, batch, learning_rate)
  return state, metrics


def _reference_mse(batch):
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  err = (np.asarray(model(batch["x"])) - np.asarray(batch["y"])) ** 2 * np.asarray(batch["mask"])[:, None]
  return err.sum() / np.asarray(batch["mask"]).sum()


def test_micro_batching_matches_one_batch():
  batch = _batch()
  one, m1 = _run(1, batch)
  four, m4 = _run(4, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.params, four.params)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["err_max"], m4["err_max"], rtol=1e-6)


def test_first_loss_is_the_global_masked_mean():
  batch = _batch()
  _, metrics = _run(2, batch, steps=1)
  np.testing.assert_allclose(metrics["loss"], _reference_mse(batch), rtol=1e-5)
  assert int(metrics["update_skipped"]) == 0


def test_nan_loss_skips_the_update_and_keeps_params():
  batch = _batch()
  bad = dict(batch, y=batch["y"].at[3, 0].set(jnp.nan))
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  tx = update_lib.make_optimizer(_optim())
  state = update_lib.init_train_state(model, tx, seed=0)
  before = jax.tree.map(np.asarray, state.params)
  update = jax.jit(update_lib.make_update_fn(nnx.graphdef(model), tx, _mse_loss, _totals, micro_batches=2))
  state, metrics = update(state, bad, _optim().learning_rate)
  assert int(metrics["update_skipped"]) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
  state, metrics = update(state, batch, _optim().learning_rate)  # A good batch afterwards still trains.
  assert int(metrics["update_skipped"]) == 0
  assert not np.allclose(np.asarray(state.params["kernel"][...]), before["kernel"][...])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices; see tests/conftest.py")
def test_sharded_update_matches_single_device():
  batch = _batch()
  single, m_single = _run(2, batch)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  replicated = NamedSharding(mesh, P())
  state_sharding = jax.tree.map(lambda _: replicated, single)
  batch_sharding = {k: NamedSharding(mesh, P("data")) for k in batch}
  sharded, m_sharded = _run(2, batch, state_sharding=state_sharding, batch_sharding=batch_sharding)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), single.params, sharded.params)
  np.testing.assert_allclose(m_single["loss"], m_sharded["loss"], rtol=1e-5)


def test_warmup_then_cosine_schedule():
  schedule = update_lib.learning_rate_schedule(_optim(schedule="cosine", warmup_steps=4, learning_rate=1.0), 12)
  np.testing.assert_allclose([schedule(0), schedule(2), schedule(4), schedule(12)], [0.0, 0.5, 1.0, 0.0], atol=1e-6)
  constant = update_lib.learning_rate_schedule(_optim(warmup_steps=4, learning_rate=1.0), 12)
  np.testing.assert_allclose([constant(2), constant(4), constant(11)], [0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (fake) devices; see tests/conftest.py")
def test_stages_of_other_lengths_and_rates_compile_one_update():
  """A warm start (3 updates warming up to 6e-2 under a cosine) and an `sft` row (1 update at a constant 1e-6),
  each building its update as `train.train` does, compile one program: the second stage loads the first's from
  the persistent compilation cache (conftest.py's, fresh per pytest run) as the pipeline's stages do. With the
  schedule baked into the update, each stage wrote a cache entry of its own."""
  cache = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  config = base.get_config()
  model_config = models.ModelConfig.from_dict(base.tiny_model(
      vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
      head_dim=8).to_dict())
  loss_fn, totals_fn = update_lib.make_loss_fns(train.loss_options(config, "sft", None))
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 96, (4, 12)).astype(np.int32), "attention_mask": np.ones((4, 12), np.int32),
           "turn_ids": np.repeat(np.array([[0] * 6 + [1] * 6], np.int32), 4, axis=0)}
  mesh = models.make_mesh({"fsdp": 2}, jax.devices()[:2])
  name = "update_of_two_stages"  # The cache entries' prefix: no other test's programs.

  def stage(num_steps, **optim_changes):
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    optim.update(optim_changes)
    model = models.create_model(model_config, mesh, seed=0)
    tx = update_lib.make_optimizer(optim)
    state, state_sharding = update_lib.place_state(update_lib.init_train_state(model, tx, seed=0), mesh)
    fn = update_lib.make_update_fn(nnx.graphdef(model), tx, loss_fn, totals_fn, micro_batches=2)
    fn.__name__ = fn.__qualname__ = name
    update = update_lib.jit_update(fn, state_sharding, models.batch_sharding(mesh))
    rates = []
    for learning_rate in update_lib.learning_rates(optim, num_steps):
      state, metrics = update(state, jax.device_put(batch, models.batch_sharding(mesh)), learning_rate)
      rates.append(float(metrics["learning_rate"]))
    jax.clear_caches()  # As the pipeline does after every stage: only the persistent cache is left.
    return rates

  warm = stage(3, learning_rate=6e-2, schedule="cosine", warmup_steps=10)
  row = stage(1, learning_rate=1e-6, schedule="constant", warmup_steps=0)
  np.testing.assert_allclose(warm + row, [0.0, 6e-3, 1.2e-2, 1e-6], rtol=1e-6)
  assert len([path for path in cache.iterdir() if path.name.startswith(f"jit_{name}-")]) == 1


def _sage_batch(rng, batch, seq, vocab, num_turns):
  """A random SAGE-OPD batch: two response turns per row between prompt/observation tokens."""
  turn_ids = np.zeros((batch, seq), np.int32)
  turn_ids[:, 3:7], turn_ids[:, 9:12] = 1, 2
  return {
      "tokens": jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32),
      "attention_mask": jnp.ones((batch, seq), jnp.int32),
      "turn_ids": jnp.asarray(turn_ids),
      "behaviour_logprobs": jnp.asarray(-rng.random((batch, seq)), jnp.float32),
      "teacher_logprobs": jnp.asarray(-rng.random((batch, seq)) * 3, jnp.float32),
      "teacher_top1": jnp.asarray(rng.random((batch, seq)), jnp.float32),
      "teacher_entropy": jnp.asarray(rng.random((batch, seq)), jnp.float32),
      "labels": jnp.asarray(rng.integers(0, 3, (batch, num_turns)), jnp.int32),
  }


@pytest.mark.parametrize("method", ["sft", "sage_opd"])
def test_chunked_student_loss_equals_the_whole_logits_loss_and_gradients(method):
  """`student.loss_chunk`: the update's loss and gradients through a transformer's LM head chunk by chunk."""
  config = base.get_config()
  model = models.create_model(models.ModelConfig.from_dict(base.tiny_model(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
      head_dim=16).to_dict()), None, seed=0)
  options = dict(config.loss.to_dict(), method=method, num_turns=3, teacher_vocab_size=64)
  batch = _sage_batch(np.random.default_rng(1), 4, 16, 64, 3)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_and_grads(loss_chunk):
    loss_fn, totals_fn = update_lib.make_loss_fns(options, loss_chunk)
    fn = lambda p: loss_fn(nnx.merge(graphdef, p), batch, totals_fn(batch))
    return jax.value_and_grad(fn, has_aux=True)(params)

  (want, want_metrics), want_grads = loss_and_grads(0)
  (got, got_metrics), got_grads = loss_and_grads(5)  # 5 does not divide S = 16.
  assert np.isfinite(want) and want != 0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got_metrics, want_metrics)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got_grads, want_grads)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices; see tests/conftest.py")
@pytest.mark.parametrize("old_logprobs", ["batch", "current"])
def test_sharded_transformer_sage_step_matches_single_device(old_logprobs):
  config = base.get_config()
  config.loss.old_logprobs = old_logprobs
  config.student.model = base.tiny_model(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                         num_heads=2, num_kv_heads=2, head_dim=16)
  model_config = models.ModelConfig.from_dict(config.student.model.to_dict())
  options = dict(config.loss.to_dict(), method="sage_opd", num_turns=3, teacher_vocab_size=64)
  loss_fn, totals_fn = update_lib.make_loss_fns(options)
  tx = update_lib.make_optimizer(config.optim)
  learning_rate = update_lib.learning_rates(config.optim, 4)[1]
  batch = _sage_batch(np.random.default_rng(0), 8, 16, 64, 3)

  def run(mesh):
    model = models.create_model(model_config, mesh, seed=0)
    update = update_lib.make_update_fn(nnx.graphdef(model), tx, loss_fn, totals_fn, micro_batches=2)
    state = update_lib.init_train_state(model, tx, seed=0)
    if mesh is None:
      return jax.jit(update)(state, batch, learning_rate)
    state, state_sharding = update_lib.place_state(state, mesh)
    batch_sharding = models.batch_sharding(mesh)
    return update_lib.jit_update(update, state_sharding, batch_sharding)(state, jax.device_put(batch, batch_sharding),
                                                                         learning_rate)

  single, m_single = run(None)
  sharded, m_sharded = run(models.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  assert np.isfinite(m_single["loss"]) and m_single["loss"] != 0
  np.testing.assert_allclose(m_sharded["loss"], m_single["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_sharded["grad_norm"], m_single["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), single.params, sharded.params)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices; see tests/conftest.py")
def test_fsdp_update_computes_each_devices_rows_only():
  """On an fsdp mesh of 8 a device's temporaries are about 1/8 of one device's and no row moves between devices.

  Contiguous micro-batches (each one device's rows) were gathered and computed on every device, and unpinned
  activations were gathered over the batch where a weight's hidden dimension also wants the fsdp axis.
  """
  config = base.get_config()
  model_config = models.ModelConfig.from_dict(base.tiny_model(
      vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
      head_dim=16).to_dict())
  options = dict(config.loss.to_dict(), method="sage_opd", num_turns=3, teacher_vocab_size=512)
  loss_fn, totals_fn = update_lib.make_loss_fns(options)
  tx = update_lib.make_optimizer(config.optim)
  batch = jax.eval_shape(lambda: _sage_batch(np.random.default_rng(0), 32, 64, 512, 3))

  def compile_update(mesh):
    model = models.sharding.abstract_model(model_config)
    state = jax.eval_shape(lambda: update_lib.init_train_state(model, tx, seed=0))
    update = update_lib.jit_update(
        update_lib.make_update_fn(nnx.graphdef(model), tx, loss_fn, totals_fn, micro_batches=2),
        models.sharding.state_shardings(state, mesh), models.batch_sharding(mesh))
    compiled = update.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()

  one, _ = compile_update(models.make_mesh({}, jax.devices()[:1]))
  eight, hlo = compile_update(models.make_mesh({"fsdp": 8}))
  assert eight < one / 4, (eight, one)
  # Rows never move between devices: only weights are gathered (and gradients reduced).
  assert not re.findall(r"= \S+ (all-to-all|collective-permute)\(", hlo)


@pytest.mark.parametrize("grouped", [False, True])
def test_epoch_rows_visit_each_row_once_per_epoch(grouped):
  num_rows, batch = 203, 4  # 50 batches an epoch; 3 rows dropped per epoch.
  lengths = np.random.default_rng(0).integers(1, 1000, num_rows) if grouped else None
  for epoch in range(2):
    rows = np.concatenate([train.epoch_rows(num_rows, batch, 7, epoch * 50 + i, lengths) for i in range(50)])
    assert len(np.unique(rows)) == 200
    again = train.epoch_rows(num_rows, batch, 7, epoch * 50 + 3, lengths)
    np.testing.assert_array_equal(again, rows[12:16])  # A pure function of the step.
  # Grouping drops the same rows as the plain walk: it only reorders the kept ones.
  plain = np.concatenate([train.epoch_rows(num_rows, batch, 7, i) for i in range(50)])
  first_epoch = np.concatenate([train.epoch_rows(num_rows, batch, 7, i, lengths) for i in range(50)])
  assert set(first_epoch) == set(plain)
  if not grouped:
    np.testing.assert_array_equal(first_epoch, plain)


def test_length_grouped_batches_pad_less():
  num_rows, batch = 4096, 8
  lengths = np.random.default_rng(1).integers(16, 1024, num_rows)
  def mean_width(grouped):
    return np.mean([lengths[train.epoch_rows(num_rows, batch, 0, i, lengths if grouped else None)].max()
                    for i in range(num_rows // batch)])
  # Random batches of 8 pad to ~the 8/9 quantile (~910); windows of 512 sorted rows to ~their mean.
  assert mean_width(True) < 0.7 * mean_width(False)


def test_epoch_rows_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="lengths has 3 entries for num_rows=4"):
    train.epoch_rows(4, 2, 0, 0, np.ones(3))


def test_the_update_module_imports_no_environment_judge_or_rollout():
  # The pure update runs wherever the batch comes from: no env, judge, rollout or sampler behind it.
  code = ("import sys; import sage_opd_jax.update; "
          "print(sorted(m for m in sys.modules if m.startswith('sage_opd_jax.')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
  loaded = set(out.stdout.split("'")[1::2])
  assert "sage_opd_jax.update" in loaded and "sage_opd_jax.losses" in loaded
  for module in ("envs", "judge", "rollout", "sampling", "teacher", "prompts", "train", "config"):
    assert not any(m == f"sage_opd_jax.{module}" or m.startswith(f"sage_opd_jax.{module}.") for m in loaded), module
