"""The optimiser and the update against float64 NumPy, and updates that learn.

`make_optimizer` is compared with clip + AdamW + schedule written out in NumPy over several
steps (so the moments, the bias correction and the decay all act), and `make_update_fn` with
that maths applied to a hand-derived gradient. Then a few updates of the real loss on one
fixed batch must lower it, for SFT and for OPD against a fixed teacher.
"""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from sage_opd_jax import losses
from sage_opd_jax import models
from sage_opd_jax import update as update_lib


def _optim(**overrides):
  # Weight decay, a one-step warm-up and b2 != b1 so every term of the update is visible.
  optim = ml_collections.ConfigDict(dict(learning_rate=0.1, schedule="constant", warmup_steps=1,
                                         weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0))
  optim.update(overrides)
  return optim


def ref_learning_rate(optim, num_steps, t):
  """The rate of the update that follows `t` earlier ones: linear warm-up, then constant or cosine to 0."""
  if t < optim.warmup_steps:
    return optim.learning_rate * t / optim.warmup_steps
  if optim.schedule == "constant":
    return optim.learning_rate
  decay = max(num_steps, optim.warmup_steps + 1) - optim.warmup_steps
  return optim.learning_rate * 0.5 * (1 + np.cos(np.pi * min(t - optim.warmup_steps, decay) / decay))


class RefAdamW:
  """Float64 clip by global norm, Adam moments with bias correction, decoupled weight decay."""

  def __init__(self, params, optim, num_steps):
    self.params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    self.mu = {k: np.zeros_like(v) for k, v in self.params.items()}
    self.nu = {k: np.zeros_like(v) for k, v in self.params.items()}
    self.optim, self.num_steps, self.t = optim, num_steps, 0

  def step(self, grads):
    optim, t = self.optim, self.t
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    scale = min(1.0, optim.grad_clip / norm)
    lr = ref_learning_rate(optim, self.num_steps, t)
    for k, p in self.params.items():
      g = np.asarray(grads[k], np.float64) * scale
      self.mu[k] = optim.b1 * self.mu[k] + (1 - optim.b1) * g
      self.nu[k] = optim.b2 * self.nu[k] + (1 - optim.b2) * g**2
      mu_hat, nu_hat = self.mu[k] / (1 - optim.b1 ** (t + 1)), self.nu[k] / (1 - optim.b2 ** (t + 1))
      self.params[k] = p - lr * (mu_hat / (np.sqrt(nu_hat) + optim.eps) + optim.weight_decay * p)
    self.t += 1
    return self.params


def _assert_params_close(got, expected):
  for k, v in expected.items():
    np.testing.assert_allclose(np.asarray(got[k], np.float64), v, rtol=1e-5, atol=1e-6, err_msg=k)


# eps 0.05: about a tenth of a gradient entry here, so a wrong or dropped epsilon shows.
@pytest.mark.parametrize("schedule,eps", [("constant", 1e-8), ("cosine", 1e-8), ("constant", 0.05)])
def test_optimizer_matches_numpy_adamw(schedule, eps):
  optim, num_steps = _optim(schedule=schedule, eps=eps), 4
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}
  grads_per_step = []
  for norm in (0.5, 3.0, 1.5):  # Under the clip, then twice over it by different factors.
    g = {k: rng.normal(size=v.shape) for k, v in params.items()}
    total = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    grads_per_step.append({k: x * norm / total for k, x in g.items()})
  ref = RefAdamW(params, optim, num_steps)
  assert [ref_learning_rate(optim, num_steps, t) > 0 for t in range(3)] == [False, True, True]

  tx = update_lib.make_optimizer(optim)
  state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  opt_state = tx.init(state)

  @jax.jit
  def step(params, opt_state, grads, learning_rate):
    # As the update sets it: AdamW's injected rate, an input of each step.
    opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for grads, learning_rate in zip(grads_per_step, update_lib.learning_rates(optim, num_steps)):
    state, opt_state = step(state, opt_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads),
                            learning_rate)
    _assert_params_close(state, ref.step(grads))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("num_steps", [1, 3, 12, 200])
def test_each_updates_learning_rate_is_the_schedules(schedule, num_steps):
  """The rates the trainer feeds its updates, one per update, against the schedule in float64."""
  optim = _optim(schedule=schedule, warmup_steps=10, learning_rate=6e-2)
  got = update_lib.learning_rates(optim, num_steps)
  want = [ref_learning_rate(optim, num_steps, t) for t in range(num_steps)]
  assert got.shape == (num_steps,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * optim.learning_rate)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_injected_rate_steps_as_optax_adamw_with_the_schedule(dtype):
  """Bit for bit, in the params' dtype: bf16 params (a teacher's SFT) take the rate in bf16, as a schedule's
  is cast, and their updates stay bf16 (a float32 rate would promote them and break `apply_if_finite`)."""
  optim, num_steps = _optim(schedule="cosine", warmup_steps=2), 5
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), dtype), "b": jnp.asarray(rng.normal(size=(4,)), dtype)}
  schedule = update_lib.learning_rate_schedule(optim, num_steps)
  baked = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(optim.grad_clip), optax.adamw(
      schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)), max_consecutive_errors=1_000_000)
  tx = update_lib.make_optimizer(optim)

  @jax.jit
  def step(params, opt_state, ref_params, ref_state, grads, learning_rate):
    opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)
    updates, opt_state = tx.update(grads, opt_state, params)
    ref_updates, ref_state = baked.update(grads, ref_state, ref_params)
    return optax.apply_updates(params, updates), opt_state, optax.apply_updates(ref_params, ref_updates), ref_state

  state, opt_state, ref, ref_state = params, tx.init(params), params, baked.init(params)
  for learning_rate in update_lib.learning_rates(optim, num_steps):
    grads = {k: jnp.asarray(rng.normal(size=v.shape), dtype) for k, v in params.items()}
    state, opt_state, ref, ref_state = step(state, opt_state, ref, ref_state, grads, learning_rate)
    for k in params:
      assert state[k].dtype == dtype
      np.testing.assert_array_equal(np.asarray(state[k], np.float32), np.asarray(ref[k], np.float32), err_msg=k)
  assert not np.array_equal(np.asarray(state["w"], np.float32), np.asarray(params["w"], np.float32))


def _mse_loss(model, micro, totals):
  err = (model(micro["x"]) - micro["y"]) ** 2 * micro["mask"][:, None]
  return err.sum() / totals["count"], {}


def test_update_fn_applies_adamw_to_the_gradient_of_the_loss():
  """Three updates of a linear model on a masked MSE, against NumPy's own gradient and `RefAdamW`."""
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(8, 4)), 3.0 * rng.normal(size=(8, 2))  # Large errors: the early gradients clip.
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float64)
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32), "mask": jnp.asarray(mask, jnp.float32)}
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  optim, num_steps = _optim(), 3
  tx = update_lib.make_optimizer(optim)
  state = update_lib.init_train_state(model, tx, seed=0)
  update = jax.jit(update_lib.make_update_fn(nnx.graphdef(model), tx, _mse_loss, lambda b: {"count": b["mask"].sum()},
                                        micro_batches=2))
  ref = RefAdamW({k: state.params[k][...] for k in ("kernel", "bias")}, optim, num_steps)
  clipped = []
  for learning_rate in update_lib.learning_rates(optim, num_steps):
    # d/dW sum_i m_i |x_i W + b - y_i|^2 / sum(m) = 2 x^T (m * err) / sum(m).
    err = (x @ ref.params["kernel"] + ref.params["bias"] - y) * mask[:, None]
    grads = {"kernel": 2 * x.T @ err / mask.sum(), "bias": 2 * err.sum(0) / mask.sum()}
    state, metrics = update(state, batch, learning_rate)
    norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    clipped.append(norm > optim.grad_clip)
    _assert_params_close({k: state.params[k][...] for k in ("kernel", "bias")}, ref.step(grads))
  assert clipped[1]  # The clip acts on an update whose learning rate is not zero.


# ----------------------------------------------------------------------------------------
# Learning: K updates of the real loss on one fixed batch.
# ----------------------------------------------------------------------------------------

VOCAB, NUM_TURNS = 64, 2
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
            head_dim=16)


def _fixed_batch(teacher):
  """4 rows of 16 tokens, two response turns each; teacher statistics from `teacher`'s logits."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (4, 16)), jnp.int32)
  turn_ids = np.zeros((4, 16), np.int32)
  turn_ids[:, 3:8], turn_ids[:, 10:14] = 1, 2
  batch = {"tokens": tokens, "attention_mask": jnp.ones((4, 16), jnp.int32), "turn_ids": jnp.asarray(turn_ids),
           # Stale behaviour log-probs: the default old_logprobs="current" must not read them.
           "behaviour_logprobs": jnp.asarray(-3.0 - rng.random((4, 16)), jnp.float32)}
  stats = nnx.jit(lambda model, tokens, mask: losses.teacher_token_stats(model(tokens, attention_mask=mask), tokens))
  batch.update(stats(teacher, tokens, batch["attention_mask"]))
  return batch


def _squared_gap(model, batch):
  """Mean over response tokens of (log pi(y) - log nu(y))^2: at r = 1 the sampled PPO surrogate's
  gradient is half of this one's, so it is what OPD's updates on a fixed batch descend."""
  logp_BxS = losses.token_logprobs(model(batch["tokens"], attention_mask=batch["attention_mask"]), batch["tokens"])
  mask_BxS = batch["turn_ids"] > 0
  return jnp.sum(jnp.where(mask_BxS, (logp_BxS - batch["teacher_logprobs"]) ** 2, 0.0)) / jnp.sum(mask_BxS)


@pytest.mark.parametrize("method", ["sft", "opd"])
def test_updates_on_a_fixed_batch_lower_the_loss(method):
  config = base.get_config()  # The default loss: sampled estimator, old_logprobs="current".
  config.optim.learning_rate, config.optim.warmup_steps = 1e-2, 0
  student = models.create_model(models.ModelConfig.from_dict(base.tiny_model(**TINY).to_dict()), None, seed=0)
  teacher = models.create_model(models.ModelConfig.from_dict(base.tiny_model(**TINY).to_dict()), None, seed=1)
  batch = _fixed_batch(teacher)
  num_steps = 8
  tx = update_lib.make_optimizer(config.optim)
  loss_fn, totals_fn = update_lib.make_loss_fns(dict(config.loss.to_dict(), method=method, num_turns=NUM_TURNS,
                                                teacher_vocab_size=VOCAB))
  graphdef = nnx.graphdef(student)
  update = jax.jit(update_lib.make_update_fn(graphdef, tx, loss_fn, totals_fn, micro_batches=2))
  state = update_lib.init_train_state(student, tx, seed=0)

  @jax.jit
  def measure(params):
    # SFT's loss is the NLL; OPD's (the k1 estimate) is not what its gradient descends, see `_squared_gap`.
    model = nnx.merge(graphdef, params)
    return loss_fn(model, batch, totals_fn(batch))[0] if method == "sft" else _squared_gap(model, batch)

  before = float(measure(state.params))
  for learning_rate in update_lib.learning_rates(config.optim, num_steps):
    state, metrics = update(state, batch, learning_rate)
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2) and not metrics["update_skipped"]
  after = float(measure(state.params))
  assert after < 0.7 * before, (before, after)  # Measured: SFT 4.18 -> 2.06, OPD 0.027 -> 0.002.


def test_micro_batches_log_the_metrics_of_the_whole_batch():
  # Rows of 1 to 10 response tokens and random labels: one row per micro-batch, so the micro-batches differ in
  # response tokens, trained tokens and turns, and a ratio averaged with the wrong count would show.
  rng = np.random.default_rng(0)
  rows, seq, turns = 4, 16, 3
  turn_ids = np.zeros((rows, seq), np.int32)
  for b, length in enumerate((1, 4, 10, 6)):
    turn_ids[b, 2:2 + length] = 1 + (np.arange(length) >= length // 2)
  batch = {
      "tokens": jnp.asarray(rng.integers(0, VOCAB, (rows, seq)), jnp.int32),
      "attention_mask": jnp.ones((rows, seq), jnp.int32),
      "turn_ids": jnp.asarray(turn_ids),
      "teacher_logprobs": jnp.asarray(-3 * rng.random((rows, seq)), jnp.float32),
      "teacher_top1": jnp.asarray(rng.random((rows, seq)), jnp.float32),
      "teacher_entropy": jnp.asarray(rng.random((rows, seq)), jnp.float32),
      "labels": jnp.asarray([[0, 1, 2], [2, 0, 1], [1, 1, 0], [0, 2, 2]], jnp.int32),
  }
  config = base.get_config()
  # Behaviour log-probs 0.2 off on some tokens and a tight clip: those ratios clip, the others do not.
  config.loss.old_logprobs, config.loss.ppo_clip = "batch", 0.05
  loss_fn, totals_fn = update_lib.make_loss_fns(dict(config.loss.to_dict(), method="sage_opd", num_turns=turns,
                                                     teacher_vocab_size=VOCAB))
  model = models.create_model(models.ModelConfig.from_dict(base.tiny_model(**TINY).to_dict()), None, seed=0)
  current_BxS = losses.token_logprobs(model(batch["tokens"], attention_mask=batch["attention_mask"]), batch["tokens"])
  batch["behaviour_logprobs"] = current_BxS + jnp.asarray(rng.choice([-0.2, 0.0, 0.2], (rows, seq)), jnp.float32)
  tx = update_lib.make_optimizer(config.optim)
  metrics = {}
  for micro_batches in (1, 4):
    update = jax.jit(update_lib.make_update_fn(nnx.graphdef(model), tx, loss_fn, totals_fn,
                                               micro_batches=micro_batches))
    _, metrics[micro_batches] = jax.device_get(update(update_lib.init_train_state(model, tx, seed=0), batch,
                                                      config.optim.learning_rate))
  whole, split = metrics[1], metrics[4]
  assert sorted(whole) == sorted(split)
  assert 0 < whole["clip_frac"] < 1 and 0 < whole["num_trained_tokens"] < whole["num_tokens"], whole
  for key in whole:
    np.testing.assert_allclose(split[key], whole[key], rtol=2e-5, atol=1e-6, err_msg=key)
