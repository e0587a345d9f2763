"""Tests of the rollout engine on the real ALFWorld engine (fixture games) and a tiny model.

The env workers play the hand-written fixture games of `tests/fixtures/alfworld/`; the model is
a tiny random Qwen3-shaped Transformer over the project's ALFWorld word-level tokenizer, built
from the fixture games. Reference log-probs are recomputed here with a plain full forward pass
(no cache) and a float64 NumPy log-softmax.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from sage_opd_jax import losses, models, prompts, rollout, sampling, teacher, tokenization, train, update
from sage_opd_jax.envs import NOTHING_HAPPENS, base
from sage_opd_jax.envs.alfworld import AlfworldEnv

FIXTURE_DATA = pathlib.Path(__file__).resolve().parent / "fixtures" / "alfworld"
_MODULE = __name__  # Crash-test workers import this module to register "alfworld_crash_test".
MAX_NEW = 16
# Trial a's winning commands (tests/fixtures/make_alfworld_fixture.py).
WALKTHROUGH_A = ("go to diningtable 1", "take apple 1 from diningtable 1", "go to countertop 1",
                 "move apple 1 to countertop 1")


@base.register("alfworld_crash_test")
class CrashingAlfworld(AlfworldEnv):
  """ALFWorld whose worker process dies (as a native crash would) on the command "inventory"."""

  def step(self, action_text):
    if action_text == "inventory":
      os._exit(7)
    return super().step(action_text)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tokenization.build_alfworld_tokenizer(FIXTURE_DATA, tmp_path_factory.mktemp("tok") / "t")
  return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def model(tok):
  config = models.ModelConfig.from_dict(dict(
      arch="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=False))
  graphdef, state = nnx.split(models.Transformer(config, rngs=nnx.Rngs(0)))
  # Sharper than at init, so that sampled responses differ visibly between keys.
  return nnx.merge(graphdef, jax.tree.map(lambda x: 3.0 * x, state))


@pytest.fixture(scope="module")
def env_kwargs(tmp_path_factory):
  # facts=True for the shadow expert's test.
  return dict(data_dir=str(FIXTURE_DATA), cache_dir=str(tmp_path_factory.mktemp("grounding")),
              facts=True)


@pytest.fixture(scope="module")
def tasks(env_kwargs):
  env = AlfworldEnv(**env_kwargs)
  by_trial = {t.meta["trial"]: t for t in env.tasks("valid_seen") + env.tasks("train")}
  env.close()
  return [by_trial["trial_fixture_a"], by_trial["trial_fixture_b"], by_trial["trial_fixture_c"]]


def _config(**overrides) -> rollout.RolloutConfig:
  # One chunk width and one cache length for every call: each new shape is a compile (seconds).
  return rollout.RolloutConfig(**{**dict(max_turns=3, history_turns=None, progress=False,
                                         min_cache_len=1024, min_chunk_len=256), **overrides})


@pytest.fixture(scope="module")
def engine(tok, env_kwargs):
  with rollout.RolloutEngine(tok, _config(), rollout.default_sampling_config(tok, MAX_NEW),
                             env_name="alfworld", env_kwargs=env_kwargs, num_workers=2,
                             timeout_s=60.0) as eng:
    yield eng


# The sampler's float32 log-probs (cached decode) against one float32 full forward: the same sums
# in another order, which moved them by <= 2e-5 at this model's max|logit| ~5 (keys 1, 11, 21).
# The plausible wrong answers of `_assert_wrong_answers_miss` miss by 3e-3 to 2e-1.
LOGPROB_ATOL = 2e-4


def _logprobs(logits_SxV, ids) -> np.ndarray:
  """[len(ids)] float64 log-softmax: entry s = log p(ids[s] | ids[:s]); entry 0 is 0."""
  logits_SxV = np.asarray(logits_SxV, np.float64)
  top = logits_SxV.max(-1, keepdims=True)
  logp = logits_SxV - top - np.log(np.exp(logits_SxV - top).sum(-1, keepdims=True))
  out = np.zeros(len(ids))
  out[1:] = logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
  return out


def _full_logits(model, ids) -> np.ndarray:
  return np.asarray(model(jnp.asarray([list(ids)], jnp.int32))[0])


def _reference_logprobs(model, ids) -> np.ndarray:
  """[len(ids)] float64: entry s = log p(ids[s] | ids[:s]) by one full forward; entry 0 is 0."""
  return _logprobs(_full_logits(model, ids), ids)


def _assert_wrong_answers_miss(model, ids, where, got):
  """`LOGPROB_ATOL` tells `got` (log-probs at positions `where` of `ids`) from plausible wrong ones:
  a temperature 1% off, and bf16-rounded logits."""
  logits_SxV = _full_logits(model, ids)
  for name, wrong_SxV in (("temperature 1.01", logits_SxV / 1.01),
                          ("bf16 logits", np.asarray(jnp.asarray(logits_SxV).astype(jnp.bfloat16), np.float32))):
    miss = np.abs(_logprobs(wrong_SxV, ids)[where] - got).max()
    assert miss > 10 * LOGPROB_ATOL, (name, miss)


def _decode(tok, ids) -> str:
  return tok.decode([int(i) for i in ids], skip_special_tokens=False,
                    clean_up_tokenization_spaces=False)


def _forced(responses_by_turn):
  """An `intervene` hook that answers turn t of every episode with responses_by_turn[t - 1]."""
  def hook(states):
    return {s.episode: responses_by_turn[s.turn - 1] for s in states}
  return hook


# ----------------------------------------------------------------------------------------------
# The batch layout.


def test_respond_decodes_in_the_rollouts_shape_buckets(engine, model, tasks):
  # Contexts of 40 and 200 tokens share the engine's one chunk width (256) and cache length (1,024), so the
  # second replacement decode reuses the first's program; in the sampler's own smallest buckets they do not.
  def state(n):
    return rollout.TurnState(episode=0, turn=1, task=tasks[0], task_text="", history=(), observation="",
                             admissible=(), response="", action=None, context=tuple(range(3, 3 + n)))

  engine.respond(model, [state(40)], jax.random.key(0))
  before = sampling.compile_count()
  engine.respond(model, [state(200)], jax.random.key(1))
  assert sampling.compile_count() == before


def test_turn_ids_of_a_hand_written_two_turn_transcript(tok):
  layout = prompts.ChatLayout.from_tokenizer(tok)
  enc = lambda text: tok.encode(text, add_special_tokens=False)
  start = prompts.episode_start_text(layout, "Your task is to: put an apple in countertop.",
                                     "You see a cabinet 1.", ["go to cabinet 1", "look"])
  y1 = "<think>the apple is in cabinet 1</think><action>go to cabinet 1</action>"
  n1 = prompts.next_turn_text(layout, "You arrive at cabinet 1.", ["open cabinet 1"])
  y2 = "<think>open the cabinet 1</think><action>open cabinet 1</action><|im_end|>"
  turns = [
      rollout.Turn(observation="o1", admissible=[], response=y1, response_tokens=enc(y1),
                   response_logprobs=-np.arange(1, len(enc(y1)) + 1, dtype=np.float32),
                   next_tokens=enc(n1)),
      rollout.Turn(observation="o2", admissible=[], response=y2, response_tokens=enc(y2),
                   response_logprobs=np.full(len(enc(y2)), -0.5, np.float32),
                   next_tokens=enc("never part of the transcript")),
  ]
  episode = rollout.Episode(task=base.Task("alfworld", "train", "x", "y"), turns=turns,
                            prompt_tokens=enc(start))
  empty = rollout.Episode(task=base.Task("alfworld", "train", "z", "y"))
  batch = rollout.assemble_batch([episode, empty], max_turns=4, pad_id=tok.pad_token_id)

  length = len(enc(start)) + len(enc(y1)) + len(enc(n1)) + len(enc(y2))
  assert batch.tokens.shape == batch.turn_ids.shape == (2, batch.tokens.shape[1])
  assert batch.tokens.shape[1] >= length
  row = batch.tokens[0]
  assert _decode(tok, row[:length]) == start + y1 + n1 + y2
  assert _decode(tok, row[batch.turn_ids[0] == 1]) == y1
  assert _decode(tok, row[batch.turn_ids[0] == 2]) == y2
  # No shift: turn 1 starts right after the prompt, turn 2 right after n1.
  first = len(enc(start))
  assert np.flatnonzero(batch.turn_ids[0] == 1)[0] == first
  assert np.flatnonzero(batch.turn_ids[0] == 2)[0] == first + len(enc(y1)) + len(enc(n1))
  # Prompt and observation tokens are masked out of the turns.
  assert _decode(tok, row[(batch.turn_ids[0] == 0) & (batch.attention_mask[0] == 1)]) == start + n1
  np.testing.assert_array_equal(batch.attention_mask[0], np.arange(row.size) < length)
  np.testing.assert_array_equal(row[length:], tok.pad_token_id)
  np.testing.assert_array_equal(batch.behaviour_logprobs[0][batch.turn_ids[0] == 1],
                                turns[0].response_logprobs)
  assert np.all(batch.behaviour_logprobs[0][batch.turn_ids[0] == 0] == 0)
  np.testing.assert_array_equal(batch.response_lengths,
                                [[len(enc(y1)), len(enc(y2)), 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch.num_turns, [2, 0])
  assert not batch.attention_mask[1].any()
  dtypes = {k: v.dtype for k, v in batch.arrays().items()}
  assert dtypes == dict(tokens=np.int32, attention_mask=np.int32, turn_ids=np.int32,
                        behaviour_logprobs=np.float32, positions=np.int32, segments=np.int32,
                        reach=np.int32, response_lengths=np.int32, valid=bool,
                        repeated=bool, intervened=bool, truncated=bool, num_turns=np.int32,
                        won=bool, failed=bool)
  assert batch.valid.shape == batch.repeated.shape == (2, 4) and batch.won.shape == (2,)
  # No turn past a history window: one causal sequence per row, as an unpacked batch reads.
  width = batch.tokens.shape[1]
  np.testing.assert_array_equal(batch.positions, np.tile(np.arange(width), (2, 1)))
  assert not batch.segments.any() and np.all(batch.reach == width)


def test_an_episode_whose_first_prompt_outgrows_the_budget_fits_the_batch():
  """The budget ends such an episode before its first turn; its row is cut, a played row never is."""
  task = base.Task("alfworld", "train", "x", "y")
  unplayed = rollout.Episode(task=task, prompt_tokens=list(range(1, 11)), budget_ended=True)
  batch = rollout.assemble_batch([unplayed], max_turns=2, pad_id=0, seq_len=8)
  np.testing.assert_array_equal(batch.tokens[0], range(1, 9))
  assert batch.attention_mask[0].all() and not batch.turn_ids[0].any()
  played = rollout.Episode(task=task, prompt_tokens=list(range(1, 7)), turns=[rollout.Turn(
      observation="o", admissible=[], response_tokens=[7, 8, 9], response_logprobs=np.zeros(3, np.float32))])
  with pytest.raises(ValueError, match="shorter than the longest row"):
    rollout.assemble_batch([played], max_turns=2, pad_id=0, seq_len=8)


def test_a_turn_past_the_window_is_packed_in_its_own_segment(tok):
  enc = lambda text: tok.encode(text, add_special_tokens=False)
  p, y1, n1, y2, n2, y3 = (enc(t) for t in ("You see a cabinet 1.", "go to cabinet 1", "You arrive.",
                                            "open cabinet 1", "You open it.", "look"))
  turn = lambda y, n, truncated=False, window=(): rollout.Turn(
      observation="o", admissible=[], response_tokens=y, response_logprobs=-np.arange(1, len(y) + 1, dtype=np.float32),
      next_tokens=n, truncated=truncated, window_tokens=list(window))
  # History window k = 1: turn 3 acted on P + y2 + n2, not on turn 1.
  episode = rollout.Episode(task=base.Task("alfworld", "train", "x", "y"), prompt_tokens=p,
                            turns=[turn(y1, n1), turn(y2, n2), turn(y3, [], True, y2 + n2)])
  batch = rollout.assemble_batch([episode], max_turns=3, pad_id=tok.pad_token_id)
  shared, own = p + y1 + n1 + y2, y2 + n2 + y3
  length = len(shared) + len(own)
  assert rollout.row_length(episode) == length
  np.testing.assert_array_equal(batch.tokens[0, :length], shared + own)
  np.testing.assert_array_equal(batch.segments[0, :length], [0] * len(shared) + [3] * len(own))
  # Turn 3's segment sits where its context would: right after P.
  np.testing.assert_array_equal(batch.positions[0, :length],
                                list(range(len(shared))) + list(range(len(p), len(p) + len(own))))
  np.testing.assert_array_equal(batch.reach[0, len(shared):length], len(p))
  assert np.all(batch.reach[0, :len(shared)] == batch.tokens.shape[1])
  np.testing.assert_array_equal(batch.turn_ids[0, :length], [0] * len(p) + [1] * len(y1) + [0] * len(n1)
                                + [2] * len(y2) + [0] * len(y2 + n2) + [3] * len(y3))
  np.testing.assert_array_equal(batch.behaviour_logprobs[0][batch.turn_ids[0] == 3],
                                episode.turns[2].response_logprobs)
  with pytest.raises(ValueError, match=r"turns\[2\] is truncated but has no window_tokens"):
    rollout.assemble_batch([dataclasses.replace(episode, turns=[*episode.turns[:2], turn(y3, [], True)])], 3, 0)


# ----------------------------------------------------------------------------------------------
# Whole rollouts on the fixture games.


def test_forced_walkthrough_wins_and_the_transcript_is_the_chat(engine, model, tok, tasks):
  # Turns 2 and 4 keep the end-of-turn token, as a sampled response that stopped on it does.
  ends = ["", tok.eos_token, "", tok.eos_token]
  responses = [f"<think>step {i}</think><action>{a}</action>{ends[i]}" for i, a in enumerate(WALKTHROUGH_A)]
  batch = engine.run(model, tasks[:1], jax.random.key(0), intervene=_forced(responses),
                     config=_config(max_turns=6))
  (episode,) = batch.episodes
  assert batch.won[0] and episode.won and batch.num_turns[0] == 4 and not batch.failed[0]
  assert [t.action for t in episode.turns] == list(WALKTHROUGH_A)
  assert [t.response_end for t in episode.turns] == ends
  assert batch.valid[0, :4].all() and batch.intervened[0, :4].all() and not batch.valid[0, 4:].any()
  # The eval's metrics count it won; the same walkthrough cut to 3 turns is a loss.
  assert train.rollout_metrics([batch], "")["success"] == 1.0
  short = engine.run(model, tasks[:1], jax.random.key(0), intervene=_forced(responses), config=_config(max_turns=3))
  assert not short.won[0] and short.num_turns[0] == 3 and not short.failed[0] and short.episodes[0].turns[-1].done
  assert train.rollout_metrics([short], "")["success"] == 0.0
  assert "You pick up the apple 1" in episode.turns[1].feedback
  # An independent rendering of the whole chat: task + o_1, then y_t and user(o_{t+1}).
  layout = prompts.ChatLayout.from_tokenizer(tok)
  text = prompts.episode_start_text(layout, episode.task_text, episode.turns[0].observation,
                                    episode.turns[0].admissible)
  for t, turn in enumerate(episode.turns):
    text += responses[t]
    if t + 1 < len(episode.turns):
      text += prompts.next_turn_text(layout, turn.feedback, episode.turns[t + 1].admissible, ends[t])
  length = int(batch.attention_mask[0].sum())
  assert _decode(tok, batch.tokens[0, :length]) == text
  assert text.count("Admissible actions:") == 4  # show_admissible: with every observation the student saw.
  for t in range(4):
    assert _decode(tok, batch.tokens[0][batch.turn_ids[0] == t + 1]) == responses[t]
  assert np.all(batch.behaviour_logprobs == 0)  # Intervened tokens were not sampled.


def test_shadow_expert_names_actions_that_win_when_played(engine, model, tasks):
  def play_expert(states):
    assert all(s.expert_action is not None for s in states)
    return {s.episode: f"<action>{s.expert_action}</action>" for s in states}

  expert = "sage_opd_jax.envs.alfworld_expert:ImitableExpert"
  batch = engine.run(model, tasks[:2], jax.random.key(0), intervene=play_expert,
                     config=_config(max_turns=12, expert=expert))
  assert batch.won.all() and not batch.failed.any()
  for b, episode in enumerate(batch.episodes):
    assert [t.action for t in episode.turns] == [t.expert_action for t in episode.turns]
    assert batch.valid[b, : batch.num_turns[b]].all()
    # The expert's search candidates travel with its action: a* among them on a search step.
    assert all(not t.expert_search or t.expert_action in t.expert_search for t in episode.turns)
  assert any(len(t.expert_search) > 1 for episode in batch.episodes for t in episode.turns)
  # Without an expert the fields stay empty.
  plain = engine.run(model, tasks[:1], jax.random.key(0), config=_config(max_turns=1))
  assert plain.episodes[0].turns[0].expert_action is None and plain.episodes[0].turns[0].expert_search == ()


def test_unparseable_response_is_an_invalid_turn_and_the_episode_goes_on(engine, model, tasks):
  responses = ["<think>no action here</think>", "<action>go to cabinet 1</action>",
               "<action>go to cabinet 1</action>"]
  batch = engine.run(model, tasks[:2], jax.random.key(0), intervene=_forced(responses))
  for b, episode in enumerate(batch.episodes):
    first, second, third = episode.turns
    assert first.action is None and not first.valid and first.feedback == NOTHING_HAPPENS
    assert second.action == "go to cabinet 1" and second.valid
    assert second.feedback.startswith("You arrive at cabinet 1")
    assert batch.num_turns[b] == 3 and not batch.failed[b]
    np.testing.assert_array_equal(batch.valid[b], [False, True, False])  # Not admissible there.
    np.testing.assert_array_equal(batch.repeated[b], [False, False, True])


def test_a_response_stopped_by_its_end_token_plays_the_command_before_it(engine, model, tok, tasks):
  eos = rollout.end_of_turn_ids(tok)[0]
  responses = [tok.encode("<action>go to cabinet 1", add_special_tokens=False) + [eos],
               tok.encode("<action>", add_special_tokens=False) + [eos]]
  batch = engine.run(model, tasks[:1], jax.random.key(0), intervene=_forced(responses), config=_config(max_turns=2))
  first, second = batch.episodes[0].turns
  assert first.action == "go to cabinet 1" and first.valid, first.action
  assert second.action is None and not second.valid, second.action


def test_behaviour_logprobs_equal_a_full_recompute_of_the_transcript(engine, model, tok, tasks):
  batch = engine.run(model, tasks, jax.random.key(1), config=_config(pipeline_groups=3))
  assert batch.stats.turns == 9 and batch.num_turns.tolist() == [3, 3, 3]
  for b, episode in enumerate(batch.episodes):
    length = int(batch.attention_mask[b].sum())
    response = batch.turn_ids[b, :length] > 0
    assert response.sum() == batch.response_lengths[b].sum() > 0
    reference = _reference_logprobs(model, batch.tokens[b, :length])
    np.testing.assert_allclose(batch.behaviour_logprobs[b, :length][response], reference[response],
                               atol=LOGPROB_ATOL)
    _assert_wrong_answers_miss(model, batch.tokens[b, :length], response,
                               batch.behaviour_logprobs[b, :length][response])
    assert np.all(batch.behaviour_logprobs[b][batch.turn_ids[b] == 0] == 0)
    for t, turn in enumerate(episode.turns, start=1):
      assert _decode(tok, batch.tokens[b][batch.turn_ids[b] == t]) == turn.response
      assert turn.action == prompts.parse_action(turn.response) and not turn.truncated


def test_history_window_logprobs_use_the_windowed_context(engine, model, tasks):
  batch = engine.run(model, tasks[:2], jax.random.key(2), config=_config(history_turns=1))
  np.testing.assert_array_equal(batch.truncated, [[False, False, True]] * 2)
  for b, episode in enumerate(batch.episodes):
    first, second, third = episode.turns
    # What the student saw at turn 3: P, then only turn 2 and o_3.
    context = (episode.prompt_tokens + second.response_tokens + second.next_tokens
               + third.response_tokens)
    reference = _reference_logprobs(model, context)[-len(third.response_tokens):]
    np.testing.assert_allclose(third.response_logprobs, reference, atol=LOGPROB_ATOL)
    # The full transcript's log-probs (the window ignored) are a wrong answer the tolerance tells apart.
    length = int(batch.attention_mask[b].sum())
    unwindowed = _reference_logprobs(model, batch.tokens[b, :length])[batch.turn_ids[b, :length] == 3]
    assert np.abs(unwindowed - third.response_logprobs).max() > 10 * LOGPROB_ATOL
    np.testing.assert_allclose(batch.behaviour_logprobs[b][batch.turn_ids[b] == 3],
                               third.response_logprobs)
    # The transcript itself keeps turn 1.
    assert batch.response_lengths[b, 0] == len(first.response_tokens) > 0


# The trainer's float32 log-probs of a sampled token against the sampler's (cached decode, temperature 1).
TRAIN_ATOL = 1e-5


@pytest.fixture(scope="module")
def plain_model(tok):
  """A tiny model at its init scale (logits ~1), where the sampler and one forward agree to float32 rounding."""
  config = models.ModelConfig.from_dict(dict(
      arch="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=False))
  return models.Transformer(config, rngs=nnx.Rngs(1))


def test_trainer_logprobs_equal_the_behaviour_logprobs_at_every_turn_past_the_window(engine, plain_model, tasks):
  # The paper config's window (k = 3) on episodes of 6 turns: turns 5 and 6 acted without turn 1 (and 2).
  batch = engine.run(plain_model, tasks[:2], jax.random.key(4), config=_config(max_turns=6, history_turns=3))
  np.testing.assert_array_equal(batch.truncated, [[False] * 4 + [True] * 2] * 2)
  arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
  # The log-probs the update's loss reads (`update.make_loss_fns`), of the whole packed batch.
  trained = np.asarray(losses.token_logprobs(update.student_logits(plain_model, arrays), arrays["tokens"]))
  # The teacher scores the same packed rows (here with the student's weights: the same numbers).
  scores = teacher.score_batch(plain_model, arrays["tokens"], arrays["attention_mask"], chunk_size=64, top_k=2,
                               packing={k: arrays[k] for k in teacher.PACKING_KEYS})
  for b, episode in enumerate(batch.episodes):
    for t, turn in enumerate(episode.turns, start=1):
      at = batch.turn_ids[b] == t
      assert at.sum() == len(turn.response_tokens) > 0
      np.testing.assert_allclose(trained[b][at], turn.response_logprobs, atol=TRAIN_ATOL, rtol=0, err_msg=f"turn {t}")
      np.testing.assert_allclose(scores["teacher_logprobs"][b][at], turn.response_logprobs, atol=TRAIN_ATOL,
                                 rtol=0, err_msg=f"turn {t}")
      # The teacher's top-1 and entropy are those of the context the student saw (float64 reference).
      context = episode.prompt_tokens + (turn.window_tokens if turn.truncated else sum(
          (u.response_tokens + u.next_tokens for u in episode.turns[: t - 1]), []))
      logits_SxV = _full_logits(plain_model, context + turn.response_tokens)[len(context) - 1: -1]
      logq_SxV = jax.nn.log_softmax(np.asarray(logits_SxV, np.float64), axis=-1)
      np.testing.assert_allclose(scores["teacher_top1"][b][at], np.exp(logq_SxV.max(-1)), atol=TRAIN_ATOL)
      np.testing.assert_allclose(scores["teacher_entropy"][b][at], -(np.exp(logq_SxV) * logq_SxV).sum(-1),
                                 atol=1e-4)
    # Past the window, the whole transcript's log-probs (today's unpacked forward) are a wrong answer.
    transcript = episode.prompt_tokens + sum((u.response_tokens + u.next_tokens for u in episode.turns[:-1]), [])
    transcript += episode.turns[-1].response_tokens
    unwindowed = _reference_logprobs(plain_model, transcript)[-len(episode.turns[-1].response_tokens):]
    assert np.abs(unwindowed - episode.turns[-1].response_logprobs).max() > 10 * TRAIN_ATOL


def test_history_zero_and_no_admissible_list_show_only_the_current_observation(engine, model, tok, tasks):
  batch = engine.run(model, tasks[:1], jax.random.key(2), config=_config(history_turns=0, show_admissible=False))
  np.testing.assert_array_equal(batch.truncated, [[False, True, True]])
  (episode,) = batch.episodes
  layout = prompts.ChatLayout.from_tokenizer(tok)
  start = prompts.episode_start_text(layout, episode.task_text, episode.turns[0].observation)
  assert _decode(tok, episode.prompt_tokens) == start and "Admissible" not in start
  for t, turn in enumerate(episode.turns[1:], start=2):
    # P, an empty assistant message, then o_t: no earlier response, observation or action list.
    seen = episode.prompt_tokens + tok.encode(prompts.next_turn_text(layout, episode.turns[t - 2].feedback),
                                              add_special_tokens=False)
    reference = _reference_logprobs(model, seen + turn.response_tokens)[-len(turn.response_tokens):]
    np.testing.assert_allclose(turn.response_logprobs, reference, atol=LOGPROB_ATOL)
    np.testing.assert_allclose(batch.behaviour_logprobs[0][batch.turn_ids[0] == t], turn.response_logprobs)
  # The transcript keeps every turn, and its observations without the admissible list.
  length = int(batch.attention_mask[0].sum())
  text = start + "".join(turn.response + prompts.next_turn_text(layout, turn.feedback, None, turn.response_end)
                         for turn in episode.turns[:-1]) + episode.turns[-1].response
  assert _decode(tok, batch.tokens[0, :length]) == text and "Admissible" not in text


def test_context_budget_ends_episodes_so_that_rows_fit_seq_len(engine, model, tasks):
  budget = 200  # The fixture prompts are ~140 tokens: one 16-token turn fits, two do not.
  batch = engine.run(model, tasks[:2], jax.random.key(7), seq_len=budget,
                     config=_config(max_context_tokens=budget))
  assert batch.tokens.shape == (2, budget)
  for b, episode in enumerate(batch.episodes):
    assert len(episode.prompt_tokens) + 2 * MAX_NEW < budget  # The premise of this test.
    assert episode.budget_ended and not batch.failed[b] and episode.error is None
    assert batch.num_turns[b] == 1 and episode.turns[-1].done
  # The eval metrics report the cut, so a short budget does not pass for a short-sighted policy.
  assert train.rollout_metrics([batch], "")["context_cut_rate"] == 1.0
  uncut = engine.run(model, tasks[:2], jax.random.key(7), config=_config(max_turns=1))
  assert train.rollout_metrics([uncut], "")["context_cut_rate"] == 0.0


def test_same_key_same_batch_other_key_other_batch(engine, model, tasks):
  first = engine.run(model, tasks, jax.random.key(3))
  again = engine.run(model, tasks, jax.random.key(3))
  other = engine.run(model, tasks, jax.random.key(4))
  for name, array in first.arrays().items():
    np.testing.assert_array_equal(array, again.arrays()[name], err_msg=name)
  assert [t.response for e in first.episodes for t in e.turns] == [
      t.response for e in again.episodes for t in e.turns]
  assert not np.array_equal(first.tokens[:, :64], other.tokens[:, :64]) or not np.array_equal(
      first.tokens, other.tokens)


def test_constrained_decoding_only_plays_admissible_actions(engine, model, tasks):
  batch = engine.run(model, tasks[:1], jax.random.key(5), config=_config(constrained=True,
                                                                          max_turns=2))
  assert batch.valid.all()
  for episode in batch.episodes:
    for turn in episode.turns:
      assert turn.action in turn.admissible
      assert turn.response == f"<action>{turn.action}</action>"


def test_crashed_worker_fails_its_episodes_and_the_others_complete(tok, model, env_kwargs, tasks):
  # Three episodes on two workers: worker 0 hosts episodes 0 and 2, worker 1 episode 1.
  def hook(states):
    return {s.episode: "<action>inventory</action>" for s in states if s.episode == 0 and s.turn == 2}

  with rollout.RolloutEngine(tok, _config(), rollout.default_sampling_config(tok, MAX_NEW),
                             env_name="alfworld_crash_test", env_kwargs=env_kwargs, num_workers=2,
                             timeout_s=60.0, imports=(_MODULE,)) as eng:
    batch = eng.run(model, tasks, jax.random.key(6), intervene=hook,
                    config=_config(pipeline_groups=3))
    assert eng.pool.respawns == 1
  crashed, other, neighbour = batch.episodes
  assert batch.failed.tolist() == [True, False, True]
  assert "exit code 7" in crashed.error and batch.num_turns[0] == 2 and crashed.turns[-1].done
  assert "state lost" in neighbour.error  # Its env died with worker 0.
  assert other.error is None and batch.num_turns[1] == 3 and len(other.turns) == 3


def test_free_thought_constrains_only_after_the_action_tag(tok):
  free = rollout.default_sampling_config(tok, MAX_NEW, free_thought=True)
  assert free.constraint_trigger == tuple(tok.encode(prompts.ACTION_OPEN, add_special_tokens=False))
  assert rollout.default_sampling_config(tok, MAX_NEW).constraint_trigger == ()


def test_a_thought_budget_ends_every_free_thought_in_an_admissible_action(tok, engine, model, tasks):
  # The untrained model rarely opens <action> itself: with a free thought, some of its turns play nothing.
  free = rollout.default_sampling_config(tok, MAX_NEW, free_thought=True)
  config = _config(constrained=True, max_turns=2)
  unbudgeted = engine.run(model, tasks[:2], jax.random.key(5), config=config, sampling_config=free)
  assert not unbudgeted.valid.all()
  budgeted = rollout.default_sampling_config(tok, MAX_NEW, free_thought=True, max_thought_tokens=4)
  batch = engine.run(model, tasks[:2], jax.random.key(5), config=config, sampling_config=budgeted)
  assert batch.valid.all()
  (trigger,) = budgeted.constraint_trigger
  for episode in batch.episodes:
    for turn in episode.turns:
      assert turn.action in turn.admissible and turn.response.endswith(f"<action>{turn.action}</action>")
      assert turn.response_tokens.index(trigger) <= 4
