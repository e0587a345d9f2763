"""Tests for the decoder itself: config validation, KV-cache semantics, masks, dtypes."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sage_opd_jax.models import KVCache, ModelConfig, Transformer, init_cache
from sage_opd_jax.models import transformer
from sage_opd_jax.models.transformer import CausalMask, apply_rope, attention, dense, rope_cos_sin

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, rope_theta=10_000.0)


def _model(arch="qwen3", seed=0, **overrides):
  """A tiny model with host-drawn random weights (no init compile; norms and biases random too,
  so that a dropped norm or bias cannot go unnoticed)."""
  fields = dict(TINY, arch=arch, qk_norm=arch == "qwen3", qkv_bias=arch == "qwen2",
                tie_embeddings=arch != "llama")
  fields.update(overrides)
  config = ModelConfig(**fields)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, variable):
    name = jax.tree_util.keystr(path)
    shape = variable.get_value().shape
    if "norm" in name:
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      value = (0.3 if "bias" in name else 0.1) * rng.standard_normal(shape)
    return variable.replace(value=jnp.asarray(value, config.param_dtype))

  state = jax.tree_util.tree_map_with_path(draw, abstract,
                                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _fwd(graphdef, state, ids, positions=None, mask=None):
  return nnx.merge(graphdef, state)(ids, positions, mask)


@functools.partial(jax.jit, static_argnums=0)
def _fwd_cache(graphdef, state, ids, mask, cache):
  return nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)


def _ids(key, shape, vocab=TINY["vocab_size"]):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_prefill_then_decode_matches_full_forward(arch):
  model = _model(arch)
  graphdef, state = nnx.split(model)
  ids = _ids(1, (3, 9))
  full = _fwd(graphdef, state, ids)
  cache = init_cache(model.config, 3, 12)
  ones = lambda s: jnp.ones((3, s), jnp.int32)
  chunks, _ = [], None
  logits, cache = _fwd_cache(graphdef, state, ids[:, :5], ones(5), cache)
  chunks.append(logits)
  for s in range(5, 9):
    logits, cache = _fwd_cache(graphdef, state, ids[:, s:s + 1], ones(1), cache)
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache.lengths, [9, 9, 9])


def test_ragged_right_padded_chunks_match_per_row_full_forward():
  """Rows append chunks of different real lengths; each row equals its own unpadded forward."""
  model = _model("qwen3")
  graphdef, state = nnx.split(model)
  # Per row: real lengths of three appended chunks (prompt, observation, decode step).
  chunk_lens = [[3, 4, 1], [5, 1, 1], [1, 6, 1]]
  rows = [_ids(10 + b, (sum(lens),)) for b, lens in enumerate(chunk_lens)]
  cache = init_cache(model.config, 3, 16)
  got = [[] for _ in rows]
  offsets = [0, 0, 0]
  for c in range(3):
    width = max(lens[c] for lens in chunk_lens)
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for b, lens in enumerate(chunk_lens):
      n = lens[c]
      ids[b, :n] = rows[b][offsets[b]:offsets[b] + n]
      # Padding gets a real token id so that a leak into the history would change logits.
      ids[b, n:] = 5
      mask[b, :n] = 1
    logits, cache = _fwd_cache(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache)
    for b, lens in enumerate(chunk_lens):
      got[b].append(logits[b, :lens[c]])
      offsets[b] += lens[c]
  np.testing.assert_array_equal(cache.lengths, [sum(lens) for lens in chunk_lens])
  for b, row in enumerate(rows):
    want = _fwd(graphdef, state, row[None])[0]
    np.testing.assert_allclose(jnp.concatenate(got[b], 0), want, atol=1e-5, rtol=0)


def test_padding_mask_without_cache_matches_unpadded():
  model = _model("qwen2")
  graphdef, state = nnx.split(model)
  ids = _ids(3, (2, 8))
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
  padded = _fwd(graphdef, state, ids, None, mask)
  alone = _fwd(graphdef, state, ids[1:, :5])
  np.testing.assert_allclose(padded[1, :5], alone[0], atol=1e-5, rtol=0)
  # Left padding with explicit positions: real tokens see only real tokens.
  left_ids = jnp.concatenate([jnp.full((1, 3), 7), ids[1:, :5]], axis=1)
  left_mask = jnp.array([[0] * 3 + [1] * 5], jnp.int32)
  left_pos = jnp.array([[0] * 3 + list(range(5))], jnp.int32)
  left = _fwd(graphdef, state, left_ids, left_pos, left_mask)
  assert np.isfinite(np.asarray(left)).all()
  np.testing.assert_allclose(left[0, 3:], alone[0], atol=1e-5, rtol=0)


def test_hidden_states_then_lm_logits_equals_call():
  model = _model("llama")
  ids = _ids(4, (2, 6))
  hidden = model.hidden_states(ids)
  assert hidden.shape == (2, 6, TINY["hidden_size"])
  chunked = jnp.concatenate([model.lm_logits(hidden[:, :3]), model.lm_logits(hidden[:, 3:])], 1)
  np.testing.assert_allclose(chunked, model(ids), atol=1e-6, rtol=0)
  assert chunked.dtype == jnp.float32


def test_rope_positions_matter_and_are_relative():
  """Shifting every position by a constant leaves attention (and logits) unchanged."""
  model = _model("qwen3")
  graphdef, state = nnx.split(model)
  ids = _ids(5, (1, 6))
  base = _fwd(graphdef, state, ids)
  pos = jnp.arange(6)[None]
  np.testing.assert_allclose(_fwd(graphdef, state, ids, pos + 11), base, atol=1e-4, rtol=0)
  scrambled = _fwd(graphdef, state, ids, pos.at[0, 5].set(2))
  assert np.abs(np.asarray(scrambled[0, 5] - base[0, 5])).max() > 1e-3


def test_bf16_close_to_fp32():
  model32 = _model("qwen3")
  graphdef, state32 = nnx.split(model32)
  config16 = model32.config.replace(param_dtype="bfloat16", dtype="bfloat16")
  g16, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config16, rngs=nnx.Rngs(0))))
  # Same weights, rounded to bf16; the reference computes in fp32 on exactly those weights, so the
  # difference is the bf16 compute alone: a few bf16 roundings (relative 2^-8 each) of the logits'
  # scale through the 2 layers (3.4 of them at most over seeds 0-2).
  state16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state32)
  ids = _ids(6, (2, 10))
  want = np.asarray(_fwd(graphdef, jax.tree.map(lambda a: a.astype(jnp.float32), state16), ids))
  got = _fwd(g16, state16, ids)
  assert got.dtype == jnp.float32
  assert jax.tree.leaves(state16)[0].dtype == jnp.bfloat16
  err = np.abs(np.asarray(got) - want).max()
  assert err < 6 * 2.0**-8 * np.abs(want).max(), err
  cache = init_cache(config16, 2, 12)
  assert all(a.dtype == jnp.bfloat16 for a in cache.k + cache.v)
  logits, cache = _fwd_cache(g16, state16, ids, jnp.ones((2, 10), jnp.int32), cache)
  np.testing.assert_allclose(logits, got, atol=2e-2, rtol=0)


def test_remat_gradients_equal_plain():
  ids = _ids(8, (2, 5))

  def loss(model):
    return jnp.mean(jax.nn.logsumexp(model(ids), axis=-1))

  model = _model("qwen3")
  graphdef, state = nnx.split(model)
  remat_graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: Transformer(model.config.replace(remat=True), rngs=nnx.Rngs(0))))
  chunked_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(
      model.config.replace(remat=True, attention_chunk=2), rngs=nnx.Rngs(0))))
  grad = jax.jit(jax.grad(lambda s, g: loss(nnx.merge(g, s))), static_argnums=1)
  plain = grad(state, graphdef)
  for other in (remat_graphdef, chunked_graphdef):
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grad(state, other))):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def _mlp_residual_f64(x_NxD, norm_D, gate_DxF, up_DxF, down_FxD, eps, d_NxD):
  """x + down(silu(gate(h)) * up(h)), h = rms_norm(x) * norm, and its gradients, in float64 NumPy.

  The backward is written out by hand: d of x (through the residual and the norm), the norm
  weight and the three projections, for the cotangent d_NxD.
  """
  r_Nx1 = 1.0 / np.sqrt(np.mean(x_NxD ** 2, -1, keepdims=True) + eps)
  n_NxD = x_NxD * r_Nx1
  h_NxD = n_NxD * norm_D
  g_NxF, u_NxF = h_NxD @ gate_DxF, h_NxD @ up_DxF
  sig_NxF = 1.0 / (1.0 + np.exp(-g_NxF))
  a_NxF = g_NxF * sig_NxF * u_NxF
  y_NxD = x_NxD + a_NxF @ down_FxD
  da_NxF = d_NxD @ down_FxD.T
  dg_NxF = da_NxF * u_NxF * sig_NxF * (1.0 + g_NxF * (1.0 - sig_NxF))
  du_NxF = da_NxF * g_NxF * sig_NxF
  dh_NxD = dg_NxF @ gate_DxF.T + du_NxF @ up_DxF.T
  dn_NxD = dh_NxD * norm_D
  dx_NxD = d_NxD + r_Nx1 * (dn_NxD - n_NxD * np.mean(dn_NxD * n_NxD, -1, keepdims=True))
  grads = {"x": dx_NxD, "post_attn_norm": np.sum(dh_NxD * n_NxD, 0), "gate": h_NxD.T @ dg_NxF,
           "up": h_NxD.T @ du_NxF, "down_proj": a_NxF.T @ d_NxD}
  return y_NxD, grads


@pytest.mark.parametrize("mlp_chunk", [0, 4, 32])
def test_mlp_chunks_match_a_float64_reference(mlp_chunk):
  """The block's MLP half over chunks of 4 positions (S = 10: a padded last chunk), whole (0), and with a
  chunk longer than the row, against float64 NumPy: values and the gradients of x and every weight."""
  rng = np.random.default_rng(7)
  B, S, D, F = 2, 10, 16, 24
  config = ModelConfig(**dict(TINY, hidden_size=D, intermediate_size=F, mlp_chunk=mlp_chunk))
  x = rng.standard_normal((B, S, D))
  norm = 1.0 + 0.2 * rng.standard_normal(D)
  gate, up, down = (rng.standard_normal(shape) * 0.3 for shape in ((D, F), (D, F), (F, D)))
  d_out = rng.standard_normal((B, S, D))
  want, want_grads = _mlp_residual_f64(x.reshape(B * S, D), norm, gate, up, down, config.rms_norm_eps,
                                       d_out.reshape(B * S, D))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  params = {"post_attn_norm": f32(norm), "gate_up_proj": f32(np.stack([gate, up], axis=1)), "down_proj": f32(down)}

  def mlp(x_BxSxD, p):
    if mlp_chunk:
      return transformer._over_position_chunks(functools.partial(transformer._mlp_residual, config, p), x_BxSxD,
                                               mlp_chunk)
    return transformer._mlp_residual(config, p, x_BxSxD)

  got, vjp = jax.vjp(jax.jit(mlp), f32(x), params)
  np.testing.assert_allclose(np.asarray(got).reshape(B * S, D), want, atol=2e-5, rtol=0)
  dx, dp = vjp(f32(d_out))
  got_grads = {"x": dx, "post_attn_norm": dp["post_attn_norm"], "gate": dp["gate_up_proj"][:, 0],
               "up": dp["gate_up_proj"][:, 1], "down_proj": dp["down_proj"]}
  for name, value in want_grads.items():
    np.testing.assert_allclose(np.asarray(got_grads[name]).reshape(value.shape), value, atol=5e-5, rtol=0,
                               err_msg=f"d{name}")


def test_mlp_chunk_in_the_model_changes_no_logit_or_gradient():
  """The whole model with mlp_chunk (remat on and off, S = 5 over chunks of 2) equals it without."""
  ids = _ids(12, (2, 5))
  model = _model("qwen3")
  graphdef, state = nnx.split(model)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda s, g: jnp.mean(jax.nn.logsumexp(nnx.merge(g, s)(ids), axis=-1))), static_argnums=1)
  want_loss, want_grads = value_and_grad(state, graphdef)
  for remat in (False, True):
    chunked, _ = nnx.split(nnx.eval_shape(lambda r=remat: Transformer(
        model.config.replace(mlp_chunk=2, remat=r), rngs=nnx.Rngs(0))))
    loss, grads = value_and_grad(state, chunked)
    np.testing.assert_allclose(loss, want_loss, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(want_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  for bad in (-1, True, 1.5):
    with pytest.raises(ValueError, match="mlp_chunk"):
      ModelConfig(mlp_chunk=bad)


def test_mlp_chunk_bounds_the_compiled_temporaries():
  """XLA's own temporary memory of a remat training step: a wide MLP over 2,048 positions in chunks of 256
  needs under half of what the whole row's [S, 2, F] gate and up activations do (read from memory_analysis)."""
  fields = dict(TINY, hidden_size=64, intermediate_size=4096, num_layers=1, remat=True, attention_chunk=256)
  ids = _ids(13, (1, 2048))

  def temp_bytes(mlp_chunk):
    model = nnx.eval_shape(lambda: Transformer(ModelConfig(**fields, mlp_chunk=mlp_chunk), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    grad = jax.jit(jax.grad(lambda s: jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, s)(ids), axis=-1))))
    return grad.lower(state).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(256)
  # One f32 [2048, 2, 4096] gate/up buffer alone is 64 MiB; a chunk's is 8 MiB.
  assert chunked < 0.5 * whole, (chunked, whole)


def test_bf16_remat_keeps_the_block_inputs_as_bits_and_its_gradients_equal_plain():
  """A bf16 remat step keeps the layers' block inputs once, as uint16 bits: the compiled program has no float32
  [L, B, S, D] buffer (XLA:CPU made one of a bf16 stack ahead of the backward loop), and its gradients are
  those of the same step without remat."""
  L, S, D = 12, 512, TINY["hidden_size"]
  ids = _ids(14, (1, S))
  model = _model("qwen3", num_layers=L, dtype="bfloat16", attention_chunk=256)
  graphdef, state = nnx.split(model)
  remat_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model.config.replace(remat=True),
                                                                   rngs=nnx.Rngs(0))))
  grad = jax.jit(jax.grad(lambda s, g: jnp.mean(jax.nn.logsumexp(nnx.merge(g, s)(ids), axis=-1))),
                 static_argnums=1)
  hlo = grad.lower(state, remat_graphdef).compile().as_text()
  assert re.search(rf"u16\[{L},1,{S},{D}\]", hlo)  # The saved stack, as bits.
  assert not re.search(rf"f32\[{L},1,{S},{D}\]", hlo)
  for a, b in zip(jax.tree.leaves(grad(state, graphdef)), jax.tree.leaves(grad(state, remat_graphdef))):
    np.testing.assert_allclose(a, b, atol=2e-2 * float(jnp.abs(a).max()), rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_scan_unroll_matches_rolled_loop(arch):
  """Unrolling the layer scan (partly: 2 of 3 layers; and fully) changes no logit or gradient."""
  ids = _ids(10, (2, 6))
  model = _model(arch, num_layers=3)
  graphdef, state = nnx.split(model)
  grad = jax.jit(jax.value_and_grad(
      lambda s, g: jnp.mean(jax.nn.logsumexp(nnx.merge(g, s)(ids), axis=-1))), static_argnums=1)
  want_loss, want_grads = grad(state, graphdef)
  for unroll in (2, 3, 8):
    unrolled, _ = nnx.split(nnx.eval_shape(lambda u=unroll: Transformer(
        model.config.replace(scan_unroll=u), rngs=nnx.Rngs(0))))
    loss, grads = grad(state, unrolled)
    np.testing.assert_allclose(loss, want_loss, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(want_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  for bad in (0, -1, True, 1.5):
    with pytest.raises(ValueError, match="scan_unroll"):
      ModelConfig(scan_unroll=bad)


def test_apply_rope_matches_numpy_rotate_half():
  """RoPE against a float64 NumPy rotate_half (HF's formula: x * cos + rotate_half(x) * sin)."""
  rng = np.random.default_rng(3)
  x_BxSxNxH = rng.standard_normal((2, 5, 3, 8))
  positions_BxS = rng.integers(0, 100, (2, 5))
  inv_freq = 1.0 / 10_000.0 ** (np.arange(0, 8, 2) / 8)
  angles_BxSxH = np.concatenate([positions_BxS[..., None] * inv_freq] * 2, axis=-1)[:, :, None]
  x1, x2 = x_BxSxNxH[..., :4], x_BxSxNxH[..., 4:]
  want = x_BxSxNxH * np.cos(angles_BxSxH) + np.concatenate([-x2, x1], -1) * np.sin(angles_BxSxH)
  cos, sin = rope_cos_sin(jnp.asarray(positions_BxS), 8, 10_000.0)
  got = apply_rope(jnp.asarray(x_BxSxNxH, jnp.float32), cos, sin)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_attention_chunk_matches_whole_sequence():
  """Query blocks of 4 over S=10 (a padded last block), with and without a cache."""
  model = _model("qwen2")
  graphdef, state = nnx.split(model)
  chunked, _ = nnx.split(nnx.eval_shape(lambda: Transformer(
      model.config.replace(attention_chunk=4), rngs=nnx.Rngs(0))))
  ids = _ids(9, (2, 10))
  mask = jnp.array([[1] * 10, [1] * 7 + [0] * 3], jnp.int32)
  np.testing.assert_allclose(_fwd(chunked, state, ids, None, mask),
                             _fwd(graphdef, state, ids, None, mask), atol=1e-5, rtol=0)
  cache = init_cache(model.config, 2, 16)
  want, want_cache = _fwd_cache(graphdef, state, ids, mask, cache)
  got, got_cache = _fwd_cache(chunked, state, ids, mask, cache)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for got_k, want_k in zip(got_cache.k, want_cache.k):
    np.testing.assert_allclose(got_k, want_k, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="attention_chunk"):
    ModelConfig(attention_chunk=-1)


def _attention_f64(q_BxSxKxGxH, k_BxTxKxH, v_BxTxKxH, allowed_BxSxT):
  """Masked softmax attention in float64 NumPy, one (row, head) at a time."""
  B, S, K, G, _ = q_BxSxKxGxH.shape
  out = np.zeros(q_BxSxKxGxH.shape)
  for b in range(B):
    for k in range(K):
      for g in range(G):
        scores = q_BxSxKxGxH[b, :, k, g] @ k_BxTxKxH[b, :, k].T
        scores = np.where(allowed_BxSxT[b], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[b, :, k, g] = (probs / probs.sum(-1, keepdims=True)) @ v_BxTxKxH[b, :, k]
  return out


@pytest.mark.parametrize("transposed", [False, True])
def test_dense_and_its_backward_match_a_float64_reference(transposed):
  """`dense`'s hand-written backward against x @ w, g @ w.T and x.T @ g in float64 NumPy."""
  rng = np.random.default_rng(0)
  x_BxSxI = rng.standard_normal((2, 3, 4))
  w = rng.standard_normal((6, 4) if transposed else (4, 3, 2))  # [O, I], or [I, *O] with O = (3, 2).
  w_IxO = w.T if transposed else w.reshape(4, 6)
  g_NxO = rng.standard_normal((6, 6))
  y, vjp = jax.vjp(lambda x, w: dense(x, w, transposed=transposed),
                   jnp.asarray(x_BxSxI, jnp.float32), jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(g_NxO.reshape(y.shape), jnp.float32))
  x_NxI = x_BxSxI.reshape(6, 4)
  np.testing.assert_allclose(np.asarray(y).reshape(6, 6), x_NxI @ w_IxO, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), (g_NxO @ w_IxO.T).reshape(2, 3, 4), rtol=1e-5, atol=1e-5)
  dw_IxO = x_NxI.T @ g_NxO
  np.testing.assert_allclose(np.asarray(dw), dw_IxO.T if transposed else dw_IxO.reshape(w.shape),
                             rtol=1e-5, atol=1e-5)


def _attention_f64_grads(q_BxSxKxGxH, k_BxTxKxH, v_BxTxKxH, allowed_BxSxT, d_out):
  """Gradients of sum(attention * d_out) w.r.t. q, k, v in float64 NumPy (softmax's backward by hand)."""
  B, _, K, G, _ = q_BxSxKxGxH.shape
  dq, dk, dv = np.zeros(q_BxSxKxGxH.shape), np.zeros(k_BxTxKxH.shape), np.zeros(v_BxTxKxH.shape)
  for b in range(B):
    for k in range(K):
      for g in range(G):
        q, keys, values, do = q_BxSxKxGxH[b, :, k, g], k_BxTxKxH[b, :, k], v_BxTxKxH[b, :, k], d_out[b, :, k, g]
        scores = np.where(allowed_BxSxT[b], q @ keys.T, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        d_probs = do @ values.T
        d_scores = probs * (d_probs - np.sum(d_probs * probs, -1, keepdims=True))
        dq[b, :, k, g] = d_scores @ keys
        dk[b, :, k] += d_scores.T @ q
        dv[b, :, k] += probs.T @ do
  return dq, dk, dv


@pytest.mark.parametrize("chunk,unrolled_max_len", [(0, 1024), (64, 0)])
def test_causal_mask_blocks_match_a_float64_reference(chunk, unrolled_max_len, monkeypatch):
  """Attention under a per-token `CausalMask` (padding + packed segments) against float64 NumPy.

  S = 300 is no multiple of the 64-query blocks of `_causal_blockwise` (taken at any length here)
  nor of the 128 of the unchunked loop; row 0 packs two turns after a shared transcript, each
  reading the transcript up to its own reach, and row 1 is right-padded. Values and the gradients
  of q, k and v.
  """
  monkeypatch.setattr(transformer, "_UNROLLED_MAX_LEN", unrolled_max_len)
  rng = np.random.default_rng(5)
  B, S, K, G, H = 2, 300, 2, 2, 8
  q = rng.standard_normal((B, S, K, G, H)) * 0.7
  k, v = rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, H))
  valid_BxS = np.arange(S)[None] < np.array([[S], [233]])
  segments_BxS = np.zeros((B, S), np.int32)
  segments_BxS[0, 170:250], segments_BxS[0, 250:] = 1, 2
  reach_BxS = np.full((B, S), S, np.int32)
  reach_BxS[0, 170:250], reach_BxS[0, 250:] = 150, 97
  i, j = np.arange(S)[:, None], np.arange(S)[None, :]
  allowed = np.zeros((B, S, S), bool)  # The rule spelled out: causal, real key, transcript before reach or own turn.
  for b in range(B):
    seg, reach = segments_BxS[b], reach_BxS[b]
    packed = np.where(seg[None, :] == 0, j < reach[:, None], seg[None, :] == seg[:, None])
    allowed[b] = (j <= i) & valid_BxS[b][None, :] & packed
  mask = CausalMask(jnp.asarray(valid_BxS), jnp.asarray(segments_BxS), jnp.asarray(reach_BxS))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  d_out = rng.standard_normal(q.shape) * valid_BxS[:, :, None, None, None]  # Padding queries' outputs unread.

  got, vjp = jax.vjp(lambda *qkv: attention(*qkv, mask, chunk, causal=True), f32(q), f32(k), f32(v))
  np.testing.assert_allclose(np.asarray(got)[valid_BxS], _attention_f64(q, k, v, allowed)[valid_BxS],
                             atol=2e-5, rtol=0)
  for name, a, b in zip("qkv", vjp(f32(d_out)), _attention_f64_grads(q, k, v, allowed, d_out)):
    np.testing.assert_allclose(np.asarray(a), b, atol=5e-5, rtol=0, err_msg=f"d{name}")
  with pytest.raises(ValueError, match="CausalMask"):
    attention(f32(q), f32(k), f32(v), mask, chunk)


@pytest.mark.parametrize("chunk", [0, 100])
def test_causal_query_blocks_match_a_float64_reference(chunk):
  """S = 300 spans three causal query blocks (the last one short), rows right-padded.

  Each block reads only the keys up to its last query; the outputs at real queries and the
  gradients of a loss over them must equal full attention over all S keys.
  """
  rng = np.random.default_rng(11)
  B, S, K, G, H = 2, 300, 2, 2, 8
  q = rng.standard_normal((B, S, K, G, H)) * 0.5
  k, v = rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, H))
  real_BxS = np.arange(S)[None] < np.array([[S], [211]])
  allowed = np.tril(np.ones((S, S), bool))[None] & real_BxS[:, None, :]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = attention(f32(q), f32(k), f32(v), jnp.asarray(allowed), chunk, causal=True)
  want = _attention_f64(q, k, v, allowed)
  np.testing.assert_allclose(np.asarray(got)[real_BxS], want[real_BxS], atol=1e-5, rtol=0)

  weight = f32(rng.standard_normal(q.shape) * real_BxS[:, :, None, None, None])
  grad = lambda causal: jax.grad(
      lambda *qkv: jnp.sum(attention(*qkv, jnp.asarray(allowed), chunk, causal) * weight),
      argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
  for a, b in zip(grad(True), grad(False)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="causal"):
    attention(f32(q), f32(k[:, :10]), f32(v[:, :10]), jnp.asarray(allowed[:, :, :10]), causal=True)


def test_fresh_prefill_equals_appending_to_an_empty_cache():
  """`fresh=True` (attend within the chunk, one contiguous write) is the scatter path's result."""
  model = _model("qwen3")
  graphdef, state = nnx.split(model)
  ids = _ids(12, (3, 10))
  lengths = np.array([10, 7, 1])
  mask = jnp.asarray(np.arange(10)[None] < lengths[:, None], jnp.int32)

  @functools.partial(jax.jit, static_argnums=(0, 4))
  def prefill(graphdef, state, ids, cache, fresh):
    return nnx.merge(graphdef, state).hidden_states(ids, attention_mask=mask, cache=cache, fresh=fresh)

  cache = init_cache(model.config, 3, 16)
  want, want_cache = prefill(graphdef, state, ids, cache, False)
  got, got_cache = prefill(graphdef, state, ids, cache, True)
  real = np.arange(10)[None] < lengths[:, None]
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got_cache.lengths, lengths)
  np.testing.assert_array_equal(got_cache.lengths, want_cache.lengths)
  for got_kv, want_kv in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
    np.testing.assert_allclose(np.asarray(got_kv)[:, :10][real], np.asarray(want_kv)[:, :10][real],
                               atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="fresh"):
    model.hidden_states(ids, attention_mask=mask, cache=init_cache(model.config, 3, 8), fresh=True)


def test_config_from_dict_and_errors():
  cd = ml_collections.ConfigDict(dict(TINY, arch="llama", qk_norm=False, dtype="bfloat16"))
  config = ModelConfig.from_dict(cd)
  assert config.arch == "llama" and config.dtype == "bfloat16" and config.num_layers == 2
  assert ModelConfig(param_dtype=jnp.bfloat16).param_dtype == "bfloat16"
  hash(config)
  with pytest.raises(ValueError, match="hidden_sise"):
    ModelConfig.from_dict(dict(TINY, hidden_sise=3))
  with pytest.raises(ValueError, match="gpt2"):
    ModelConfig(arch="gpt2")
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="float16"):
    ModelConfig(dtype="float16")


def test_init_cache_shape():
  config = ModelConfig(**TINY)
  cache = init_cache(config, 3, 20)
  assert isinstance(cache, KVCache)
  # One [B, T, K, H] buffer per layer.
  assert len(cache.k) == len(cache.v) == 2 and cache.num_layers == 2
  assert all(a.shape == (3, 20, 2, 8) for a in cache.k + cache.v)
  assert cache.max_len == 20 and cache.batch_size == 3
  assert cache.lengths.dtype == jnp.int32 and not cache.lengths.any()


# Public Qwen3 config.json values (Qwen/Qwen3-0.6B and Qwen/Qwen3-8B).
QWEN3_0_6B = dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                  rms_norm_eps=1e-6, qk_norm=True, qkv_bias=False, tie_embeddings=True,
                  max_position_embeddings=40960, param_dtype="bfloat16", dtype="bfloat16")
QWEN3_8B = dict(QWEN3_0_6B, hidden_size=4096, intermediate_size=12288, num_layers=36,
                num_heads=32, num_kv_heads=8, tie_embeddings=False)


@pytest.mark.parametrize("fields,total_b,non_embedding_b", [
    (QWEN3_0_6B, 0.6, 0.44), (QWEN3_8B, 8.2, 6.95)])
def test_real_size_parameter_count(fields, total_b, non_embedding_b):
  """eval_shape (no allocation) of the real configs against a closed form and the model cards."""
  config = ModelConfig(**fields)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  count = sum(int(np.prod(leaf.shape)) for leaf in leaves)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
  V, D, F, L = (fields["vocab_size"], fields["hidden_size"], fields["intermediate_size"],
                fields["num_layers"])
  N, K, H = fields["num_heads"], fields["num_kv_heads"], fields["head_dim"]
  per_layer = (D * N * H + 2 * D * K * H + N * H * D  # q, k, v, o
               + 3 * D * F                            # gate, up, down
               + 2 * D + 2 * H)                       # two RMSNorms, q/k norms
  embeddings = V * D * (1 if fields["tie_embeddings"] else 2)
  assert count == embeddings + L * per_layer + D
  # The model cards' rounded figures ("0.6B, non-embedding 0.44B"; "8.2B, 6.95B").
  assert round(count / 1e9, 1) == total_b
  assert round((count - embeddings) / 1e9, 2) == non_embedding_b
