"""The expert teacher (sage_opd_jax/expert_teacher.py): its token statistics, its knob, its judge, its configs.

The token statistics are pinned against an exact (rational) enumeration of the action
distribution on turns the real ALFWorld engine's expert played.
"""

import csv
import dataclasses
import fractions
import json
import math
import pathlib
import re

import alfworld.gen.constants as alfred_constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import alfworld_control
from configs import alfworld_control_qwen3
from configs import base
from sage_opd_jax import config as config_lib
from sage_opd_jax import expert_teacher
from sage_opd_jax import judge as judge_lib
from sage_opd_jax import losses
from sage_opd_jax import models
from sage_opd_jax import prompts
from sage_opd_jax import provenance
from sage_opd_jax import rollout as rollout_lib
from sage_opd_jax import sft_data
from sage_opd_jax import tokenization
from sage_opd_jax import train
from sage_opd_jax import update as update_lib
from sage_opd_jax.envs import base as envs_base
from sage_opd_jax.envs import alfworld_expert
from sage_opd_jax.envs.alfworld import AlfworldEnv
from conftest import real_alfworld_data

FIXTURE_DATA = pathlib.Path(__file__).resolve().parent / "fixtures" / "alfworld"


# ------------------------------------------------------------------------------------------
# Real ALFWorld turns.


@pytest.fixture(scope="module")
def real_episodes(tmp_path_factory):
  """The expert's episodes on the first 4 pick_and_place_simple games of valid_seen (the real engine)."""
  env = AlfworldEnv(data_dir=str(real_alfworld_data()), cache_dir=str(tmp_path_factory.mktemp("grounding")),
                    facts=True, task_types=["pick_and_place_simple"])
  try:
    return [alfworld_expert.run_episode(env, task, max_steps=30) for task in list(env.tasks("valid_seen"))[:4]]
  finally:
    env.close()


@pytest.fixture(scope="module")
def real_turns(real_episodes, tmp_path_factory):
  """(admissible actions, expert action) at every turn of a real valid_seen game, and a word-level tokenizer that
  covers their actions."""
  tmp = tmp_path_factory.mktemp("real")
  turns = list(zip(real_episodes[0].admissible_actions, real_episodes[0].actions))
  words = sorted({a for admissible, _ in turns for a in admissible})
  tokenizer = models.load_tokenizer(tokenization.build_alfworld_tokenizer(FIXTURE_DATA, tmp / "tok", extra_texts=words))
  return turns, tokenizer


def sampler_config(tokenizer, free_thought):
  return rollout_lib.default_sampling_config(tokenizer, 32, free_thought=free_thought,
                                             max_thought_tokens=4 if free_thought else 0)


def brute_force(sequences, masses, prefix):
  """Exact P(. | prefix), from the complete sequences' masses: the law of the next token, as Fractions."""
  total = sum(m for s, m in zip(sequences, masses) if tuple(s[: len(prefix)]) == tuple(prefix))
  nxt = {}
  for s, m in zip(sequences, masses):
    if tuple(s[: len(prefix)]) == tuple(prefix) and len(s) > len(prefix):
      nxt[s[len(prefix)]] = nxt.get(s[len(prefix)], 0) + m
  return {x: m / total for x, m in nxt.items()}


def thought_entropy(vocab_size, off_mass=1e-3):
  """H of nu at a free-thought position: 1 - off_mass on one token, off_mass evenly over the other V - 1."""
  return -((1 - off_mass) * math.log(1 - off_mass) + off_mass * math.log(off_mass / (vocab_size - 1)))


@pytest.mark.parametrize("free_thought, search, eps_over", [
    (False, "peak", "actions"), (True, "peak", "actions"), (True, "spread", "actions"), (True, "spread", "verbs")])
def test_token_statistics_equal_a_brute_force_enumeration_on_real_turns(real_turns, real_episodes, free_thought,
                                                                         search, eps_over):
  """The beliefs come from `episode_beliefs` on the expert's own turns. With search="spread" its search steps
  (the first two of this game: 20 and 18 candidates) spread 1 - eps evenly over their candidates; with
  eps_over="verbs" eps goes evenly to the other actions' verbs, then evenly to each verb's actions."""
  turns, tokenizer = real_turns
  teacher = expert_teacher.ExpertTeacher(expert_teacher.ExpertTeacherConfig(), tokenizer,
                                         sampler_config(tokenizer, free_thought), len(tokenizer))
  searches = real_episodes[0].search
  assert sum(len(c) > 1 for c in searches) >= 2
  checked = 0
  for t, (admissible, expert) in enumerate(turns[:12]):
    actions = tuple(dict.fromkeys(admissible))
    n = len(actions)
    eps = fractions.Fraction(1, 10) if t % 2 else fractions.Fraction(0)
    # Exact nu: 1 - eps evenly over the peaks (a*, or a search step's candidates), eps evenly over the rest.
    peaks = {actions.index(expert)} | ({actions.index(c) for c in searches[t]} if search == "spread" else set())
    masses = [(1 - eps) / len(peaks) if i in peaks else eps / (n - len(peaks)) for i in range(n)]
    if eps_over == "verbs":
      rest_verbs = [actions[i].split()[0] for i in range(n) if i not in peaks]
      masses = [(1 - eps) / len(peaks) if i in peaks else
                eps / len(set(rest_verbs)) / rest_verbs.count(actions[i].split()[0]) for i in range(n)]
    config = expert_teacher.ExpertTeacherConfig(eps_on=float(eps), search=search, eps_over=eps_over)
    fake = FakeTurn(admissible, expert, expert, searches[t])
    belief = expert_teacher.episode_beliefs("game", [fake], config)[0]
    probs = belief.probs
    np.testing.assert_allclose(probs, [float(m) for m in masses], rtol=1e-12)
    # The student's responses as the sampler writes them: (free thought) + the trie's sequence of each action.
    free = tokenizer.encode(prompts.THINK_OPEN + prompts.THINK_CLOSE + prompts.ACTION_OPEN,
                            add_special_tokens=False) if free_thought else []
    sequences = [tuple(free + s) for s in teacher.action_tokens(actions)]
    assert len(set(sequences)) == n  # Distinct token sequences: the enumeration is over actions.
    entropy_sum = 0.0
    for i, seq in enumerate(sequences):
      logp, top1, entropy = teacher.turn_stats(belief, seq)
      support = teacher.turn_support(belief, seq)
      support_lognu = teacher.turn_support_logprobs(belief, support, seq)  # The exact estimator's nu.
      # The free thought's tokens: nu over the vocabulary, 1 - 1e-3 on the expert's, the rest spread evenly.
      np.testing.assert_allclose(logp[:len(free)], math.log(1 - 1e-3), rtol=1e-12)
      np.testing.assert_allclose(top1[:len(free)], 1 - 1e-3, rtol=1e-12)
      np.testing.assert_allclose(entropy[:len(free)], thought_entropy(len(tokenizer)), rtol=1e-9)
      logp, top1, entropy = logp[len(free):], top1[len(free):], entropy[len(free):]
      for j in range(len(free), len(seq)):
        law = brute_force(sequences, masses, seq[:j])
        # Over decoding's support: nu's law of the next token, the floor where it has no mass.
        assert set(support[j]) == set(law)
        for token, lognu in zip(support[j], support_lognu[j]):
          want = math.log(law[token]) if law[token] > 0 else expert_teacher.OUTSIDE_LOGPROB
          assert lognu == pytest.approx(want, abs=1e-12)
        k = j - len(free)
        if law[seq[j]] == 0:
          assert logp[k] == expert_teacher.OUTSIDE_LOGPROB
          break
        assert logp[k] == pytest.approx(math.log(law[seq[j]]), abs=1e-12)
        assert top1[k] == pytest.approx(float(max(law.values())), abs=1e-12)
        exact_h = -sum(float(p) * math.log(p) for p in law.values() if p > 0)
        assert entropy[k] == pytest.approx(exact_h, abs=1e-12)
        if len(law) == 1:  # A token the trie forces: probability 1.
          assert logp[k] == 0.0 and top1[k] == 1.0 and entropy[k] == 0.0
      else:
        # The chain rule: the tokens' probabilities multiply to the action's mass.
        assert math.exp(logp.sum()) == pytest.approx(float(masses[i]), rel=1e-9)
        entropy_sum += float(masses[i]) * entropy.sum()
      checked += 1
    # The expected sum of per-token entropies is the action distribution's entropy (sequences are prefix-free).
    action_h = -sum(float(m) * math.log(m) for m in masses if m > 0)
    assert entropy_sum == pytest.approx(action_h, abs=1e-9)
  assert checked > 100


def wordy_turn(real_turns):
  """The control's layout (word-level tokenizer, `<action>` trigger), the expert teacher, a real turn's belief and
  a response that thinks three words before closing: `<think> w w w </think><action> a* </action>`."""
  turns, tokenizer = real_turns
  teacher = expert_teacher.ExpertTeacher(expert_teacher.ExpertTeacherConfig(), tokenizer,
                                         sampler_config(tokenizer, True), len(tokenizer))
  admissible, expert = turns[0]
  actions = tuple(dict.fromkeys(admissible))
  belief = expert_teacher.TurnBelief(actions, expert_teacher.action_probs(len(actions), actions.index(expert), 0.05),
                                     expert, expert, True, False)
  words = tokenizer.encode("apple on table", add_special_tokens=False)
  assert len(words) == 3
  return teacher, belief, words, expert


def test_off_its_format_the_expert_closes_its_thought(real_turns):
  teacher, belief, words, expert = wordy_turn(real_turns)
  think_open, think_close, trigger = (teacher.tokenizer.encode(tag, add_special_tokens=False)
                                      for tag in (prompts.THINK_OPEN, prompts.THINK_CLOSE, prompts.ACTION_OPEN))
  assert teacher.response_format() == (think_open + think_close + trigger, 1) and teacher.trigger == trigger
  action = teacher.action_tokens([expert])[0]
  vocab = len(teacher.tokenizer)
  # Independent of the module's constants: 1 - 1e-3 on the expert's next token, 1e-3 over the other V - 1.
  floor, target = math.log(1e-3 / (vocab - 1)), math.log(1 - 1e-3)
  # Words inside the thought: the first one leaves the format (the floor), the later ones are not the close
  # (the floor), the `</think>` after them is the expert's close (its target), and the trigger after it is the
  # format's again.
  response = think_open + words + think_close + trigger + action
  logp, top1, entropy = teacher.turn_stats(belief, response)
  np.testing.assert_allclose(logp[1:4], floor, rtol=1e-12)
  np.testing.assert_allclose(logp[[0, 4, 5]], target, rtol=1e-12)
  np.testing.assert_allclose(top1[:6], 1 - 1e-3, rtol=1e-12)  # Each thought position's law has one target.
  np.testing.assert_allclose(entropy[:6], thought_entropy(vocab), rtol=1e-9)
  # The action after the trigger is scored through the trie all the same.
  assert math.exp(logp[6:].sum()) == pytest.approx(0.95)
  # Words written past `</think>` (`<think></think> apple on table<action>`): the close is then the trigger.
  logp, _, _ = teacher.turn_stats(belief, think_open + think_close + words + trigger + action)
  np.testing.assert_allclose(logp[2:5], floor, rtol=1e-12)
  assert logp[5] == pytest.approx(target, abs=1e-12) and math.exp(logp[6:].sum()) == pytest.approx(0.95)
  # An unclosed thought forced through the trigger skipped the expert's `</think>`: the floor.
  logp, _, _ = teacher.turn_stats(belief, think_open + words + trigger + action)
  np.testing.assert_allclose(logp[1:5], floor, rtol=1e-12)


def test_at_every_thought_position_nu_is_a_law_over_the_vocabulary(real_turns):
  """Summed over every token the student could write at a free-thought position (on the format, at its first
  word off it, and while the expert closes its thought), nu is 1, so the sampled reverse KL's minimiser there,
  pi proportional to nu, is nu itself: 1 - 1e-3 on the expert's token. With a floor of 1e-4 on each other token
  the V - 1 floors add up to mass the student would learn to spend on tokens the expert never writes."""
  teacher, belief, words, _ = wordy_turn(real_turns)
  prefix, _ = teacher.response_format()
  vocab = len(teacher.tokenizer)
  for head in (prefix[:1], prefix[:1] + words[:1], prefix[:1] + words):
    logps = [teacher.turn_stats(belief, head + [x])[0][len(head)] for x in range(vocab)]
    assert math.fsum(math.exp(v) for v in logps) == pytest.approx(1.0, abs=1e-9), head
    assert max(logps) == pytest.approx(math.log(1 - 1e-3), abs=1e-12)
  with pytest.raises(ValueError, match="vocab_size=1"):
    expert_teacher.ThoughtLaw(1)
  with pytest.raises(ValueError, match="off_mass=1.0"):
    expert_teacher.ThoughtLaw(vocab, off_mass=1.0)


def test_with_subgoal_thoughts_the_expert_thinks_its_demos_thought_at_the_students_state(real_episodes, real_turns):
  """thoughts="subgoal": on the expert's own episode each turn's thought is the one its SFT demo trains on, and
  its demo response scores log(1 - 1e-3) on every thought token and log(1 - eps) on the action; where the student does not
  take the object the expert would have, the expert goes on thinking "find"; a student thinking of another
  object meets the floor at that word."""
  episode, tokenizer = real_episodes[0], real_turns[1]
  teacher = expert_teacher.ExpertTeacher(expert_teacher.ExpertTeacherConfig(), tokenizer,
                                         sampler_config(tokenizer, True), len(tokenizer), thoughts="subgoal")
  record = {"task_id": episode.task.task_id, "task": episode.task_text, "env": "alfworld",
            "observations": episode.observations, "actions": episode.actions,
            "admissible_actions": episode.admissible_actions}
  demo_thoughts = sft_data.Demonstration.from_record(record, thoughts="subgoal").thoughts
  turns = [FakeTurn(episode.admissible_actions[t], a, a, observation=episode.observations[t],
                    feedback=episode.observations[t + 1]) for t, a in enumerate(episode.actions)]
  beliefs = teacher.beliefs([FakeEpisode(turns, episode.task.task_id)])[0]
  assert [b.thought for b in beliefs] == demo_thoughts
  obj = demo_thoughts[0].split()[1]
  take = next(t for t, a in enumerate(episode.actions) if a.startswith(f"take {obj} "))
  assert demo_thoughts[take] == f"find {obj}" and demo_thoughts[take + 1].startswith(f"put {obj} ")
  for t in (0, take, take + 1):
    response = tokenizer.encode(sft_data.expert_response(episode.actions[t], demo_thoughts[t]),
                                add_special_tokens=False)
    logp, _, _ = teacher.turn_stats(beliefs[t], response)
    split = teacher._split(response)  # pylint: disable=protected-access
    assert split > 4  # <think> the subgoal's words </think> <action>: each the expert's next token.
    np.testing.assert_allclose(logp[:split], math.log(1 - 1e-3), rtol=1e-12)
    assert math.exp(logp[split:].sum()) == pytest.approx(0.95)
  # The student does something else where the expert takes the object: it holds nothing, the expert still looks.
  other = next(a for a in episode.admissible_actions[take] if a != episode.actions[take])
  turns[take] = FakeTurn(episode.admissible_actions[take], other, episode.actions[take],
                         observation=episode.observations[take], feedback="Nothing happens.")
  beliefs = teacher.beliefs([FakeEpisode(turns, episode.task.task_id)])[0]
  assert beliefs[take].thought == f"find {obj}" and beliefs[take + 1].thought == f"find {obj}"
  assert [b.thought for b in beliefs[:take]] == demo_thoughts[:take]
  # Thinking of another object: the floor at the object's word, then the expert closes its thought.
  wrong = tokenizer.encode(sft_data.expert_response(episode.actions[0], "find apple"), add_special_tokens=False)
  logp, _, _ = teacher.turn_stats(beliefs[0], wrong)
  assert logp[0] == logp[1] == pytest.approx(math.log(1 - 1e-3))
  assert logp[2] == pytest.approx(math.log(1e-3 / (len(tokenizer) - 1)))


def test_the_sampled_reverse_kl_gradient_raises_closing_a_wordy_thought(real_turns):
  """OPD's loss (the sampled estimator) on a turn that thinks three words and then closes: its gradient on the
  student's logits where it closed raises `</think>`, and one step on the logits raises its log-prob. With the
  floor on every token after the first word (the teacher before this fix) it lowers it."""
  teacher, belief, words, expert = wordy_turn(real_turns)
  prompt = teacher.tokenizer.encode("look around", add_special_tokens=False)
  prefix, _ = teacher.response_format()
  response = prefix[:1] + words + prefix[1:] + teacher.action_tokens([expert])[0]
  tokens_S = np.asarray(prompt + response, np.int32)
  turn_ids_S = np.asarray([0] * len(prompt) + [1] * len(response), np.int32)
  stats = teacher.turn_stats(belief, response)
  batch = {"tokens": tokens_S[None], "turn_ids": turn_ids_S[None],
           "student_support": expert_teacher.support_array(
               [[] for _ in prompt] + teacher.turn_support(belief, response))[None]}
  for key, values in zip(("teacher_logprobs", "teacher_top1", "teacher_entropy"), stats):
    batch[key] = np.concatenate([np.zeros(len(prompt)), values]).astype(np.float32)[None]
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  vocab = len(teacher.tokenizer)
  logits_1xSxV = jax.random.normal(jax.random.PRNGKey(0), (1, len(tokens_S), vocab))
  options = losses.LossOptions.for_method("opd", estimator="sampled", old_logprobs="current", num_turns=1)
  grad_1xSxV = jax.grad(lambda logits: losses.sage_opd_loss(logits, batch, options)[0])(logits_1xSxV)
  s = len(prompt) + 1 + len(words)  # The `</think>` after the words; logits[s - 1] predict it.
  close = int(tokens_S[s])
  assert close == prefix[1] and 1e-4 < math.exp(jax.nn.log_softmax(logits_1xSxV[0, s - 1])[close]) < 0.5
  assert grad_1xSxV[0, s - 1, close] < 0, grad_1xSxV[0, s - 1, close]
  stepped_1xSxV = logits_1xSxV - 10.0 * grad_1xSxV
  before, after = (jax.nn.log_softmax(x[0, s - 1])[close] for x in (logits_1xSxV, stepped_1xSxV))
  assert after > before, (before, after)


# ------------------------------------------------------------------------------------------
# The learning test: the OPD loop with the expert teacher at eta = 0 on the fixture games.


TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
            max_position_embeddings=1024)


def fixture_control_config(tokenizer_dir):
  """The control's layout (free thought with a 4-token budget, then the admissible-action trie) on the
  fixture's three games, with a random tiny student."""
  config = base.get_config()
  config.stage, config.method = "distill", "opd"
  config.tokenizer_dir = str(tokenizer_dir)
  vocab = -(-len(models.load_tokenizer(tokenizer_dir)) // 64) * 64
  config.student.model = config.teacher.model = base.tiny_model(vocab_size=vocab, **TINY)
  config.teacher.kind, config.judge.mode = "expert", "expert_belief"
  config.teacher.expert.eps_on = config.teacher.expert.eps_off = 0.05
  config.env.data_dir = str(FIXTURE_DATA)
  config.env.train_split, config.env.eval_splits = "valid_seen", ("valid_seen",)
  config.env.max_turns, config.env.history_turns, config.env.num_workers = 4, 1, 1
  config.sampling.constrained, config.sampling.free_thought, config.sampling.max_thought_tokens = True, True, 4
  config.sampling.max_new_tokens = 24
  config.train.batch_episodes, config.train.max_seq_len = 3, 512
  config.optim.learning_rate, config.optim.warmup_steps, config.optim.schedule = 1e-2, 0, "constant"
  return config_lib.validate(config)


def scored_batch(engine, teacher, model, tasks, key, seq_len, **run_kwargs):
  """A real rollout's loss arrays with the expert teacher's scores (and the student's decoding support)."""
  played = engine.run(model, tasks, key, seq_len=seq_len, **run_kwargs)
  arrays = played.arrays()
  arrays.update(teacher.score(played.episodes, arrays))
  return played, arrays


def expert_action_logprob(engine, teacher, model, tasks, seq_len):
  """[turns] the student's log P(a*) at each state of the expert's own episodes: its constrained log-probs
  (decoding's support, as the loss reads them) summed over the tokens after the trigger of a*'s response."""
  def expert_plays(states):
    return {s.episode: teacher.response_format()[0] + teacher.action_tokens([s.expert_action])[0] for s in states}

  _, arrays = scored_batch(engine, teacher, model, tasks, jax.random.PRNGKey(0), seq_len, intervene=expert_plays)
  batch = {k: jnp.asarray(arrays[k]) for k in update_lib.loss_keys(arrays)}
  logp_BxS = losses.token_logprobs(update_lib.student_logits(model, batch), batch["tokens"], batch["student_support"])
  in_trie_BxS = batch["student_support"][..., 0] >= 0  # The thought's tokens list no support.
  num_turns = arrays["valid"].shape[1]
  lengths_BxT = np.asarray(losses.turn_lengths(batch["turn_ids"], num_turns))
  sums_BxT = np.asarray(losses.turn_mean(jnp.where(in_trie_BxS, logp_BxS, 0.0), batch["turn_ids"], num_turns))
  return (sums_BxT * lengths_BxT)[lengths_BxT > 0]


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_opd_with_the_expert_teacher_raises_the_experts_action_on_its_own_states(tmp_path, estimator):
  """A few OPD updates from a random student (the trainer's own loss and update, on batches the real rollout
  played and the expert teacher scored) raise log P(a*) on the expert's episodes, states the student's own
  rollouts leave after their first turn; with the sampled k1 estimator and with the exact reverse KL over
  decoding's support (estimator='full'). Fails with the update's sign flipped, the teacher's scores one
  token off, or the student's full-vocabulary log pi in place of decoding's (the forced tokens' advantages)."""
  tokenizer_dir = tokenization.build_alfworld_tokenizer(FIXTURE_DATA, tmp_path / "tokenizer")
  config = fixture_control_config(tokenizer_dir)
  config.loss.estimator = estimator
  tokenizer = models.load_tokenizer(tokenizer_dir)
  model = train.load_model(config.student, None, config.seed)
  teacher = train.load_teacher(config, tokenizer, None)
  env = envs_base.make("alfworld", **train.env_kwargs(config))
  tasks = [task for split in ("valid_seen", "train") for task in env.tasks(split)]
  env.close()
  num_updates, seq_len = 5, config.train.max_seq_len
  graphdef = nnx.graphdef(model)
  tx = update_lib.make_optimizer(config.optim)
  learning_rates = update_lib.learning_rates(config.optim, num_updates)
  state = update_lib.init_train_state(model, tx, config.seed)
  loss_fn, totals_fn = update_lib.make_loss_fns(train.loss_options(config, "opd", config.env.max_turns))
  update = jax.jit(update_lib.make_update_fn(graphdef, tx, loss_fn, totals_fn, micro_batches=1))
  with train.make_rollout_engine(config, tokenizer) as engine:
    before = expert_action_logprob(engine, teacher, model, tasks, seq_len)
    for step in range(num_updates):
      student = nnx.merge(graphdef, state.params)
      played, arrays = scored_batch(engine, teacher, student, tasks, jax.random.PRNGKey(step + 1), seq_len)
      batch = {k: jnp.asarray(arrays[k]) for k in update_lib.loss_keys(arrays)}
      if step == 0:
        # The loss's log pi_theta is the policy the sampler drew each response token from (thought, a trigger
        # the budget forced, the trie's tokens), so log pi - log nu compares the teacher with what acted.
        logp_BxS = losses.token_logprobs(update_lib.student_logits(student, batch), batch["tokens"],
                                         batch["student_support"])
        response_BxS = arrays["turn_ids"] > 0
        np.testing.assert_allclose(np.asarray(logp_BxS)[response_BxS], arrays["behaviour_logprobs"][response_BxS],
                                   atol=1e-5)
        # The teacher's scores sit on the tokens they score: after the trigger they multiply to nu(played action).
        for b, (episode, beliefs) in enumerate(zip(played.episodes, teacher.beliefs(played.episodes))):
          for t, (turn, belief) in enumerate(zip(episode.turns, beliefs)):
            where = np.flatnonzero(arrays["turn_ids"][b] == t + 1)[teacher._split(turn.response_tokens):]  # pylint: disable=protected-access
            nu = belief.probs[belief.actions.index(turn.action)]
            assert np.exp(arrays["teacher_logprobs"][b, where].sum()) == pytest.approx(nu, rel=1e-5)
            if estimator == "full":  # nu over decoding's support at each action token: the law sums to 1.
              listed = arrays["teacher_topk_ids"][b, where] >= 0
              assert np.all(arrays["teacher_topk_ids"][b, where] == arrays["student_support"][b, where])
              law = np.where(listed, np.exp(arrays["teacher_topk_logprobs"][b, where]), 0.0).sum(-1)
              np.testing.assert_allclose(law, 1.0, rtol=1e-5)
      state, metrics = update(state, batch, learning_rates[step])
      assert not metrics["update_skipped"]
    after = expert_action_logprob(engine, teacher, nnx.merge(graphdef, state.params), tasks, seq_len)
  assert before.shape == after.shape and len(before) >= 9
  # Measured: -2.13 -> -1.42 (5 updates); a random student starts near log(1/|first words|).
  assert after.mean() > before.mean() + 0.3, (before, after)


# ------------------------------------------------------------------------------------------
# The knob and the judge.


class FakeTurn:
  def __init__(self, admissible, action, expert_action, expert_search=(), observation="", feedback=""):
    self.admissible, self.action, self.expert_action = admissible, action, expert_action
    self.expert_search = tuple(expert_search)
    self.observation, self.feedback = observation, feedback


def knob_episode(real_turns):
  """Ten turns over a real episode's states (played twice over) where the student leaves the expert at turn 2."""
  turns = []
  for t, (admissible, expert) in enumerate((real_turns[0] * 10)[:10]):
    other = next(a for a in admissible if a != expert)
    turns.append(FakeTurn(admissible, other if t == 1 else expert, expert))
  return turns


def test_misdirection_is_off_path_only_seeded_and_nested_in_eta(real_turns):
  turns = knob_episode(real_turns)
  beliefs = {eta: expert_teacher.episode_beliefs("game", turns, expert_teacher.ExpertTeacherConfig(eta=eta))
             for eta in (0.0, 0.5, 1.0)}
  on_path = [b.on_path for b in beliefs[0.0]]
  assert on_path == [True, True] + [False] * 8  # Turn 2 left the expert's path; turn 2 itself was on it.
  assert all(b.peak == b.expert_action and not b.misdirected for b in beliefs[0.0])
  assert all(b.misdirected == (not b.on_path) for b in beliefs[1.0])
  for b in beliefs[1.0]:
    assert b.peak in b.actions and (b.peak != b.expert_action) == b.misdirected
    assert b.probs[b.actions.index(b.peak)] == pytest.approx(0.95) and b.probs.sum() == pytest.approx(1.0)
  half = [b.misdirected for b in beliefs[0.5]]
  assert 0 < sum(half) < 8  # Some but not all of the 8 off-path turns.
  # The turns misdirected at eta=0.5 are misdirected at eta=1 too, towards the same wrong action.
  assert all(b1.peak == b5.peak for b5, b1 in zip(beliefs[0.5], beliefs[1.0]) if b5.misdirected)
  again = expert_teacher.episode_beliefs("game", turns, expert_teacher.ExpertTeacherConfig(eta=0.5))
  assert [b.peak for b in again] == [b.peak for b in beliefs[0.5]]
  other_seed = expert_teacher.episode_beliefs("game", turns, expert_teacher.ExpertTeacherConfig(eta=0.5, seed=1))
  assert [b.misdirected for b in other_seed] != half or [b.peak for b in other_seed] != [b.peak for b in beliefs[0.5]]


def enumerated_search(episode):
  """Per turn, the search candidates by their definition, enumerated from the episode's text and ALFRED's
  object-placement table (not the expert's state): on a `go to` while the expert looks for the task's object
  class and has seen none of it, the admissible go-tos of every receptacle not visited yet of the named one's
  tier (those whose class can hold the object, or the rest); after the take, every receptacle of the target's
  type not visited since; () on every other turn, and on a go-to right after a `look` (the expert's fallback
  when the go-to it named was not admissible: a random admissible action)."""
  params = alfworld_expert.task_params(episode.task)
  obj, parent = params["object_target"], params["parent_target"]
  room = alfworld_expert.entities(episode.observations[0])
  holds = {r.lower() for r, objects in alfred_constants.VAL_RECEPTACLE_OBJECTS.items()
           if obj in {o.lower() for o in objects}}
  out, visited, phase = [], set(), "object"
  for t, action in enumerate(episode.actions):
    seen = any(re.search(rf"\b{obj} \d+", o) for o in episode.observations[1:t + 1])
    expected = ()
    fallback = t > 0 and episode.actions[t - 1] == "look"
    if action.startswith("go to ") and (phase == "parent" or not seen) and not fallback:
      tier = (lambda r: r.split()[0] == parent) if phase == "parent" else (lambda r: r.split()[0] in holds)
      named = action[len("go to "):]
      expected = tuple(sorted(f"go to {r}" for r in room if r not in visited and tier(r) == tier(named)
                              and f"go to {r}" in episode.admissible_actions[t]))
    out.append(expected)
    if action.startswith("go to "):
      visited.add(action[len("go to "):])
    if action.startswith("take "):
      phase, visited = "parent", set()
  return out


def test_the_experts_search_candidates_are_its_unvisited_receptacles_of_the_named_tier(real_episodes):
  """On real games (the engine's expert, `run_episode`): each search step's candidates equal their enumeration,
  hold a*, and at least one game's first go-to chooses among several."""
  sizes = []
  for episode in real_episodes:
    assert episode.won
    for t, (action, search) in enumerate(zip(episode.actions, episode.search)):
      assert not search or action in search
      sizes.append(len(search))
    assert [tuple(sorted(c)) for c in episode.search] == enumerated_search(episode), episode.task.task_id
  assert max(sizes) > 5 and sizes.count(0) > len(sizes) // 3


def test_a_spread_search_turn_shares_the_peak_and_the_judge_skips_every_candidate(real_episodes, real_turns):
  """search="spread": a search step's candidates share 1 - eps, other turns keep one peak, a misdirected turn
  keeps its one wrong peak; the expert_belief judge calls a candidate other than a* Skip (Weak under "peak")."""
  episode, tokenizer = real_episodes[0], real_turns[1]
  assert len(episode.search[0]) > 2
  # The student plays another candidate at turn 1, then the expert's actions (over the game twice: 10 turns).
  turns = []
  for t, (admissible, expert, search) in enumerate(
      (list(zip(episode.admissible_actions, episode.actions, episode.search)) * 2)[:10]):
    action = next(c for c in search if c != expert) if t == 0 else expert
    turns.append(FakeTurn(admissible, action, expert, search))
    turns[-1].valid, turns[-1].observation, turns[-1].response, turns[-1].feedback = True, "", "", ""
    turns[-1].response_end = ""
  for eta in (0.0, 1.0):
    config = expert_teacher.ExpertTeacherConfig(eps_on=0.1, eps_off=0.05, eta=eta, search="spread")
    beliefs = expert_teacher.episode_beliefs("game", turns, config)
    peak_beliefs = expert_teacher.episode_beliefs("game", turns, dataclasses.replace(config, search="peak"))
    for turn, b, p in zip(turns, beliefs, peak_beliefs):
      eps = 0.1 if b.on_path else 0.05
      spread = len(turn.expert_search) > 1 and not b.misdirected
      peaks = [b.actions.index(c) for c in turn.expert_search] if spread else [b.actions.index(b.peak)]
      assert b.probs[peaks] == pytest.approx((1 - eps) / len(peaks))
      assert b.probs.sum() == pytest.approx(1.0) and np.all(np.delete(b.probs, peaks) < b.probs[peaks[0]])
      assert (b.peak, b.misdirected, b.on_path) == (p.peak, p.misdirected, p.on_path)
      assert p.probs[b.actions.index(p.peak)] == pytest.approx(1 - eps)  # "peak": today's single peak.
    if eta == 1.0:
      assert any(b.misdirected and len(t.expert_search) > 1 for t, b in zip(turns, beliefs))
    episodes = [FakeEpisode(turns)]
    for search, first in (("spread", losses.Label.SKIP), ("peak", losses.Label.WEAK)):
      teacher = expert_teacher.ExpertTeacher(dataclasses.replace(config, search=search), tokenizer,
                                             sampler_config(tokenizer, True), len(tokenizer))
      labels = judge_lib.make_judge(judge_lib.JudgeConfig(mode="expert_belief"), teacher=teacher).label(
          episodes, len(turns)).labels[0]
      assert labels[0] == first


class FakeEpisode:
  def __init__(self, turns, task_id="game"):
    self.turns = turns
    self.task = type("Task", (), {"task_id": task_id})()
    self.task_text = ""


def test_expert_belief_judge_is_the_oracle_at_eta_0_and_errs_where_the_teacher_is_misdirected(real_turns):
  turns = knob_episode(real_turns)
  for turn in turns:
    turn.valid, turn.observation, turn.response, turn.feedback, turn.response_end = True, "", "", "", ""
  episodes = [FakeEpisode(turns)]
  tokenizer = real_turns[1]
  for eta in (0.0, 1.0):
    teacher = expert_teacher.ExpertTeacher(expert_teacher.ExpertTeacherConfig(eta=eta), tokenizer,
                                           sampler_config(tokenizer, True), len(tokenizer))
    judge = judge_lib.make_judge(judge_lib.JudgeConfig(mode="expert_belief"), teacher=teacher)
    labels = judge.label(episodes, len(turns)).labels[0]
    oracle, _ = judge_lib.oracle_labels(episodes, len(turns))
    beliefs = teacher.beliefs(episodes)[0]
    wrong = np.array([b.misdirected for b in beliefs])
    if eta == 0.0:
      np.testing.assert_array_equal(labels, oracle[0])
    else:
      # The student plays the expert's action off the path: the misdirected teacher calls it Weak.
      assert wrong.any()
      np.testing.assert_array_equal(labels[wrong], losses.Label.WEAK)
      np.testing.assert_array_equal(labels[~wrong], oracle[0][~wrong])


# ------------------------------------------------------------------------------------------
# Config validation.


def test_the_control_config_validates_for_every_eta():
  for eta in alfworld_control.ETAS:
    config = config_lib.validate(alfworld_control.get_config(str(eta)))
    assert config.teacher.kind == "expert" and config.teacher.expert.eta == eta
    assert config.pipeline.sweep == f"eta{eta:g}"
  # Both estimators: the sampled k1 and the exact divergence over decoding's support (E2/E10).
  for estimator, divergence in (("sampled", "reverse_kl"), ("full", "reverse_kl"), ("full", "forward_kl")):
    config = alfworld_control.get_config("0")
    config.loss.estimator, config.loss.divergence = estimator, divergence
    assert config_lib.validate(config).loss.estimator == estimator


def test_the_qwen3_control_config_is_the_study_with_a_given_student_and_no_teacher_checkpoint():
  for eta in alfworld_control.ETAS:
    config = alfworld_control_qwen3.get_config(str(eta))
    with pytest.raises(config_lib.ConfigError, match="config.student.hf_dir, config.tokenizer_dir must be set"):
      config_lib.validate(config)
    config.student.hf_dir = config.tokenizer_dir = "/ckpt/Qwen3-0.6B"
    # The expert needs no checkpoint and no SFT: teacher_steps 0 with no teacher.hf_dir is the study's.
    assert config.pipeline.teacher_steps == 0 and not config.teacher.hf_dir
    flat = provenance.flatten(config_lib.validate(config))
    study = provenance.flatten(alfworld_control.get_config(str(eta)))
    for key in ("teacher.kind", "teacher.expert", "judge.mode", "env.task_types", "env.max_turns", "sft.thoughts",
                "train.batch_episodes", "pipeline.distill_steps", "pipeline.methods", "pipeline.seeds",
                "pipeline.sweep"):
      under = [k for k in study if k == key or k.startswith(f"{key}.")]
      assert under and all(flat[k] == study[k] for k in under), key
    assert config.sampling.constrained and config.sampling.enable_thinking and config.student.model.remat


@pytest.mark.parametrize("change, named", [
    ({"sampling.constrained": False, "sampling.free_thought": False, "sampling.max_thought_tokens": 0},
     "config.sampling.constrained=True"),
    ({"judge.mode": "prompt", "method": "sage_opd"}, "cannot answer"),
    ({"method": "opd_two_rollout"}, "does not generate"),
    ({"teacher.expert.eps_off": 1.0}, "config.teacher.expert.eps_off"),
    ({"teacher.expert.eta": 1.5}, "config.teacher.expert.eta"),
    ({"teacher.expert.search": "wide"}, "config.teacher.expert.search"),
    ({"teacher.expert.eps_over": "tokens"}, "config.teacher.expert.eps_over"),
    ({"sft.thoughts": "subgoal", "sampling.free_thought": False, "sampling.max_thought_tokens": 0},
     "config.sampling.free_thought=True"),
])
def test_bad_expert_teacher_configs_are_refused_with_the_reason(change, named):
  config = alfworld_control.get_config("0")
  config.update_from_flattened_dict(change)
  with pytest.raises(config_lib.ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(config)


def test_the_expert_teacher_on_an_env_without_an_expert_is_refused():
  config = alfworld_control.get_config("0")
  config.env.name = "scienceworld"
  config.env.data_dir = ""
  config.env.train_split, config.env.eval_splits = "train", ("dev",)
  config.demos.split, config.pipeline.heldout_split = "train", "dev"
  config.sft.thoughts, config.sft.renumbered_copies = "none", 0
  with pytest.raises(config_lib.ConfigError, match="'scienceworld' has none"):
    config_lib.validate(config)
  model_teacher = base.get_config()
  model_teacher.judge.mode = "expert_belief"
  with pytest.raises(config_lib.ConfigError, match="teacher.kind='expert'"):
    config_lib.validate(model_teacher)



# ------------------------------------------------------------------------------------------
# The study's results page.


def test_control_results_average_each_etas_seeds_and_label_mix(tmp_path):
  from sage_opd_jax import provenance, results  # pylint: disable=g-import-not-at-top

  config = alfworld_control.get_config("0")
  # sage_opd's seed 2 has no OPD run to pair with; seeds 0 and 1 differ by 0.1 and 0.3.
  won = {(0.0, "opd"): [0.4, 0.6], (0.0, "sage_opd"): [0.5, 0.9, 0.0], (0.5, "opd"): [0.2, 0.3]}
  skip = {0.0: 0.6, 0.5: 0.3}

  def finished_run(eta, method, seed, success, sweep=None):
    run_dir = tmp_path / "sweeps" / (sweep or f"eta{eta:g}") / "runs" / method / f"seed{seed}"
    run_config = alfworld_control.get_config(str(eta))
    run_config.pipeline.sweep = sweep or run_config.pipeline.sweep
    provenance.check(run_config, run_dir)
    (run_dir / "hf").mkdir(parents=True)
    (run_dir / "hf" / "config.json").write_text("{}")
    rows = [{"step": 1, "judge/skip_frac": skip[eta], "judge/weak_frac": 1 - skip[eta], "judge/strong_frac": 0.0,
             "judge/oracle_accuracy": 1.0 - eta},
            {"step": 2, "eval/valid_seen/t0/success": success, "eval/valid_unseen/t0/success": success / 2}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  for (eta, method), successes in won.items():
    for seed, success in enumerate(successes):
      finished_run(eta, method, seed, success)
  (tmp_path / "student_eval").mkdir()
  (tmp_path / "student_eval" / "metrics.jsonl").write_text(json.dumps(
      {"step": 0, "eval/valid_seen/t0/success": 0.1, "eval/valid_unseen/t0/success": 0.05}) + "\n")
  results.write_results(tmp_path, config, results_dir=tmp_path / "docs")  # As the pipeline does after each eta.
  out = tmp_path / results.CONTROL
  assert not (tmp_path / "docs_eta0").exists()  # One eta's CSV and plots stay in its sweep's folder.
  with open(tmp_path / "docs" / "control.csv", encoding="utf-8") as f:
    rows = {(float(r["eta"]), r["method"]): r for r in csv.DictReader(f)}
  assert set(rows) == set(won)
  for key, successes in won.items():
    assert float(rows[key]["valid_seen/success_mean"]) == pytest.approx(np.mean(successes), abs=1e-4)
    assert float(rows[key]["valid_seen/success_std"]) == pytest.approx(np.std(successes), abs=1e-4)
    assert float(rows[key]["valid_unseen/success_mean"]) == pytest.approx(np.mean(successes) / 2, abs=1e-4)
    assert float(rows[key]["judge/skip_frac"]) == pytest.approx(skip[key[0]])
    assert float(rows[key]["judge/oracle_accuracy"]) == pytest.approx(1.0 - key[0])
  sage, opd = rows[(0.0, "sage_opd")], rows[(0.0, "opd")]
  assert float(sage["valid_seen/minus_opd_mean"]) == pytest.approx(0.2, abs=1e-4)
  # Seed 0 against 1 and 1 against 0 would give 0.3.
  assert float(sage["valid_seen/minus_opd_std"]) == pytest.approx(0.1, abs=1e-4)
  assert float(sage["valid_unseen/minus_opd_mean"]) == pytest.approx(0.1, abs=1e-4)
  assert opd["valid_seen/minus_opd_mean"] == "" and rows[(0.5, "opd")]["valid_seen/minus_opd_std"] == ""
  report = (out / "control.md").read_text()
  assert "valid_seen 0.100" in report and "| 0.5 | opd | 2 | 0.250 ± 0.050 |" in report
  assert "| 0 | sage_opd | 2 | +0.200 ± 0.100 | +0.100 ± 0.050 |" in report
  assert (tmp_path / "docs" / "success_vs_eta.png").stat().st_size and (out / "judge_labels_vs_eta.png").exists()

  # Each sweep rewrites the report as its runs finish: every file is replaced whole, so a reader that opened it
  # before a rewrite (or a second sweep writing it at the same moment) reads one complete version, not a mix.
  docs_png = tmp_path / "docs" / "success_vs_eta.png"
  before_csv, before_md, before_png = (out / "control.csv").read_text(), report, docs_png.read_bytes()
  with open(out / "control.csv", encoding="utf-8") as old_csv, open(out / "control.md", encoding="utf-8") as old_md, \
       open(docs_png, "rb") as old_png:
    finished_run(0.5, "sage_opd", 0, 0.8)
    results.write_results(tmp_path, alfworld_control.get_config("0.5"), results_dir=tmp_path / "docs")
    assert (old_csv.read(), old_md.read(), old_png.read()) == (before_csv, before_md, before_png)
  assert "| 0.5 | sage_opd | 1 | 0.800 ± 0.000 |" in (out / "control.md").read_text()
  assert (tmp_path / "docs" / "control.csv").read_text() == (out / "control.csv").read_text() != before_csv
  assert not [f.name for folder in (out, tmp_path / "docs") for f in folder.iterdir() if f.name.startswith(".tmp")]

  # A probe at eta 0 under a sweep name of its own is a series of its own, and its margin pairs with its own OPD.
  for seed in (0, 1):
    finished_run(0.0, "opd", seed, 0.9, sweep="eta0_lr")
    finished_run(0.0, "sage_opd", seed, 0.5, sweep="eta0_lr")
  results.write_results(tmp_path, alfworld_control.get_config("0"), results_dir=tmp_path / "docs")
  with open(out / "control.csv", encoding="utf-8") as f:
    rows = {(float(r["eta"]), r["method"]): r for r in csv.DictReader(f)}
  assert float(rows[(0.0, "sage_opd")]["valid_seen/minus_opd_mean"]) == pytest.approx(0.2, abs=1e-4)
  assert float(rows[(0.0, "sage_opd (eta0_lr)")]["valid_seen/minus_opd_mean"]) == pytest.approx(-0.4, abs=1e-4)
  assert float(rows[(0.0, "opd (eta0_lr)")]["valid_seen/success_mean"]) == pytest.approx(0.9, abs=1e-4)
  assert float(rows[(0.0, "opd")]["valid_seen/success_mean"]) == pytest.approx(0.5, abs=1e-4)
  assert "| 0 | sage_opd (eta0_lr) | 2 | -0.400 ± 0.000 | -0.200 ± 0.000 |" in (out / "control.md").read_text()
