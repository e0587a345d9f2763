"""The turn-level judge: modes, the invalid-action bypass, and labels landing on their turns.

The batch is hand-built the way the rollout builds it (`rollout.assemble_batch` over
`rollout.Episode`s whose tokens come from `prompts`' multi-turn layout): two episodes of three
turns each, in a batch of T = 4 turn columns (the last is padding).
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx

from configs import base as base_config
from sage_opd_jax import judge
from sage_opd_jax import losses
from sage_opd_jax import models
from sage_opd_jax import prompts
from sage_opd_jax import rollout
from sage_opd_jax import sampling
from sage_opd_jax import sft_data
from sage_opd_jax import teacher
from sage_opd_jax import tokenization
from sage_opd_jax.envs import base as env_base
from sage_opd_jax.envs import demos

SKIP, WEAK, STRONG = losses.Label
NUM_TURNS = 4  # T: one more column than any episode has turns.
TASK = "Your task is to: put a pen in the drawer."
ADMISSIBLE = ["go to desk 1", "go to drawer 2", "look", "take pen 1 from desk 1"]

# (observation, response, parsed action, valid, expert action, feedback) per turn, and the
# oracle label each turn must get (docs/method.md).
EPISODES = [
    [
        ("You are in a room. You see a desk 1 and a drawer 2.",
         "<think>desk first</think><action>go to desk 1</action>",
         "go to desk 1", True, "go to desk 1", "You arrive at desk 1. You see a pen 1."),
        ("You arrive at desk 1. You see a pen 1.", "<think>hmm</think><action>look</action>",
         "look", True, "take pen 1 from desk 1", "You are facing the desk 1."),
        ("You are facing the desk 1.", "<think>fly</think><action>fly to the moon</action>",
         "fly to the moon", False, "take pen 1 from desk 1", "Nothing happens."),
    ],
    [
        ("You are in a room. You see a desk 1 and a drawer 2.", "<think>no idea</think>",
         None, False, "go to desk 1", "Nothing happens."),
        ("Nothing happens.", "<think>drawer</think><action>go to drawer 2</action>",
         "go to drawer 2", True, "go to drawer 2", "You arrive at drawer 2. The drawer 2 is closed."),
        ("You arrive at drawer 2. The drawer 2 is closed.", "<think>look</think><action>look</action>",
         "look", True, "open drawer 2", "You are facing the drawer 2."),
    ],
]
ORACLE = np.array([[SKIP, WEAK, STRONG, STRONG], [STRONG, SKIP, WEAK, STRONG]])
VALID = np.array([[True, True, False, False], [False, True, True, False]])


def _texts():
  words = [TASK, *ADMISSIBLE, "open drawer 2", "fly to the moon", *tokenization.prompt_texts()]
  for turns in EPISODES:
    for observation, response, _, _, _, feedback in turns:
      words += [observation, response, feedback]
  return words


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tokenization.build_word_tokenizer(_texts(), tmp_path_factory.mktemp("tok"))


def _encode(tokenizer, text):
  return tokenizer.encode(text, add_special_tokens=False)


def _episodes(tokenizer, expert=True):
  layout = prompts.ChatLayout.from_tokenizer(tokenizer)
  out = []
  for turns in EPISODES:
    episode = rollout.Episode(task=env_base.Task("alfworld", "train", "fixture", "pick_and_place_simple"),
                              task_text=TASK)
    episode.prompt_tokens = _encode(tokenizer, prompts.episode_start_text(layout, TASK, turns[0][0], ADMISSIBLE))
    for observation, response, action, valid, expert_action, feedback in turns:
      ids = _encode(tokenizer, response)
      episode.turns.append(rollout.Turn(
          observation=observation, admissible=list(ADMISSIBLE), response=response, response_tokens=ids,
          response_logprobs=np.zeros(len(ids), np.float32), action=action, feedback=feedback, valid=valid,
          expert_action=expert_action if expert else None,
          next_tokens=_encode(tokenizer, prompts.next_turn_text(layout, feedback, ADMISSIBLE))))
    out.append(episode)
  return out


@pytest.fixture(scope="module")
def batch(tokenizer):
  return rollout.assemble_batch(_episodes(tokenizer), max_turns=NUM_TURNS, pad_id=tokenizer.pad_token_id)


def _tiny_config(tokenizer):
  return models.ModelConfig.from_dict(dict(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2,
      num_kv_heads=1, head_dim=16, tie_embeddings=False))


def _chain_teacher(tokenizer, chain):
  """A real Transformer whose weights make it follow each token of `chain` with the next.

  With every block's output projections at zero the residual stream is the current token's
  embedding, so the next token depends on the current one only; the LM head then maps each
  key of `chain` (one token's text) to its value.
  """
  model = models.Transformer(_tiny_config(tokenizer), rngs=nnx.Rngs(0))
  model.layers.o_proj[...] = jnp.zeros_like(model.layers.o_proj[...])
  model.layers.down_proj[...] = jnp.zeros_like(model.layers.down_proj[...])
  embed = np.asarray(model.embed[...], np.float64)
  head = 0.01 * np.random.default_rng(0).standard_normal(model.lm_head[...].shape)
  for src_text, dst_text in chain.items():
    (src,), (dst,) = _encode(tokenizer, src_text), _encode(tokenizer, dst_text)
    head[:, dst] += 10.0 * embed[src] / np.linalg.norm(embed[src])
  model.lm_head[...] = jnp.asarray(head, jnp.float32)
  return model


def _answering_teacher(tokenizer, word):
  """A teacher that answers `word` after the generation prompt's final newline, then ends its turn."""
  return _chain_teacher(tokenizer, {"\n": word, word: "<|im_end|>"})


@pytest.fixture(scope="module")
def weak_teacher(tokenizer):
  return _answering_teacher(tokenizer, "Weak")


@pytest.fixture(scope="module")
def random_teacher(tokenizer):
  return models.Transformer(_tiny_config(tokenizer), rngs=nnx.Rngs(7))


def _turn_tokens(batch, b, k):
  return batch.tokens[b][batch.turn_ids[b] == k]


def test_batch_fixture_puts_each_response_on_its_turn(tokenizer, batch):
  for b, turns in enumerate(EPISODES):
    for k, (_, response, *_) in enumerate(turns, start=1):
      assert tokenizer.decode(_turn_tokens(batch, b, k).tolist()) == response
  assert batch.turn_ids.max() == 3 and not (batch.turn_ids == NUM_TURNS).any()


def test_oracle_labels_weight_exactly_their_own_turns(tokenizer, batch, caplog):
  config = judge.JudgeConfig(mode="oracle")
  with caplog.at_level(logging.WARNING):
    result = judge.judge_batch(batch.episodes, NUM_TURNS, config)
  assert "analysis only" in caplog.text
  np.testing.assert_array_equal(result.labels, ORACLE)
  assert result.num_prompts == 0
  assert judge.judge_metrics(result, batch.episodes, config.mode)["judge/oracle_mode"] == 1.0

  # Through turn_ids into the loss's turn weights (E5, E7, E8 with c = 1), token by token.
  turn_ids = jnp.asarray(batch.turn_ids)
  lengths = losses.turn_lengths(turn_ids, NUM_TURNS)
  w_BxT = losses.sage_turn_weights(losses.intervention_weights(jnp.asarray(result.labels), alpha=0.5),
                                   (lengths > 0).astype(jnp.float32), lengths)
  w_BxS = np.asarray(losses.turns_to_tokens(w_BxT, turn_ids))
  intervention = {SKIP: 0.0, WEAK: 0.5, STRONG: 1.0}
  response_lengths = [[len(_encode(tokenizer, t[1])) for t in turns] for turns in EPISODES]
  num_tokens = sum(map(sum, response_lengths))
  weighted = sum(n * intervention[ORACLE[b, t]] for b, ns in enumerate(response_lengths) for t, n in enumerate(ns))
  for b, turns in enumerate(EPISODES):
    for k in range(1, len(turns) + 1):
      expected = intervention[ORACLE[b, k - 1]] * num_tokens / weighted
      np.testing.assert_allclose(w_BxS[b][batch.turn_ids[b] == k], expected, rtol=1e-6)
    assert np.all(w_BxS[b][batch.turn_ids[b] == 0] == 0.0)

  # And through the whole loss: only the logits that predict a Weak or Strong turn's tokens
  # (position s - 1 for token s) get a gradient; a Skip turn's never do.
  rng = np.random.default_rng(0)
  shape = batch.tokens.shape
  loss_batch = {
      "tokens": jnp.asarray(batch.tokens), "turn_ids": turn_ids, "labels": jnp.asarray(result.labels),
      "teacher_logprobs": jnp.asarray(-rng.uniform(0.5, 3.0, shape), jnp.float32),
  }
  logits = jnp.asarray(rng.standard_normal(shape + (len(tokenizer),)), jnp.float32)
  grads = jax.grad(lambda x: losses.sage_opd_loss(
      x, loss_batch, method="sage_opd_no_confidence", old_logprobs="current")[0])(logits)
  has_grad = np.abs(np.asarray(grads)).sum(-1) > 0
  expected = np.zeros(shape, bool)
  for b in range(shape[0]):
    for s in range(1, shape[1]):
      k = batch.turn_ids[b, s]
      expected[b, s - 1] = k > 0 and ORACLE[b, k - 1] != SKIP
  np.testing.assert_array_equal(has_grad, expected)


def test_prompt_mode_asks_only_about_valid_turns(tokenizer, batch, weak_teacher):
  config = judge.JudgeConfig(mode="prompt", history_turns=2, max_new_tokens=3, batch_size=3)
  result = judge.judge_batch(batch.episodes, NUM_TURNS, config, teacher=weak_teacher, tokenizer=tokenizer,
                             rng=jax.random.key(0))
  # Invalid and unparseable turns are Strong without a teacher call.
  assert result.num_prompts == int(VALID.sum()) == 4
  np.testing.assert_array_equal(result.asked, VALID)
  np.testing.assert_array_equal(result.labels, np.where(VALID, WEAK, STRONG))
  for b, turns in enumerate(EPISODES):
    for t in range(len(turns)):
      assert (result.answers[b][t] == "Weak") if VALID[b, t] else result.answers[b][t] is None

  # Each prompt carries its own turn's response, without its think block, and feedback.
  texts = judge.judge_prompt_texts(batch.episodes, tokenizer, 2, result.asked)
  assert [(b, t) for b, t, _ in texts] == [tuple(i) for i in np.argwhere(VALID)]
  for b, t, text in texts:
    _, response, action, _, _, feedback = EPISODES[b][t]
    assert (f"The agent's latest response:\n<action>{action}</action>\nThe environment's feedback to it:\n"
            f"{feedback}") in text
    assert response.split("</think>")[0] not in text
    assert f"Admissible actions were: {', '.join(ADMISSIBLE)}" in text
  # Without the list (config.judge.show_admissible=False) the same questions lose only that line.
  bare = judge.judge_prompt_texts(batch.episodes, tokenizer, 2, result.asked, show_admissible=False)
  assert [text for _, _, text in bare] == [
      text.replace(f"Admissible actions were: {', '.join(ADMISSIBLE)}\n", "") for _, _, text in texts]
  read = judge.JudgeConfig.from_config(dict(
      mode="prompt", history_turns=2, show_admissible=False, max_new_tokens=4, enable_thinking=False,
      likelihood_thresholds=(-0.5, -2.0), length_bucketing=False))
  assert not read.show_admissible and not read.length_bucketing

  confidence = np.tile([0.2, 0.4, 0.6, 0.8], (2, 1))
  metrics = judge.judge_metrics(result, batch.episodes, config.mode, confidence_BxT=confidence)
  assert metrics["judge/oracle_mode"] == 0.0
  assert metrics["judge/weak_frac"] == pytest.approx(4 / 6) and metrics["judge/strong_frac"] == pytest.approx(2 / 6)
  assert metrics["judge/skip_frac"] == 0.0 and metrics["judge/num_prompts"] == 4.0
  assert metrics["judge/unanswered_frac"] == metrics["judge/unclosed_think_frac"] == 0.0
  # Oracle on the judged turns: Skip, Weak, Skip, Weak -> 2 of 4 agree with "Weak".
  assert metrics["judge/oracle_accuracy"] == pytest.approx(0.5)
  assert metrics["judge/oracle_accuracy_all"] == pytest.approx(4 / 6)
  # Weak turns: (0,0) (0,1) (1,1) (1,2); Strong turns: (0,2) (1,0).
  assert metrics["judge/confidence_weak"] == pytest.approx((0.2 + 0.4 + 0.4 + 0.6) / 4)
  assert metrics["judge/confidence_strong"] == pytest.approx((0.6 + 0.2) / 2)
  assert "judge/confidence_skip" not in metrics


def test_an_unclear_answer_is_strong(tokenizer, batch):
  config = judge.JudgeConfig(mode="prompt", max_new_tokens=3, batch_size=3)
  result = judge.judge_batch(batch.episodes, NUM_TURNS, config, teacher=_answering_teacher(tokenizer, "desk"),
                             tokenizer=tokenizer, rng=jax.random.key(0))
  assert [result.answers[b][t] for b, t in np.argwhere(VALID)] == ["desk"] * 4
  np.testing.assert_array_equal(result.labels, np.full((2, NUM_TURNS), STRONG))
  # Each is the named fallback, and counted.
  assert [result.statuses[b][t] for b, t in np.argwhere(VALID)] == [prompts.NO_LABEL] * 4
  assert judge.judge_metrics(result, batch.episodes, config.mode)["judge/unanswered_frac"] == 1.0


def _greedy_reference(model, tokenizer, prompt_texts, max_new_tokens, width=1024):
  """Each prompt alone, without a KV cache: a full causal forward of the sequence per new token.

  The sequence is right-padded to `width` so that one compiled forward serves every step (a
  causal model's logits at position n - 1 never see the padding after it).
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def last_logits(state, ids_1xW, n):
    mask_1xW = (jnp.arange(width)[None] < n).astype(jnp.int32)
    return nnx.merge(graphdef, state)(ids_1xW, attention_mask=mask_1xW)[0, n - 1]

  stop = {tokenizer.eos_token_id, *_encode(tokenizer, "<|im_end|>")}
  answers = []
  for text in prompt_texts:
    sequence, answer = _encode(tokenizer, text), []
    for _ in range(max_new_tokens):
      ids = np.zeros((1, width), np.int32)
      ids[0, : len(sequence)] = sequence
      answer.append(int(np.argmax(np.asarray(last_logits(state, ids, len(sequence)), np.float64))))
      sequence = sequence + answer[-1:]
      if answer[-1] in stop:
        break
    # The reply up to its stop token, special tokens kept (`judge.decode_reply`).
    answers.append(tokenizer.decode(answer[:-1] if answer[-1] in stop else answer, skip_special_tokens=False))
  return answers


@dataclasses.dataclass
class _Turn:
  observation: str
  response: str
  action: str | None
  feedback: str
  admissible: list[str]
  valid: bool
  expert_action: str | None = None
  response_end: str = ""


@dataclasses.dataclass
class _Episode:
  task_text: str
  turns: list[_Turn]


def _varied_episodes(rng):
  """Episodes whose judge prompts range from ~150 to ~600 tokens (observations of random length)."""
  words = sorted({w for text in _texts() for w in text.split() if w.isalpha()})
  episodes = []
  for num_turns in (1, 3, 2, 4, 3):
    turns = []
    for _ in range(num_turns):
      observation = " ".join(rng.choice(words, size=int(rng.integers(1, 150))))
      action = str(rng.choice(ADMISSIBLE))
      turns.append(_Turn(observation, f"<think>{rng.choice(words)}</think><action>{action}</action>", action,
                         " ".join(rng.choice(words, size=int(rng.integers(1, 40)))), list(ADMISSIBLE), True))
    episodes.append(_Episode(TASK, turns))
  return episodes


def test_length_bucketed_judge_answers_like_one_prompt_at_a_time(tokenizer):
  # A random 2-layer teacher with sharpened attention (q-norm and output projections x4), so
  # that its greedy answers depend on each prompt's content: a prompt answered in another
  # row's place would show.
  model = models.Transformer(dataclasses.replace(_tiny_config(tokenizer), num_layers=2), rngs=nnx.Rngs(3))
  model.layers.q_norm[...] = 4.0 * model.layers.q_norm[...]
  model.layers.o_proj[...] = 4.0 * model.layers.o_proj[...]
  episodes = _varied_episodes(np.random.default_rng(0))
  num_turns = max(len(e.turns) for e in episodes)
  asked = np.zeros((len(episodes), num_turns), bool)
  for b, e in enumerate(episodes):
    asked[b, : len(e.turns)] = True
  texts = judge.judge_prompt_texts(episodes, tokenizer, 2, asked)
  lengths = [len(_encode(tokenizer, text)) for _, _, text in texts]
  assert min(lengths) < 250 and max(lengths) > 450
  reference = dict(zip([(b, t) for b, t, _ in texts], _greedy_reference(model, tokenizer, [x for *_, x in texts], 3)))
  assert len(set(reference.values())) >= len(texts) // 2, "the teacher must answer different prompts differently"

  for cfg in (judge.JudgeConfig(max_new_tokens=3),  # bucketed, uncapped
              judge.JudgeConfig(max_new_tokens=3, batch_size=3),  # bucketed, <= 3 prompts a call
              judge.JudgeConfig(max_new_tokens=3, length_bucketing=False)):  # one call, input order
    groups = judge.length_groups(lengths, max_rows=cfg.batch_size)
    assert not cfg.length_bucketing or len(groups) > 1
    result = judge.judge_batch(episodes, num_turns, cfg, teacher=model, tokenizer=tokenizer, rng=jax.random.key(0))
    assert result.num_prompts == len(texts)
    for (b, t), answer in reference.items():
      assert result.answers[b][t] == answer, (cfg, b, t)
      assert result.labels[b, t] == prompts.parse_judge_reply(answer).label
    np.testing.assert_array_equal(result.labels[~asked], STRONG)


def _partitions(items):
  """Every set partition of `items` (lists of lists)."""
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for part in _partitions(rest):
    yield [[first]] + part
    for i in range(len(part)):
      yield part[:i] + [[first] + part[i]] + part[i + 1:]


@pytest.mark.parametrize("seed", range(4))
def test_length_groups_is_the_cheapest_split(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 900, size=6).tolist()
  max_rows = [None, 2, 3, 4][seed]
  overhead = [0, 64, 256, 1024][seed]

  def cost(part):
    # The sampler's padded prefill of a call (rows to a power of two, width to its bucket)
    # plus the per-call overhead.
    return sum(2 ** int(np.ceil(np.log2(len(g)))) * sampling.bucket_length(max(lengths[i] for i in g), 16)
               + overhead for g in part)

  feasible = [p for p in _partitions(list(range(6))) if all(len(g) <= (max_rows or 6) for g in p)]
  groups = judge.length_groups(lengths, max_rows=max_rows, call_overhead=overhead)
  assert sorted(i for g in groups for i in g) == list(range(6))
  assert all(len(g) <= (max_rows or 6) for g in groups)
  assert cost(groups) == min(cost(p) for p in feasible)
  with pytest.raises(ValueError, match="max_rows"):
    judge.length_groups(lengths, max_rows=0)


def test_likelihood_mode_thresholds_the_mean_action_logprob(tokenizer, batch, random_teacher):
  scores = teacher.score_batch(random_teacher, batch.tokens, batch.attention_mask, chunk_size=32)
  logp = np.asarray(scores["teacher_logprobs"], np.float64)
  # Reference: the action's tokens sit between the <action> and </action> tokens of the turn.
  (open_id,), (close_id,) = _encode(tokenizer, "<action>"), _encode(tokenizer, "</action>")
  means = {}
  for b, t in np.argwhere(VALID):
    positions = np.flatnonzero(batch.turn_ids[b] == t + 1)
    ids = batch.tokens[b, positions].tolist()
    start, end = ids.index(open_id) + 1, ids.index(close_id)
    assert tokenizer.decode(ids[start:end]) == EPISODES[b][t][2]
    means[b, t] = logp[b, positions[start:end]].mean()
  order = sorted(means, key=means.get)
  values = [means[k] for k in order]
  thresholds = ((values[2] + values[3]) / 2, (values[0] + values[1]) / 2)
  expected = np.full((2, NUM_TURNS), STRONG)
  expected[order[3]] = SKIP
  expected[order[1]] = expected[order[2]] = WEAK

  config = judge.JudgeConfig(mode="likelihood", likelihood_thresholds=thresholds)
  result = judge.judge_batch(batch.episodes, NUM_TURNS, config, tokenizer=tokenizer, tokens_BxS=batch.tokens,
                             turn_ids_BxS=batch.turn_ids, teacher_logprobs_BxS=scores["teacher_logprobs"])
  np.testing.assert_array_equal(result.labels, expected)
  assert result.num_prompts == 0

  # The action mask holds exactly each parseable turn's command.
  mask = judge.action_token_mask(batch.tokens, batch.turn_ids, tokenizer)
  for b, turns in enumerate(EPISODES):
    for k, (_, response, *_) in enumerate(turns, start=1):
      got = tokenizer.decode(batch.tokens[b][mask[b] & (batch.turn_ids[b] == k)].tolist())
      assert got == (prompts.parse_action(response, lowercase=False) or "")
  assert not (mask & (batch.turn_ids == 0)).any()


@pytest.mark.parametrize("transcript", [False, True])
def test_judge_accuracy_on_labelled_examples(tokenizer, weak_teacher, transcript):
  state = dict(task=TASK, history=[], observation=EPISODES[0][0][0], admissible_actions=ADMISSIBLE,
               feedback="Nothing happens.", task_id="fixture", turn=0)
  examples = [sft_data.JudgeExample.from_demo(demos.JudgeExample(action=a, label=label, **state))
              for a, label in (("look", "Weak"), ("go to desk 1", "Skip"), ("fly to the moon", "Strong"),
                               ("go to drawer 2", "Weak"))]
  metrics = judge.judge_accuracy(weak_teacher, tokenizer, examples, jax.random.key(1), history_turns=2,
                                 transcript=transcript, sampler_kwargs=dict(min_len=64))
  assert metrics["judge_eval/accuracy"] == pytest.approx(0.5)
  assert metrics["judge_eval/recall_weak"] == 1.0 and metrics["judge_eval/recall_skip"] == 0.0
  assert metrics["judge_eval/pred_weak_frac"] == 1.0 and metrics["judge_eval/count"] == 4.0


def test_config_and_missing_inputs_are_errors(tokenizer):
  config = judge.JudgeConfig.from_config(base_config.get_config().judge)
  assert config.mode == "prompt" and config.likelihood_thresholds == (-0.5, -2.0)
  with pytest.raises(ValueError, match="mode"):
    judge.JudgeConfig(mode="vibes")
  with pytest.raises(ValueError, match="likelihood_thresholds"):
    judge.JudgeConfig(likelihood_thresholds=(-2.0, -0.5))
  episodes = _episodes(tokenizer, expert=False)
  with pytest.raises(ValueError, match="expert_action"):
    judge.judge_batch(episodes, NUM_TURNS, judge.JudgeConfig(mode="oracle"))
  # Without expert actions there is no oracle accuracy to report (invalid turns agree by rule).
  labels = np.where(VALID, WEAK, STRONG)
  result = judge.JudgeResult(labels=labels, asked=VALID, answers=[[None] * 3, [None] * 3])
  metrics = judge.judge_metrics(result, episodes, "prompt")
  assert metrics["judge/oracle_count"] == 0.0 and "judge/oracle_accuracy" not in metrics
  assert "judge/oracle_accuracy_all" not in metrics
  with pytest.raises(ValueError, match="teacher"):
    judge.judge_batch(episodes, NUM_TURNS, judge.JudgeConfig(mode="prompt"))
  with pytest.raises(ValueError, match="teacher_logprobs"):
    judge.judge_batch(episodes, NUM_TURNS, judge.JudgeConfig(mode="likelihood"), tokenizer=tokenizer,
                      tokens_BxS=np.zeros((2, 8), np.int32), turn_ids_BxS=np.zeros((2, 8), np.int32))
  with pytest.raises(ValueError, match="num_turns"):
    judge.judge_batch(episodes, 2, judge.JudgeConfig(mode="oracle"))


def _closed_responses(tokenizer, episodes):
  """The episodes with each response ending in the end-of-turn token, as the sampler keeps it."""
  (end,) = _encode(tokenizer, "<|im_end|>")
  out = []
  for episode in episodes:
    turns = [dataclasses.replace(t, response_tokens=[*t.response_tokens, end], response_end="<|im_end|>",
                                 response_logprobs=np.zeros(len(t.response_tokens) + 1, np.float32),
                                 next_tokens=t.next_tokens[1:]) for t in episode.turns]
    out.append(dataclasses.replace(episode, turns=turns))
  return out


def _transcript_judge(model, tokenizer, batch, show_admissible=False):
  """The transcript judge's questions, and the teacher's scores of the batch with them."""
  questions = judge.prepare_transcript_judge(
      batch.episodes, NUM_TURNS, judge.JudgeConfig(mode="transcript", show_admissible=show_admissible), tokenizer,
      batch.tokens, batch.attention_mask, batch.turn_ids)
  scores = teacher.score_batch(model, batch.tokens, batch.attention_mask, chunk_size=8, top_k=2,
                               questions=questions.arrays())
  return questions, jax.device_get(scores)


# Packed, chunked float32 logits against one plain float32 forward of the same tokens: sums in another order.
ANSWER_ATOL = 2e-5


@pytest.mark.parametrize("closed", [False, True])
def test_transcript_judge_answers_each_question_as_if_alone(tokenizer, closed):
  episodes = _episodes(tokenizer)
  if closed:
    episodes = _closed_responses(tokenizer, episodes)
  batch = rollout.assemble_batch(episodes, max_turns=NUM_TURNS, pad_id=tokenizer.pad_token_id)
  config = models.ModelConfig.from_dict(dict(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, tie_embeddings=False))
  model = models.Transformer(config, rngs=nnx.Rngs(3))
  questions, scores = _transcript_judge(model, tokenizer, batch)
  assert [(b, t) for b, t, _ in questions.turns] == [tuple(i) for i in np.argwhere(VALID)]
  # The questions leave the teacher's statistics of the transcripts as they are without them.
  plain = jax.device_get(teacher.score_batch(model, batch.tokens, batch.attention_mask, chunk_size=8, top_k=2))
  assert sorted(scores) == sorted([*plain, "answer_logits"])
  for key, value in plain.items():
    np.testing.assert_allclose(scores[key], value, atol=ANSWER_ATOL, err_msg=key)

  for b, t, r in questions.turns:
    question = questions.segments[b] == r + 1
    reach = int(questions.reach[b][question][0])
    assert np.all(questions.reach[b][question] == reach)
    np.testing.assert_array_equal(questions.positions[b][question], reach + np.arange(question.sum()))
    assert questions.answer_at[b, r] == np.flatnonzero(question)[-1]
    # The question continues the acting transcript right after turn t's response, with a user
    # message that shows the turn's feedback (without the next turn's admissible actions), as
    # the SFT data asks it, whether or not the transcript goes on with that feedback.
    sequence = [*batch.tokens[b, :reach].tolist(), *questions.tokens[b][question].tolist()]
    _, response, _, _, _, feedback = EPISODES[b][t]
    last = t + 1 == len(EPISODES[b])
    assert reach == np.flatnonzero(batch.turn_ids[b] == t + 1)[-1] + 1
    assert tokenizer.decode(sequence, skip_special_tokens=False).endswith(
        f"{response}<|im_end|>\n<|im_start|>user\n{prompts.turn_user_content(feedback)}\n"
        + "\n".join(prompts.judge_question_lines([])) + "<|im_end|>\n<|im_start|>assistant\n")
    assert (reach == batch.attention_mask[b].sum()) == last
    # Reference: that sequence alone, through the model's plain causal forward.
    logits_SxV = np.asarray(model(jnp.asarray([sequence], jnp.int32))[0], np.float64)
    np.testing.assert_allclose(scores["answer_logits"][b, r], logits_SxV[-1], atol=ANSWER_ATOL)
    # Wrong answers miss by over 10x: the logits one position early, and (but for the last turn; once)
    # the question read after the whole transcript, not alone after turn t.
    wrong = [logits_SxV[-2]]
    if not last and not closed:
      length = int(batch.attention_mask[b].sum())
      after_all = [*batch.tokens[b, :length].tolist(), *questions.tokens[b][question].tolist()]
      wrong.append(np.asarray(model(jnp.asarray([after_all], jnp.int32))[0, -1], np.float64))
    for logits_V in wrong:
      assert np.abs(scores["answer_logits"][b, r] - logits_V).max() > 10 * ANSWER_ATOL


def test_transcript_judge_reads_what_the_student_saw_past_the_history_window(tokenizer):
  # History window k = 1: turn 3 acted on P + turn 2 only, and is packed in its own segment.
  episodes = []
  for episode in _episodes(tokenizer):
    first, second, third = episode.turns
    window = second.response_tokens + second.next_tokens
    episodes.append(dataclasses.replace(episode, turns=[
        first, second, dataclasses.replace(third, truncated=True, window_tokens=window)]))
  batch = rollout.assemble_batch(episodes, max_turns=NUM_TURNS, pad_id=tokenizer.pad_token_id)
  assert batch.segments.max() == 3
  model = models.Transformer(_tiny_config(tokenizer), rngs=nnx.Rngs(5))
  packing = {k: batch.arrays()[k] for k in teacher.PACKING_KEYS}
  questions = judge.prepare_transcript_judge(
      batch.episodes, NUM_TURNS, judge.JudgeConfig(mode="transcript", show_admissible=False), tokenizer,
      batch.tokens, batch.attention_mask, batch.turn_ids, packing)
  scores = jax.device_get(teacher.score_batch(model, batch.tokens, batch.attention_mask, chunk_size=8,
                                              questions=questions.arrays()))
  plain = jax.device_get(teacher.score_batch(model, batch.tokens, batch.attention_mask, chunk_size=8, packing=packing))
  np.testing.assert_allclose(scores["teacher_logprobs"], plain["teacher_logprobs"], atol=ANSWER_ATOL)
  assert [(b, t) for b, t, _ in questions.turns] == [tuple(i) for i in np.argwhere(VALID)]
  for b, t, r in questions.turns:
    turns = batch.episodes[b].turns
    seen = batch.episodes[b].prompt_tokens + (turns[t].window_tokens if turns[t].truncated else sum(
        (u.response_tokens + u.next_tokens for u in turns[:t]), [])) + turns[t].response_tokens
    # The question's tokens: after the packed row, in the answer's segment, up to the answer.
    columns = np.arange(questions.tokens.shape[1])
    answer_at = questions.answer_at[b, r]
    q_ids = questions.tokens[b][(columns >= batch.attention_mask[b].sum()) & (columns <= answer_at)
                                & (questions.segments[b] == questions.segments[b, answer_at])].tolist()
    sequence = seen + q_ids
    assert tokenizer.decode(q_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    # Every question follows turn t's response and shows the feedback itself.
    assert prompts.turn_user_content(turns[t].feedback, None) in tokenizer.decode(q_ids, skip_special_tokens=False)
    logits_SxV = np.asarray(model(jnp.asarray([sequence], jnp.int32))[0], np.float64)
    np.testing.assert_allclose(scores["answer_logits"][b, r], logits_SxV[-1], atol=ANSWER_ATOL, err_msg=f"{b}, {t}")


def test_transcript_mode_labels_valid_turns_from_the_answer_token(tokenizer, batch, weak_teacher):
  config = judge.JudgeConfig(mode="transcript")
  questions, scores = _transcript_judge(weak_teacher, tokenizer, batch)
  result = judge.judge_batch(batch.episodes, NUM_TURNS, config, tokenizer=tokenizer, questions=questions,
                             answer_logits_BxRxV=scores["answer_logits"])
  assert result.num_prompts == int(VALID.sum())
  np.testing.assert_array_equal(result.labels, np.where(VALID, WEAK, STRONG))
  assert [result.answers[b][t] for b, t in np.argwhere(VALID)] == ["Weak"] * 4
  # An answer that is no label is Strong, as an unclear prompted answer is.
  questions, scores = _transcript_judge(_answering_teacher(tokenizer, "desk"), tokenizer, batch)
  unclear = judge.judge_batch(batch.episodes, NUM_TURNS, config, tokenizer=tokenizer, questions=questions,
                              answer_logits_BxRxV=scores["answer_logits"])
  np.testing.assert_array_equal(unclear.labels, np.full((2, NUM_TURNS), STRONG))
  assert [unclear.answers[b][t] for b, t in np.argwhere(VALID)] == ["desk"] * 4
  with pytest.raises(ValueError, match="mode='transcript' needs `questions`"):
    judge.judge_batch(batch.episodes, NUM_TURNS, config, teacher=weak_teacher, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------
# Qwen3's tokenizer and thinking mode.

# A Qwen3-like teacher that answers Skip whether it thinks or not: after the generation
# prompt's newline it opens a thought, closes it and answers; after the empty think block that
# ends a non-thinking question ("\n\n") it answers at once.
THINKS_THEN_SKIPS = {"\n": "<think>", "<think>": "Okay", "Okay": "</think>", "</think>": "\n\n", "\n\n": "Skip",
                     "Skip": "<|im_end|>"}
# One that never closes its thought, though the thought names a label.
THINKS_FOREVER = {"\n": "<think>", "<think>": "Skip", "Skip": "\n"}


@pytest.fixture(scope="module")
def qwen3_batch(qwen3_tokenizer):
  return rollout.assemble_batch(_episodes(qwen3_tokenizer), max_turns=NUM_TURNS,
                                pad_id=qwen3_tokenizer.pad_token_id)


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_a_teacher_that_answers_skip_is_read_as_skip_thinking_or_not(qwen3_tokenizer, qwen3_batch, enable_thinking):
  teacher_model = _chain_teacher(qwen3_tokenizer, THINKS_THEN_SKIPS)
  config = judge.JudgeConfig(mode="prompt", enable_thinking=enable_thinking, max_new_tokens=64 if enable_thinking else 4)
  result = judge.judge_batch(qwen3_batch.episodes, NUM_TURNS, config, teacher=teacher_model,
                             tokenizer=qwen3_tokenizer, rng=jax.random.key(0))
  np.testing.assert_array_equal(result.labels, np.where(VALID, SKIP, STRONG))
  # Thinking, the reply opens and closes its thought; not thinking, the question ends with the
  # empty think block and the label is the first token.
  expected = "<think>Okay</think>\n\nSkip" if enable_thinking else "Skip"
  assert [result.answers[b][t] for b, t in np.argwhere(VALID)] == [expected] * 4
  metrics = judge.judge_metrics(result, qwen3_batch.episodes, config.mode)
  assert metrics["judge/skip_frac"] == pytest.approx(4 / 6) and metrics["judge/unanswered_frac"] == 0.0


def test_a_teacher_still_thinking_gets_the_counted_fallback(qwen3_tokenizer, qwen3_batch, caplog):
  config = judge.JudgeConfig(mode="prompt", enable_thinking=True, max_new_tokens=64)
  with caplog.at_level(logging.WARNING):
    result = judge.judge_batch(qwen3_batch.episodes, NUM_TURNS, config,
                               teacher=_chain_teacher(qwen3_tokenizer, THINKS_FOREVER), tokenizer=qwen3_tokenizer,
                               rng=jax.random.key(0))
  # "<think>Skip\n<think>Skip..." names Skip but never answers: the fallback, not Skip.
  for b, t in np.argwhere(VALID):
    assert result.answers[b][t].startswith("<think>Skip\n<think>Skip")
    assert result.statuses[b][t] == prompts.UNCLOSED_THINK
  np.testing.assert_array_equal(result.labels, np.full((2, NUM_TURNS), prompts.UNANSWERED_LABEL))
  metrics = judge.judge_metrics(result, qwen3_batch.episodes, config.mode)
  assert metrics["judge/unanswered_frac"] == metrics["judge/unclosed_think_frac"] == 1.0
  assert "4 of 4 replies had no label" in caplog.text


def test_replies_keep_their_think_tags_however_a_tokenizer_flags_them(qwen3_tokenizer_dir):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  # A tokenizer that flags the think tags special (Qwen3's does not): a reply decoded without
  # its special tokens would lose them, and an unfinished thought would read as its words.
  flagged = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
  flagged.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
  assert flagged.decode(_encode(flagged, "<think>Skip"), skip_special_tokens=True) == "Skip"
  stops = judge._stop_ids(flagged)  # pylint: disable=protected-access
  for text, reply in (("<think>Skip", ("STRONG", prompts.UNCLOSED_THINK)),
                      ("<think>Okay</think>\n\nWeak", ("WEAK", "answered"))):
    decoded = judge.decode_reply(flagged, [*_encode(flagged, text), *stops], stops)
    assert decoded == text
    assert prompts.parse_judge_reply(decoded) == (losses.Label[reply[0]], reply[1])


def test_transcript_judge_reads_the_label_after_the_empty_think_block(qwen3_tokenizer, qwen3_batch):
  teacher_model = _chain_teacher(qwen3_tokenizer, THINKS_THEN_SKIPS)
  config = judge.JudgeConfig(mode="transcript")
  questions = judge.prepare_transcript_judge(qwen3_batch.episodes, NUM_TURNS, config, qwen3_tokenizer,
                                             qwen3_batch.tokens, qwen3_batch.attention_mask, qwen3_batch.turn_ids)
  for b, t, r in questions.turns:
    ids = questions.tokens[b][questions.segments[b] == r + 1].tolist()
    assert qwen3_tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  scores = teacher.score_batch(teacher_model, qwen3_batch.tokens, qwen3_batch.attention_mask, chunk_size=64,
                               questions=questions.arrays())
  result = judge.judge_batch(qwen3_batch.episodes, NUM_TURNS, config, tokenizer=qwen3_tokenizer, questions=questions,
                             answer_logits_BxRxV=scores["answer_logits"])
  np.testing.assert_array_equal(result.labels, np.where(VALID, SKIP, STRONG))


def test_thinking_needs_a_sampled_reply_a_budget_and_a_think_token(tokenizer):
  with pytest.raises(ValueError, match="mode='transcript' does not sample"):
    judge.JudgeConfig(mode="transcript", enable_thinking=True, max_new_tokens=256)
  with pytest.raises(ValueError, match="max_new_tokens=4 with enable_thinking"):
    judge.JudgeConfig(mode="prompt", enable_thinking=True)
  # The word-level vocabulary spells `</think>` as one tag token; a vocabulary without it cannot think.
  thinking = judge.JudgeConfig(mode="prompt", enable_thinking=True, max_new_tokens=64)
  judge.make_judge(thinking, tokenizer=tokenizer)
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<|im_end|>": 1}, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  plain = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")
  with pytest.raises(ValueError, match="judge.enable_thinking=True needs a tokenizer with a <think> token"):
    judge.make_judge(thinking, tokenizer=plain)


# ------------------------------------------------------------------------------------------
# Likelihood mode's action mask.


def action_token_mask_reference(tokens_BxS, turn_ids_BxS, tokenizer):
  """Each token's character span from the decode of every growing prefix (one decode per token),
  special tokens decoded to nothing. `benchmarks/bench_action_mask.py` times the library against it."""
  mask = np.zeros(tokens_BxS.shape, bool)
  for b in range(tokens_BxS.shape[0]):
    for k in np.unique(turn_ids_BxS[b]):
      if k <= 0:
        continue
      positions = np.flatnonzero(turn_ids_BxS[b] == k)
      ids = tokens_BxS[b, positions].tolist()
      span = prompts.action_span(tokenizer.decode(ids, skip_special_tokens=True))
      if span is None:
        continue
      ends = [len(tokenizer.decode(ids[: j + 1], skip_special_tokens=True)) for j in range(len(ids))]
      starts = [0] + ends[:-1]
      for j, pos in enumerate(positions):
        mask[b, pos] = starts[j] < span[1] and ends[j] > span[0]
  return mask


class CountingDecodes:
  """A tokenizer's `decode`, counting the calls and the tokens decoded."""

  def __init__(self, tokenizer):
    self.tokenizer, self.calls, self.tokens = tokenizer, 0, 0

  def decode(self, ids, **kwargs):
    self.calls, self.tokens = self.calls + 1, self.tokens + len(ids)
    return self.tokenizer.decode(ids, **kwargs)


def _qwen3_responses():
  """Responses as a Qwen3 student writes them: long thoughts (with characters of several bytes),
  a tag quoted while thinking, an unclosed action, none at all."""
  thought = " ".join(["The mug is not on the desk 1, so I check the shelf 2 — then the café's countertop 3 ☕."] * 22)
  return [
      f"<think>\n{thought}\n</think>\n\n<action>go to shelf 2</action>",
      "<think>\nI could write <action>look</action> but no.\n</think>\n\n<action> take mug 1 from shelf 2 </action>",
      "<think>\nöffnen: open the drawer 2.\n</think>\n\n<action>open drawer 2",
      "<think>\nNo idea what to do — wait.\n</think>\n\nI give up.",
      "<action>examine ☕ 1</action>",
  ]


def _qwen3_transcripts(tokenizer):
  layout = prompts.ChatLayout.from_tokenizer(tokenizer)
  responses = _qwen3_responses()
  episodes = []
  for order in (responses, responses[::-1][:3]):
    episode = rollout.Episode(task=env_base.Task("alfworld", "train", "fixture", "pick_and_place_simple"),
                              task_text=TASK)
    episode.prompt_tokens = _encode(tokenizer, prompts.episode_start_text(layout, TASK, "You are in a room."))
    for response in order:
      ids = _encode(tokenizer, response + "<|im_end|>")
      episode.turns.append(rollout.Turn(
          observation="o", admissible=[], response=response, response_tokens=ids, response_end="<|im_end|>",
          response_logprobs=np.zeros(len(ids), np.float32), action=prompts.parse_action(response), feedback="f",
          valid=True, next_tokens=_encode(tokenizer, prompts.next_turn_text(layout, "Nothing happens.", None,
                                                                            "<|im_end|>"))))
    episodes.append(episode)
  return rollout.assemble_batch(episodes, max_turns=len(responses), pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("tokenizer_name", ["word", "qwen3"])
def test_action_token_mask_equals_the_prefix_decoding_reference(request, tokenizer_name, batch):
  tokenizer = request.getfixturevalue({"word": "tokenizer", "qwen3": "qwen3_tokenizer"}[tokenizer_name])
  data = batch if tokenizer_name == "word" else _qwen3_transcripts(tokenizer)
  counting = CountingDecodes(tokenizer)
  mask = judge.action_token_mask(data.tokens, data.turn_ids, counting)
  np.testing.assert_array_equal(mask, action_token_mask_reference(data.tokens, data.turn_ids, tokenizer))
  for b, episode in enumerate(data.episodes):
    for k, turn in enumerate(episode.turns, start=1):
      action = prompts.parse_action(turn.response, lowercase=False)
      assert tokenizer.decode(data.tokens[b][mask[b] & (data.turn_ids[b] == k)].tolist()).strip() == (action or "")
      assert not mask[b][data.tokens[b] == tokenizer.convert_tokens_to_ids("<|im_end|>")].any()
  # O(log n) decodes of at most n tokens per turn, where the reference decodes every prefix
  # (n (n + 1) / 2 tokens: 214k for the longest turn here, of 654 tokens).
  lengths = [int(np.sum(data.turn_ids[b] == k)) for b in range(len(data.episodes))
             for k in range(1, len(data.episodes[b].turns) + 1)]
  assert tokenizer_name == "word" or max(lengths) == 654
  budget = [2 * int(np.ceil(np.log2(n + 1))) + 1 for n in lengths]
  assert counting.calls <= sum(budget)
  assert counting.tokens <= sum(n * c for n, c in zip(lengths, budget))
