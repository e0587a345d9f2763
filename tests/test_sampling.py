"""Tests for sampling.py against a naive full-recompute reference written here in NumPy.

The tiny random model's weights are scaled up so that its next-token distributions are neither
flat (greedy ties) nor one-hot (nothing to sample): about 1.8 nats of entropy.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sage_opd_jax import models, sampling

VOCAB = 64


def _tiny_model(seed: int = 0) -> models.Transformer:
  config = models.ModelConfig.from_dict(dict(
      arch="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=False))
  graphdef, state = nnx.split(models.Transformer(config, rngs=nnx.Rngs(seed)))
  return nnx.merge(graphdef, jax.tree.map(lambda x: 5.0 * x, state))


@pytest.fixture(scope="module")
def model():
  return _tiny_model()


_REF_LEN = 64


@nnx.jit
def _full_forward(model, ids_1xS):
  return model(ids_1xS)


def _next_logits(model, context) -> np.ndarray:
  """float64 [V] logits for the token after `context`: a full forward pass, no cache.

  The context is right-padded to one length so that the reference compiles once; causal
  attention keeps the padding out of the logits at the context's last position.
  """
  assert len(context) <= _REF_LEN
  ids = np.zeros((1, _REF_LEN), np.int32)
  ids[0, :len(context)] = context
  return np.asarray(_full_forward(model, jnp.asarray(ids))[0, len(context) - 1], np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
  finite = np.isfinite(z)
  top = z[finite].max()
  out = np.full_like(z, -np.inf)
  out[finite] = z[finite] - top - np.log(np.exp(z[finite] - top).sum())
  return out


def _reference_logp(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                    allowed: set[int] | None = None) -> np.ndarray:
  """log-probs of the processed distribution: mask, temperature, top-k, top-p, renormalise."""
  z = logits.copy()
  if allowed is not None:
    z[[t for t in range(len(z)) if t not in allowed]] = -np.inf
  if temperature == 0.0:
    return _log_softmax(z)
  z = z / temperature
  if top_k:
    kth = np.sort(z)[::-1][top_k - 1]
    z[z < kth] = -np.inf
  if top_p < 1.0:
    order = np.argsort(-z)
    probs = np.exp(_log_softmax(z))[order]
    before = np.cumsum(probs) - probs
    keep = order[before < top_p]
    dropped = np.setdiff1d(np.arange(len(z)), keep)
    z[dropped] = -np.inf
  return _log_softmax(z)


def _naive_greedy(model, prompt, steps, stop=()):
  """Greedy decoding by a full forward pass per step; stops after a token in `stop`."""
  context, tokens, logps = list(prompt), [], []
  for _ in range(steps):
    logp = _log_softmax(_next_logits(model, context))
    token = int(np.argmax(logp))
    tokens.append(token)
    logps.append(logp[token])
    context.append(token)
    if token in stop:
      break
  return tokens, np.asarray(logps)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20]]


def test_greedy_equals_naive_full_recompute(model):
  steps = 10
  out = sampling.sample(model, PROMPTS, jax.random.key(0),
                        sampling.SamplingConfig(max_new_tokens=steps, temperature=0.0))
  for row, prompt in enumerate(PROMPTS):
    tokens, logps = _naive_greedy(model, prompt, steps)
    assert out.tokens[row].tolist() == tokens
    np.testing.assert_allclose(out.logprobs[row], logps, atol=1e-5)
    assert out.lengths[row] == steps and not out.stopped[row]


def _cached_logits(model, prompt, tokens) -> np.ndarray:
  """float64 [N, V]: the logits after `prompt + tokens[:k]`, k < N, through the KV cache.

  The sampler's own arithmetic (a fresh prefill of the prompt, then one cached decode step per
  token) run outside its loop: a second float32 evaluation of the logits `_next_logits` gives.
  """
  ids_1xP = np.zeros((1, sampling.bucket_length(len(prompt))), np.int32)
  ids_1xP[0, :len(prompt)] = prompt
  logits_V, cache = _cached_prefill(model, jnp.asarray(ids_1xP), len(prompt))
  logits = [logits_V]
  for token in tokens[:-1]:
    logits_V, cache = _cached_step(model, jnp.asarray([[token]], jnp.int32), cache)
    logits.append(logits_V)
  return np.asarray(jnp.stack(logits), np.float64)


@nnx.jit(static_argnums=2)
def _cached_prefill(model, ids_1xP, length):
  mask_1xP = (jnp.arange(ids_1xP.shape[1]) < length)[None].astype(jnp.int32)
  hidden_1xPxD, cache = model.hidden_states(ids_1xP, attention_mask=mask_1xP, fresh=True,
                                            cache=models.init_cache(model.config, 1, _REF_LEN))
  return model.lm_logits(hidden_1xPxD[:, length - 1:length])[0, 0], cache


@nnx.jit
def _cached_step(model, token_1x1, cache):
  logits_1x1xV, cache = model(token_1x1, attention_mask=jnp.ones((1, 1), jnp.int32), cache=cache)
  return logits_1x1xV[0, 0], cache


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.9)])
def test_sampled_logprobs_are_those_of_the_processed_distribution(model, temperature, top_k,
                                                                  top_p):
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=temperature, top_k=top_k,
                                   top_p=top_p)
  out = sampling.sample(model, PROMPTS, jax.random.key(3), config)
  got, want, wrong_temperature, unnormalised, noise, peak = [], [], [], [], 0.0, 0.0
  for row, prompt in enumerate(PROMPTS):
    tokens = out.tokens[row].tolist()
    cached_NxV = _cached_logits(model, prompt, tokens)
    for step, token in enumerate(tokens):
      logits = _next_logits(model, list(prompt) + tokens[:step])
      logp = _reference_logp(logits, temperature, top_k, top_p)
      assert np.isfinite(logp[token]), (row, step, "token outside the truncated support")
      got.append(out.logprobs[row, step])
      want.append(logp[token])
      wrong_temperature.append(_reference_logp(logits, 1.25 * temperature, top_k, top_p)[token])
      unnormalised.append(_log_softmax(logits / temperature)[token])
      noise = max(noise, np.abs(cached_NxV[step] - logits).max())
      peak = max(peak, np.abs(logits).max())
  got, want = np.asarray(got, np.float64), np.asarray(want)
  # The sampler's float32 logits come from its KV cache, the reference's from a full forward:
  # two float32 evaluations of the same logits, which differ by an amount that depends on the
  # kernels XLA picks on this machine. `noise` measures that spread on these very contexts
  # (cached path vs full forward), and log-softmax moves by at most 2 * |dz|_inf / T when the
  # support is kept; the last term is float32 rounding of the processing itself.
  tol = (2.0 * noise + 8.0 * np.finfo(np.float32).eps * peak) / temperature
  np.testing.assert_allclose(got, want, rtol=0, atol=tol)
  # The tolerance still separates the right distribution from the plausible wrong ones.
  assert np.abs(got - np.asarray(wrong_temperature)).max() > 10 * tol, "temperature unseen"
  if top_k or top_p < 1.0:
    assert np.abs(got - np.asarray(unnormalised)).max() > 10 * tol, "renormalisation unseen"


def test_sample_frequencies_follow_the_tempered_distribution(model):
  rows, temperature = 4096, 0.7
  prompt = [5, 9, 2]
  out = sampling.sample(model, [prompt] * rows, jax.random.key(7),
                        sampling.SamplingConfig(max_new_tokens=1, temperature=temperature),
                        min_len=16)
  probs = np.exp(_reference_logp(_next_logits(model, prompt), temperature, 0, 1.0))
  freq = np.bincount(out.tokens[:, 0], minlength=VOCAB) / rows
  # Five binomial standard deviations per token: a wrong temperature moves the mass far more.
  assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / rows) + 1e-3)
  # Rows share the key stream per step but must not share draws.
  assert len(set(out.tokens[:, 0].tolist())) > 1


STOP = (60, 61)


def _allowed_sets():
  """Per row: token sequences ending with STOP, with shared prefixes so the trie branches."""
  return [
      [[7, 8, *STOP], [7, 9, 10, *STOP], [11, *STOP]],
      None,
      [[30, *STOP], [31, 32, 33, 34, *STOP], [31, 32, 35, *STOP]],
  ]


def _prefix_children(seqs, emitted):
  return {s[len(emitted)] for s in seqs if s[:len(emitted)] == emitted and len(s) > len(emitted)}


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_constrained_decoding_emits_allowed_strings_with_renormalised_logprobs(model,
                                                                              temperature):
  allowed = _allowed_sets()
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=temperature)
  seen = set()
  for seed in range(4 if temperature else 1):
    out = sampling.sample(model, PROMPTS, jax.random.key(seed), config, allowed=allowed)
    for row, prompt in enumerate(PROMPTS):
      n = int(out.lengths[row])
      emitted = out.tokens[row, :n].tolist()
      if allowed[row] is not None:
        assert emitted in allowed[row] and out.stopped[row]
        seen.add(tuple(emitted))
        assert np.all(out.tokens[row, n:] == config.pad_id)
      context = list(prompt)
      for step, token in enumerate(emitted):
        children = (None if allowed[row] is None
                    else _prefix_children(allowed[row], emitted[:step]))
        logp = _reference_logp(_next_logits(model, context), temperature, 0, 1.0, children)
        if temperature == 0.0:
          assert token == int(np.argmax(logp))
        np.testing.assert_allclose(out.logprobs[row, step], logp[token], atol=5e-5)
        if children is not None and len(children) == 1:
          assert out.logprobs[row, step] == pytest.approx(0.0, abs=1e-6)
        context.append(token)
  if temperature:
    assert len(seen) >= 2  # sampling explores more than one allowed string


def test_constraint_trigger_starts_the_constraint_after_the_trigger(model):
  free = sampling.sample(model, PROMPTS, jax.random.key(0),
                         sampling.SamplingConfig(max_new_tokens=10, temperature=0.0))
  # The trigger is what row 0 emits freely at step 2 (not earlier), so it must run freely
  # for three tokens and then only emit an allowed string.
  trigger = int(free.tokens[0, 2])
  assert trigger not in free.tokens[0, :2].tolist()
  allowed = [[[7, 8, *STOP], [11, *STOP]], None, None]
  config = sampling.SamplingConfig(max_new_tokens=10, temperature=0.0,
                                   constraint_trigger=(trigger,))
  out = sampling.sample(model, PROMPTS, jax.random.key(0), config, allowed=allowed)
  n = int(out.lengths[0])
  assert out.tokens[0, :3].tolist() == free.tokens[0, :3].tolist()
  assert out.tokens[0, 3:n].tolist() in allowed[0] and out.stopped[0]
  np.testing.assert_array_equal(out.tokens[1:], free.tokens[1:])


def test_each_row_stops_on_its_own_at_eos_or_stop_sequence(model):
  steps = 10
  free = sampling.sample(model, PROMPTS, jax.random.key(0),
                         sampling.SamplingConfig(max_new_tokens=steps, temperature=0.0))
  eos = int(free.tokens[0, 3])
  stop_seq = tuple(int(t) for t in free.tokens[1, 4:6])
  config = sampling.SamplingConfig(max_new_tokens=steps, temperature=0.0, eos_ids=(eos,),
                                   stop_sequences=(stop_seq,), pad_id=VOCAB - 1)
  out = sampling.sample(model, PROMPTS, jax.random.key(0), config)
  for row in range(len(PROMPTS)):
    full = free.tokens[row].tolist()
    # Expected stop: the first EOS, or the first step completing the stop sequence.
    ends = [i for i, t in enumerate(full) if t == eos]
    ends += [i for i in range(1, steps) if tuple(full[i - 1:i + 1]) == stop_seq]
    expected = min(ends) + 1 if ends else steps
    assert out.lengths[row] == expected
    assert out.stopped[row] == bool(ends)
    assert out.tokens[row, :expected].tolist() == full[:expected]
    assert np.all(out.tokens[row, expected:] == VOCAB - 1)
    assert np.all(out.logprobs[row, expected:] == 0.0)
  assert out.lengths[0] <= 4 and out.lengths[1] <= 6


def _episode_turns(num_turns, seed):
  """Random observations (new tokens) per turn for three episodes of different shapes."""
  rng = np.random.default_rng(seed)
  header = [[1, 2, 3, 4], [5, 6], [7]]
  obs = [[rng.integers(0, VOCAB - 4, size=rng.integers(1, 7)).tolist() for _ in header]
         for _ in range(num_turns)]
  return header, obs


@pytest.mark.parametrize("history_turns", [None, 2])
def test_multi_turn_reuse_equals_reencoding_the_context(model, history_turns):
  """Greedy turns through one EpisodeCache equal fresh encodings of each turn's context.

  With a window, the context drops its oldest turn from turn 3 on: the cache must be rebuilt
  from the end of the shared header, exactly as a fresh encoding of the window would be.
  """
  num_turns = 4
  config = sampling.SamplingConfig(max_new_tokens=5, temperature=0.0, eos_ids=(3,))
  header, obs = _episode_turns(num_turns, seed=1)
  # One cache length for every call below keeps the number of compiles small.
  episodes = sampling.EpisodeCache(model, len(header), min_len=64)
  turns = [[] for _ in header]   # per episode, the token chunks of finished turns
  for t in range(num_turns):
    contexts = [sampling.windowed_context(header[e], turns[e] + [obs[t][e]], history_turns)
                for e in range(len(header))]
    out = episodes.generate(contexts, jax.random.key(t), config)
    fresh = sampling.sample(model, contexts, jax.random.key(t), config, min_len=64)
    assert episodes.max_len == 64
    np.testing.assert_array_equal(out.tokens, fresh.tokens)
    np.testing.assert_array_equal(out.lengths, fresh.lengths)
    # Chunked and one-shot encodings sum in different orders: float32 noise only.
    np.testing.assert_allclose(out.logprobs, fresh.logprobs, atol=5e-5)
    for e in range(len(header)):
      response = out.tokens[e, :out.lengths[e]].tolist()
      sliding = history_turns is not None and t >= history_turns
      if t == 0:
        assert out.appended[e] == len(contexts[e])
      elif not sliding:
        # Only the new observation is encoded; the history comes from the cache.
        assert out.appended[e] == len(obs[t][e])
      else:
        # The window slid: everything after the shared header is re-encoded.
        assert out.appended[e] == len(contexts[e]) - len(header[e])
      turns[e].append(obs[t][e] + response)
  # The greedy tokens themselves equal the naive reference on the last context.
  last = sampling.windowed_context(header[0], turns[0], history_turns)
  tokens, _ = _naive_greedy(model, last[:-int(out.lengths[0])], config.max_new_tokens, (3,))
  assert tokens == out.tokens[0, :out.lengths[0]].tolist()


def test_finished_episodes_release_rows_and_compact(model):
  config = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0)
  prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
  episodes = sampling.EpisodeCache(model, 4, min_len=16)
  assert episodes.batch_size == 4
  first = episodes.generate(prompts, jax.random.key(0), config)
  contexts = [None, prompts[1] + first.tokens[1].tolist() + [11], None,
              prompts[3] + first.tokens[3].tolist() + [12, 13]]
  out = episodes.generate(contexts, jax.random.key(1), config)
  assert episodes.batch_size == 2
  assert out.lengths[0] == 0 and out.lengths[2] == 0
  np.testing.assert_array_equal(out.appended, [0, 1, 0, 2])
  for e in (1, 3):
    tokens, _ = _naive_greedy(model, contexts[e], config.max_new_tokens)
    assert out.tokens[e].tolist() == tokens
  with pytest.raises(ValueError, match=r"contexts\[0\]"):
    episodes.generate([[1], None, None, None], jax.random.key(2), config)


def test_sharded_params_sample_the_same_tokens(model):
  """Params over a (data, fsdp, tensor) = (2, 2, 2) mesh of the 8 fake devices, batch split."""
  from sage_opd_jax.models import sharding  # pylint: disable=g-import-not-at-top

  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = sharding.shard_model(_tiny_model(), mesh)
  assert not sharded.layers.q_proj[...].sharding.is_fully_replicated
  config = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0)
  plain = sampling.EpisodeCache(model, len(PROMPTS), min_len=32)
  split = sampling.EpisodeCache(sharded, len(PROMPTS), min_len=32, min_batch=4,
                                batch_sharding=sharding.batch_sharding(mesh))
  contexts = [list(p) for p in PROMPTS]
  for turn in range(2):
    want = plain.generate(contexts, jax.random.key(turn), config)
    got = split.generate(contexts, jax.random.key(turn), config)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=5e-5)
    contexts = [c + want.tokens[e, :want.lengths[e]].tolist() + [9, 10]
                for e, c in enumerate(contexts)]


def test_a_trie_pads_to_the_given_floor_and_decodes_the_same(model):
  allowed = _allowed_sets()
  tight = sampling.build_token_trie(allowed, VOCAB)
  padded = sampling.build_token_trie(allowed, VOCAB, min_nodes=64, min_width=8)
  nodes, width = tight.child_tokens.shape
  assert padded.child_tokens.shape == (64, 8) and nodes < 64 and width < 8
  for name in ("child_tokens", "child_nodes"):
    got = getattr(padded, name)
    np.testing.assert_array_equal(got[:nodes, :width], getattr(tight, name))
    assert np.all(got[nodes:] == -1) and np.all(got[:, width:] == -1)
  np.testing.assert_array_equal(padded.terminal[:nodes], tight.terminal)
  assert not padded.terminal[nodes:].any()
  # An EpisodeCache pads each trie to the largest it built: a later turn with smaller tries compiles nothing new.
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
  small = [[[11, *STOP]], None, [[30, *STOP]]]
  warm = sampling.EpisodeCache(model, len(PROMPTS))
  for _ in range(2):  # Compiles the fresh and the cached-prefix call with the large tries.
    warm.generate(PROMPTS, jax.random.key(0), config, allowed=allowed)
  cache = sampling.EpisodeCache(model, len(PROMPTS))
  cache.generate(PROMPTS, jax.random.key(0), config, allowed=allowed)
  before = sampling.compile_count()
  out = cache.generate(PROMPTS, jax.random.key(0), config, allowed=small)
  assert sampling.compile_count() == before
  assert out.tokens[0, :int(out.lengths[0])].tolist() == [11, *STOP]


def test_bucketing_bounds_the_number_of_compiles(model):
  config = sampling.SamplingConfig(max_new_tokens=2, temperature=0.0, eos_ids=(0,))
  lengths = range(1, 41, 3)
  before = sampling.compile_count()
  for n in lengths:
    sampling.sample(model, [list(range(1, n + 1)), [5]], jax.random.key(0), config)
  compiles = sampling.compile_count() - before
  buckets = {sampling.bucket_length(n) for n in lengths}
  assert 1 <= compiles <= len(buckets) < len(lengths)


def test_greedy_token_is_numpys_first_maximum():
  """Integer-valued logits (many ties) with masked -inf entries, against np.argmax."""
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 3, size=(64, 37)).astype(np.float32)
  logits[rng.random(logits.shape) < 0.3] = -np.inf
  logits[0] = -np.inf
  logits[0, 36] = 0.0   # a row whose only allowed token is the last one
  got = sampling.greedy_token(jnp.asarray(logits))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


def test_bucket_length_is_a_tight_upper_bound():
  for n, minimum in itertools.product(range(0, 3000, 7), (1, 16)):
    size = sampling.bucket_length(n, minimum)
    assert size >= max(n, minimum)
    assert n <= minimum or size <= 1.5 * n + 1
  # Two buckets per octave from 16 to 4096.
  assert len({sampling.bucket_length(n) for n in range(1, 4097)}) == 2 * 8 + 1


def test_token_trie_rejects_bad_sets():
  with pytest.raises(ValueError, match=r"allowed\[0\]\[1\] is a proper prefix"):
    sampling.build_token_trie([[[1, 2, 3], [1, 2]]], VOCAB)
  with pytest.raises(ValueError, match=r"allowed\[0\]\[1\] extends"):
    sampling.build_token_trie([[[1, 2], [1, 2, 3]]], VOCAB)
  with pytest.raises(ValueError, match=r"allowed\[1\]\[0\] has tokens outside"):
    sampling.build_token_trie([None, [[VOCAB]]], VOCAB)
  with pytest.raises(ValueError, match=r"allowed\[0\] is an empty set"):
    sampling.build_token_trie([[]], VOCAB)


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -1), ("top_p", 0.0)])
def test_sampling_config_names_the_bad_field(field, value):
  kwargs = dict(max_new_tokens=4)
  kwargs[field] = value
  with pytest.raises(ValueError, match=field):
    sampling.SamplingConfig(**kwargs)


def _absent_tokens(model, config, seeds, count):
  """`count` token ids that no row emits in its first `config.max_new_tokens` free tokens."""
  emitted = set()
  for seed in seeds:
    emitted |= set(sampling.sample(model, PROMPTS, jax.random.key(seed), config).tokens.ravel().tolist())
  absent = [t for t in range(VOCAB) if t not in emitted and t not in STOP]
  assert len(absent) >= count
  return tuple(absent[:count])


# The budget binds (sampled; greedy with a two-token trigger), or the room left does (budget 100).
@pytest.mark.parametrize("temperature,steps,budget,trigger_len", [(1.0, 12, 3, 1), (0.0, 12, 2, 2),
                                                                  (1.0, 10, 100, 1)])
def test_thought_budget_forces_the_trigger_then_an_allowed_string(model, temperature, steps, budget,
                                                                  trigger_len):
  # The trigger is made of tokens the model never emits freely here, so without the budget no
  # constrained row would ever reach its constraint (checked below).
  free_config = sampling.SamplingConfig(max_new_tokens=steps, temperature=temperature)
  seeds = range(3 if temperature else 1)
  trigger = _absent_tokens(model, free_config, seeds, trigger_len)
  allowed = _allowed_sets()
  config = sampling.SamplingConfig(max_new_tokens=steps, temperature=temperature,
                                   constraint_trigger=trigger, max_thought_tokens=budget)
  for seed in seeds:
    free = sampling.sample(model, PROMPTS, jax.random.key(seed), free_config)
    out = sampling.sample(model, PROMPTS, jax.random.key(seed), config, allowed=allowed)
    unbudgeted = sampling.sample(model, PROMPTS, jax.random.key(seed), sampling.SamplingConfig(
        max_new_tokens=steps, temperature=temperature, constraint_trigger=trigger), allowed=allowed)
    for row, prompt in enumerate(PROMPTS):
      n = int(out.lengths[row])
      emitted = out.tokens[row, :n].tolist()
      if allowed[row] is None:
        assert emitted == free.tokens[row, :n].tolist()
        continue
      # The thought runs to the budget, or until only the trigger and the longest string still fit.
      thought = min(budget, steps - len(trigger) - max(map(len, allowed[row])))
      assert emitted[:thought] == free.tokens[row, :thought].tolist()
      assert tuple(emitted[thought:thought + len(trigger)]) == trigger
      assert emitted[thought + len(trigger):] in allowed[row] and out.stopped[row] and n <= steps
      assert unbudgeted.lengths[row] == steps and not unbudgeted.stopped[row]
      context = list(prompt)
      for step, token in enumerate(emitted):
        if step < thought:
          children = None
        elif step < thought + len(trigger):
          children = {trigger[step - thought]}
        else:
          children = _prefix_children(allowed[row], emitted[thought + len(trigger):step])
        logp = _reference_logp(_next_logits(model, context), temperature, 0, 1.0, children)
        if temperature == 0.0:
          assert token == int(np.argmax(logp))
        np.testing.assert_allclose(out.logprobs[row, step], logp[token], atol=5e-5)
        if children is not None and len(children) == 1:
          assert out.logprobs[row, step] == 0.0
        context.append(token)


def test_thought_budget_rows_end_only_in_an_allowed_string(model):
  # EOS and a stop text that the rows emit early in their free thought: under a budget a thinking
  # row ignores both (it would end the turn with no action); an unconstrained row still stops.
  free_config = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0)
  free = sampling.sample(model, PROMPTS, jax.random.key(0), free_config)
  allowed = _allowed_sets()
  in_actions = {t for seqs in allowed if seqs for seq in seqs for t in seq}
  early = [t for t in free.tokens[:, :3].ravel().tolist() if t not in in_actions]
  eos, stop = early[0], next(t for t in early if t != early[0])
  config = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0, eos_ids=(eos,), stop_sequences=((stop,),),
                                   constraint_trigger=_absent_tokens(model, free_config, [0], 1),
                                   max_thought_tokens=4)
  out = sampling.sample(model, PROMPTS, jax.random.key(0), config, allowed=allowed)
  met = []
  for row in range(len(PROMPTS)):
    emitted = out.tokens[row, :int(out.lengths[row])].tolist()
    if allowed[row] is None:
      ends = [i + 1 for i, t in enumerate(free.tokens[row].tolist()) if t in (eos, stop)]
      assert emitted == free.tokens[row, :min(ends, default=12)].tolist()
    else:
      met.append(bool({eos, stop} & set(emitted[:4])))
      assert emitted[4 + 1:] in allowed[row] and out.stopped[row], (row, emitted)
  assert any(met), "no constrained row met its EOS or stop text while thinking"


def test_thought_budget_needs_a_trie_built_with_the_trigger(model):
  config = sampling.SamplingConfig(max_new_tokens=8, constraint_trigger=(5,), max_thought_tokens=2)
  trie = sampling.build_token_trie([[[7, *STOP]]], VOCAB)
  graphdef, state = nnx.split(model)
  cache = models.init_cache(model.config, 1, 32)
  with pytest.raises(ValueError, match="build_token_trie"):
    sampling.generate(graphdef, state, cache, jnp.asarray([[1, 2]]), jnp.asarray([2]), jnp.asarray([True]),
                      jax.random.key(0), config=config, trie=trie)


def test_budget_roots_chain_the_trigger_into_each_constrained_row():
  trie = sampling.build_token_trie([[[7, *STOP], [8, 9, *STOP]], None], VOCAB, trigger=(3, 4))
  assert trie.budget_roots[1] == -1 and trie.budget_lengths.tolist() == [2 + 4, 0]
  node, path = int(trie.budget_roots[0]), []
  for _ in range(2):
    (edge,) = np.flatnonzero(trie.child_tokens[node] >= 0)
    path.append(int(trie.child_tokens[node, edge]))
    node = int(trie.child_nodes[node, edge])
  assert path == [3, 4] and node == trie.roots[0]
  with pytest.raises(ValueError, match="trigger has tokens outside"):
    sampling.build_token_trie([[[7]]], VOCAB, trigger=(VOCAB,))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_thought_tokens=-1, constraint_trigger=(5,)), "max_thought_tokens must be >= 0"),
    (dict(max_thought_tokens=4), "set the trigger")])
def test_sampling_config_rejects_a_bad_thought_budget(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.SamplingConfig(max_new_tokens=8, **kwargs)


def test_blocked_cdf_equals_the_cumsum_and_draws_only_supported_ids():
  """Vocabularies past one block (Qwen3's 151,936) take `_cumsum_last`'s blocked path."""
  rng = np.random.default_rng(0)
  probs = rng.random((3, 5000)).astype(np.float32)
  probs[:, 1::2] = 0.0  # Every other id has no mass, block edges included.
  np.testing.assert_allclose(sampling._cumsum_last(jnp.asarray(probs)), np.cumsum(probs.astype(np.float64), -1),
                             rtol=1e-5)
  logits = jnp.asarray(np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -np.inf), jnp.float32)
  config = sampling.SamplingConfig(max_new_tokens=1, temperature=1.0)
  tokens = np.stack([np.asarray(sampling._choose(logits, jax.random.PRNGKey(i), config)[0]) for i in range(50)])
  assert (tokens % 2 == 0).all() and len(np.unique(tokens)) > 40
