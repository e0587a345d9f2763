"""HF weights in and out: parity with transformers' PyTorch models, round trips, sharding, errors."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from sage_opd_jax.models import (ModelConfig, Transformer, batch_sharding, cache_sharding,
                                 create_model, init_cache, load_hf_checkpoint, load_tokenizer,
                                 make_mesh, save_hf_checkpoint)

VOCAB = 300
# (arch, transformers config class, tied embeddings)
ARCHS = {"qwen3": (transformers.Qwen3Config, True), "qwen2": (transformers.Qwen2Config, False),
         "llama": (transformers.LlamaConfig, False)}


def _hf_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
  config_cls, tied = ARCHS[arch]
  kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=tied, rope_theta=50_000.0, rms_norm_eps=1e-6)
  if arch != "qwen2":  # Qwen2Config derives head_dim = hidden / heads
    kwargs["head_dim"] = 16
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs),
                                                        dtype=torch.float32).eval()
  with torch.no_grad():
    # HF initialises norms to 1 and biases to 0, which would hide a swapped or dropped
    # norm/bias in the key map: randomise every tensor.
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0.0, 0.1)
      else:
        p.uniform_(0.5, 1.5)
  return model


def _torch_logits(model, ids, mask=None) -> np.ndarray:
  with torch.no_grad():
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(np.asarray(mask))}
    return model(torch.tensor(np.asarray(ids)), **kwargs).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _fwd(graphdef, state, ids, mask=None):
  return nnx.merge(graphdef, state)(ids, attention_mask=mask)


@functools.partial(jax.jit, static_argnums=0)
def _fwd_cache(graphdef, state, ids, cache):
  return nnx.merge(graphdef, state)(ids, cache=cache)


def _logits(model, ids, mask=None) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_fwd(graphdef, state, jnp.asarray(ids), mask if mask is None
                         else jnp.asarray(mask)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """arch -> (torch model, saved checkpoint dir)."""
  out = {}
  for arch in ARCHS:
    model = _hf_model(arch)
    path = str(tmp_path_factory.mktemp(arch))
    model.save_pretrained(path)
    out[arch] = (model, path)
  return out


def _ids(seed, shape):
  return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_with_transformers(hf_dirs, arch):
  torch_model, path = hf_dirs[arch]
  model = load_hf_checkpoint(path)
  assert model.config.arch == arch and model.config.tie_embeddings == ARCHS[arch][1]
  assert model.config.rope_theta == 50_000.0
  ids = _ids(1, (2, 13))
  np.testing.assert_allclose(_logits(model, ids), _torch_logits(torch_model, ids),
                             atol=1e-4, rtol=0)
  # Right-padded row 0 and left-padded row 1: compare real positions only (HF, like us,
  # uses arange positions when none are given).
  mask = np.ones((2, 13), np.int32)
  mask[0, 9:] = 0
  mask[1, :4] = 0
  got, want = _logits(model, ids, mask), _torch_logits(torch_model, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_round_trip_through_transformers(hf_dirs, arch, tmp_path):
  _, path = hf_dirs[arch]
  model = load_hf_checkpoint(path)
  # Train-like perturbation so the round trip cannot pass by re-reading the source files.
  model.layers.q_proj[...] = model.layers.q_proj[...] * 1.5
  save_hf_checkpoint(model, tmp_path / "out", source=path)
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert type(reloaded).__name__ == type(hf_dirs[arch][0]).__name__
  ids = _ids(2, (2, 9))
  ours = _logits(model, ids)
  np.testing.assert_allclose(_torch_logits(reloaded.eval(), ids), ours, atol=1e-4, rtol=0)
  again = load_hf_checkpoint(tmp_path / "out")
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(a, b)


def test_sharded_index_both_ways(hf_dirs, tmp_path):
  """Reads HF's own multi-file index, and writes one that transformers reads."""
  torch_model, _ = hf_dirs["llama"]
  torch_model.save_pretrained(tmp_path / "hf_sharded", max_shard_size="60KB")
  files = os.listdir(tmp_path / "hf_sharded")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  model = load_hf_checkpoint(tmp_path / "hf_sharded")
  ids = _ids(3, (1, 7))
  ours = _logits(model, ids)
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=0)

  save_hf_checkpoint(model, tmp_path / "ours_sharded", max_shard_bytes=60_000)
  files = os.listdir(tmp_path / "ours_sharded")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "ours_sharded"), dtype=torch.float32).eval()
  np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("axes", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_forward_equals_unsharded(hf_dirs, axes, tmp_path):
  assert len(jax.devices()) == 8
  _, path = hf_dirs["qwen3"]
  mesh = make_mesh(axes)
  sharded = load_hf_checkpoint(path, mesh=mesh)
  q_proj = sharded.layers.q_proj[...]
  assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  # Each device holds only its block: [L, D/fsdp, N/tensor, H].
  shard_shape = q_proj.addressable_shards[0].data.shape
  assert shard_shape == (2, 64 // axes["fsdp"], 4 // axes["tensor"], 16)
  ids = _ids(4, (8, 10))
  want = _logits(load_hf_checkpoint(path), ids)
  graphdef, state = nnx.split(sharded)
  got = _fwd(graphdef, state, jax.device_put(jnp.asarray(ids), batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  # The cached path on a sharded cache: a prefill of 6 then a chunk of 4.
  cache = jax.device_put(init_cache(sharded.config, 8, 12),
                         cache_sharding(sharded.config, mesh))
  assert cache.k[0].addressable_shards[0].data.shape == (8 // (8 // axes["tensor"]), 12,
                                                         2 // axes["tensor"], 16)
  logits = []
  for part in (ids[:, :6], ids[:, 6:]):
    out, cache = _fwd_cache(graphdef, state, jax.device_put(jnp.asarray(part),
                                                            batch_sharding(mesh)), cache)
    logits.append(np.asarray(out))
  np.testing.assert_allclose(np.concatenate(logits, 1), want, atol=1e-5, rtol=0)
  # Saving gathers the shards back into the original tensors.
  save_hf_checkpoint(sharded, tmp_path / "from_sharded")
  want_tensors = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
  got_tensors = safetensors.numpy.load_file(str(tmp_path / "from_sharded/model.safetensors"))
  assert set(got_tensors) == set(want_tensors)
  for key, value in want_tensors.items():
    np.testing.assert_array_equal(got_tensors[key], value, err_msg=key)


def test_create_model_on_mesh():
  config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_heads=4,
                       num_kv_heads=2, head_dim=8, tie_embeddings=False)
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  model = create_model(config, mesh, seed=3)
  P = jax.sharding.PartitionSpec
  expected = {"embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"),
              "final_norm": P(None)}
  for name, spec in expected.items():
    assert getattr(model, name)[...].sharding.spec == spec, name
  assert model.layers.down_proj[...].sharding.spec == P(None, "tensor", "fsdp")
  assert model.layers.down_proj[...].addressable_shards[0].data.shape == (2, 32, 8)
  np.testing.assert_array_equal(model.final_norm[...], np.ones(32, np.float32))
  embed = np.asarray(model.embed[...])
  assert 0.015 < embed.std() < 0.025  # the documented N(0, 0.02) init
  other = create_model(config, mesh, seed=4)
  assert not np.allclose(np.asarray(other.embed[...]), embed)
  with pytest.raises(ValueError, match="kv_heads=2.*tensor"):
    create_model(config, make_mesh({"tensor": 8}))
  with pytest.raises(ValueError, match="need 6 devices"):
    make_mesh({"fsdp": 3, "tensor": 2})
  with pytest.raises(ValueError, match="model"):
    make_mesh({"model": 8})


def test_bf16_checkpoint_and_bf16_compute(tmp_path):
  bf16_model = _hf_model("qwen2").to(torch.bfloat16)
  bf16_model.save_pretrained(tmp_path / "bf16")
  # bf16 weights read exactly and computed in fp32: matches torch fp32 on the same weights.
  model = load_hf_checkpoint(tmp_path / "bf16", dtype="float32")
  assert model.layers.q_proj[...].dtype == jnp.float32
  ids = _ids(5, (2, 9))
  # A fresh fp32 load: bf16_model.float() would keep RoPE's bf16-rounded inv_freq buffer.
  want = _torch_logits(transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "bf16"), dtype=torch.float32).eval(), ids)
  np.testing.assert_allclose(_logits(model, ids), want, atol=1e-4, rtol=0)
  # bf16 params and compute against fp32 compute on the same bf16 weights (`want`): the difference
  # is the bf16 compute alone, a few bf16 roundings (relative 2^-8 each) of the logits' scale
  # through the 2 layers, as tests/test_models.py bounds it. Logits stay fp32.
  bf16 = load_hf_checkpoint(tmp_path / "bf16", dtype="bfloat16")
  assert bf16.layers.q_proj[...].dtype == jnp.bfloat16
  got = _logits(bf16, ids)
  assert got.dtype == np.float32
  bound = 6 * 2.0**-8 * np.abs(want).max()
  assert np.abs(got - want).max() < bound, (np.abs(got - want).max(), bound)
  save_hf_checkpoint(bf16, tmp_path / "bf16_out")
  with open(tmp_path / "bf16_out/config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16_out"))
  assert reloaded.dtype == torch.bfloat16


def test_a_checkpoint_runs_with_the_configs_runtime_fields(hf_dirs):
  from configs import base  # pylint: disable=g-import-not-at-top
  from sage_opd_jax import train  # pylint: disable=g-import-not-at-top

  torch_model, path = hf_dirs["qwen3"]
  section = base.get_config().teacher
  section.hf_dir = path
  section.model.update(dtype="bfloat16", param_dtype="bfloat16", remat=True, attention_chunk=4,
                       scan_unroll=2, num_layers=7)
  model = train.load_model(section, None, seed=0)
  config = model.config
  assert (config.dtype, config.param_dtype, config.remat, config.attention_chunk, config.scan_unroll) == (
      "bfloat16", "bfloat16", True, 4, 2)
  assert config.num_layers == torch_model.config.num_hidden_layers  # The architecture is the checkpoint's.
  assert model.layers.q_proj[...].dtype == jnp.bfloat16
  ids = _ids(7, (2, 9))
  # Against fp32 compute on the same bf16-rounded weights: the bf16 compute's few roundings
  # (test_bf16_checkpoint_and_bf16_compute's bound).
  graphdef, state = nnx.split(load_hf_checkpoint(path, dtype="float32"))
  want = _logits(nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), state)), ids)
  assert np.abs(_logits(model, ids) - want).max() < 6 * 2.0**-8 * np.abs(want).max()


# ----------------------------------------------------------------------------- errors


def _copy(path, tmp_path, name="bad"):
  dst = tmp_path / name
  shutil.copytree(path, dst)
  return dst


def _rewrite_tensors(ckpt, edit):
  file = os.path.join(ckpt, "model.safetensors")
  tensors = edit(safetensors.numpy.load_file(file))
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_error_nonexistent_path(tmp_path):
  missing = str(tmp_path / "no_such_ckpt")
  with pytest.raises(ValueError, match="no_such_ckpt"):
    load_hf_checkpoint(missing)


def test_error_unsupported_architecture(hf_dirs, tmp_path):
  ckpt = _copy(hf_dirs["llama"][1], tmp_path)
  with open(ckpt / "config.json") as f:
    config = json.load(f)
  config["model_type"] = "gpt_neox"
  with open(ckpt / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="gpt_neox"):
    load_hf_checkpoint(ckpt)
  with pytest.raises(ValueError, match="mistral"):
    ModelConfig.from_hf(transformers.MistralConfig())


def test_error_unsupported_rope_scaling():
  config = transformers.LlamaConfig(rope_parameters={
      "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
  with pytest.raises(ValueError, match="llama3"):
    ModelConfig.from_hf(config)


def test_error_missing_tensor(hf_dirs, tmp_path):
  ckpt = _copy(hf_dirs["qwen3"][1], tmp_path)
  _rewrite_tensors(ckpt, lambda t: {k: v for k, v in t.items()
                                    if k != "model.layers.1.self_attn.k_norm.weight"})
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_norm\.weight"):
    load_hf_checkpoint(ckpt)


def test_error_extra_tensor(hf_dirs, tmp_path):
  ckpt = _copy(hf_dirs["llama"][1], tmp_path)
  _rewrite_tensors(ckpt, lambda t: {**t, "model.layers.0.self_attn.q_norm.weight":
                                    np.ones(16, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_norm"):
    load_hf_checkpoint(ckpt)


def test_error_shape_mismatch(hf_dirs, tmp_path):
  ckpt = _copy(hf_dirs["qwen2"][1], tmp_path)
  key = "model.layers.0.mlp.up_proj.weight"
  _rewrite_tensors(ckpt, lambda t: {**t, key: np.zeros((95, 64), np.float32)})
  with pytest.raises(ValueError, match=r"up_proj\.weight.*\(95, 64\).*\(96, 64\)"):
    load_hf_checkpoint(ckpt)


def test_error_tied_checkpoint_with_different_lm_head(hf_dirs, tmp_path):
  ckpt = _copy(hf_dirs["qwen3"][1], tmp_path)
  _rewrite_tensors(ckpt, lambda t: {**t, "lm_head.weight": np.zeros((VOCAB, 64), np.float32)})
  with pytest.raises(ValueError, match="lm_head.weight"):
    load_hf_checkpoint(ckpt)


def test_error_saving_config_hf_cannot_express(tmp_path):
  config = ModelConfig(arch="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                       num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="qk_norm"):
    save_hf_checkpoint(model, tmp_path / "out")


# ----------------------------------------------------------------------------- tokenizer


def _save_tiny_tokenizer(path, chat_template):
  import tokenizers  # pylint: disable=g-import-not-at-top

  words = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "go", "north"]
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="<pad>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                             eos_token="<eos>")
  if chat_template:
    tok.chat_template = chat_template
  tok.save_pretrained(path)


def test_load_tokenizer_with_chat_template(tmp_path):
  template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
              "<|im_end|> {% endfor %}")
  _save_tiny_tokenizer(tmp_path / "tok", template)
  tok = load_tokenizer(tmp_path / "tok")
  text = tok.apply_chat_template([{"role": "user", "content": "go north"}], tokenize=False)
  assert text == "<|im_start|> user go north <|im_end|> "
  assert tok.encode("go north", add_special_tokens=False) == [6, 7]

  _save_tiny_tokenizer(tmp_path / "plain", None)
  with pytest.raises(ValueError, match="chat_template"):
    load_tokenizer(tmp_path / "plain")
  assert load_tokenizer(tmp_path / "plain", require_chat_template=False).eos_token == "<eos>"
  with pytest.raises(ValueError, match="nowhere"):
    load_tokenizer(tmp_path / "nowhere")


def test_from_hf_reads_a_published_qwen3_config_json(tmp_path):
  """The Qwen/Qwen3-0.6B config.json as published (transformers 4.51 layout: top-level
  rope_theta, rope_scaling null), read through transformers 5."""
  published = {
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
      "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
      "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
      "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
      "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
      "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
      "vocab_size": 151936}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(published, f)
  config = ModelConfig.from_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  assert config == ModelConfig(
      arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
      num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
      qk_norm=True, qkv_bias=False, tie_embeddings=True, max_position_embeddings=40960,
      param_dtype="bfloat16", dtype="bfloat16")
