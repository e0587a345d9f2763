"""SFT data: the loss masks land exactly on the assistant tokens, in the rollout batch's layout."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sage_opd_jax import losses
from sage_opd_jax import prompts
from sage_opd_jax import sft_data
from sage_opd_jax import tokenization
from sage_opd_jax.envs import demos

TASK = "Your task is to: put a pen in the drawer."
DEMO = sft_data.Demonstration(
    task_text=TASK,
    observations=[
        "You are in the middle of a room. You see a desk 1 and a drawer 2.",
        "You arrive at desk 1. On the desk 1, you see a pen 1.",
        "You pick up the pen 1 from the desk 1.",
        "You won!",
    ],
    actions=["go to desk 1", "take pen 1 from desk 1", "move pen 1 to drawer 2"],
    admissible_actions=[["go to desk 1", "go to drawer 2"], ["take pen 1 from desk 1", "look"],
                        ["move pen 1 to drawer 2", "go to drawer 2"]],
)
JUDGE = sft_data.JudgeExample.from_demo(demos.JudgeExample(
    task=TASK, history=[(DEMO.observations[0], DEMO.actions[0])], observation=DEMO.observations[1],
    admissible_actions=list(DEMO.admissible_actions[1]), action="look", feedback="You see a desk 1.",
    label="Weak", task_id="fixture", turn=1))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [TASK, *DEMO.observations, *(a for acts in DEMO.admissible_actions for a in acts), JUDGE.feedback,
           "Nothing happens.",
           *tokenization.prompt_texts()]
  return tokenization.build_word_tokenizer(texts, tmp_path_factory.mktemp("tok"))


def _turn_text(tokenizer, tokens, turn_ids, k):
  return tokenizer.decode(tokens[turn_ids == k].tolist())


def test_acting_masks_cover_exactly_the_assistant_responses(tokenizer):
  data = sft_data.build_sft_data(tokenizer, [DEMO], [], seq_len=400, seed=None)
  tokens, mask, turn_ids = (data.arrays[k][0] for k in ("tokens", "attention_mask", "turn_ids"))
  assert data.num_truncated == data.num_dropped == 0
  for k, action in enumerate(DEMO.actions, start=1):
    assert _turn_text(tokenizer, tokens, turn_ids, k) == f"<think></think><action>{action}</action><|im_end|>"
  assert data.arrays["num_turns"].tolist() == [3]
  # Everything else is the prompt: the whole row decodes to the ChatML transcript (which ends
  # with the template's newline after the last message; the sample stops at its end-of-turn).
  messages = prompts.episode_messages(
      TASK, DEMO.observations[:3], [sft_data.expert_response(a) for a in DEMO.actions], DEMO.admissible_actions)
  n = int(mask.sum())
  transcript = prompts.render_chat(tokenizer, messages, add_generation_prompt=False)
  assert tokenizer.decode(tokens[:n].tolist()) + "\n" == transcript
  assert np.all(tokens[n:] == tokenizer.pad_token_id) and np.all(turn_ids[n:] == 0) and np.all(mask[:n] == 1)
  # Observation and template tokens between the turns carry no turn id.
  assert "Observation: You arrive at desk 1" in tokenizer.decode(tokens[:n][turn_ids[:n] == 0].tolist())


def _window_reference(full_tokens, full_turn_ids, t, k):
  """Turn t's row under a k-turn window, cut from the whole transcript as the rollout builds it:
  the episode's start, then turns t-k..t-1 (response and the observation answering it), then a_t."""
  start = int(np.argmax(full_turn_ids > 0))
  first = int(np.argmax(full_turn_ids == t - k))
  end = int(np.nonzero(full_turn_ids == t)[0][-1]) + 1
  tokens = np.concatenate([full_tokens[:start], full_tokens[first:end]])
  return tokens, np.concatenate([full_turn_ids[:start], full_turn_ids[first:end]]) == t


@pytest.mark.parametrize("trained", [None, (False, False, True)])
def test_windowed_rows_are_the_contexts_the_rollout_acts_from(tokenizer, trained):
  demo = dataclasses.replace(DEMO, trained=trained)
  full = sft_data.build_sft_data(tokenizer, [dataclasses.replace(DEMO, trained=None)], [], seq_len=400, seed=None)
  n = int(full.arrays["attention_mask"][0].sum())
  full_tokens, full_turn_ids = full.arrays["tokens"][0][:n], full.arrays["turn_ids"][0][:n]
  windows = sft_data.windowed(demo, 1)
  # Turns 1-2 keep their whole history (one row, both trained unless a correction); turn 3 lost turn 1.
  assert [len(w.actions) for w in windows] == ([2, 2] if trained is None else [2])
  data = sft_data.build_sft_data(tokenizer, windows, [], seq_len=400, seed=None)
  row = len(windows) - 1
  n = int(data.arrays["attention_mask"][row].sum())
  tokens, trained_at = _window_reference(full_tokens, full_turn_ids, t=3, k=1)
  np.testing.assert_array_equal(data.arrays["tokens"][row][:n], tokens)
  np.testing.assert_array_equal(data.arrays["turn_ids"][row][:n] > 0, trained_at)
  assert "pick up the pen 1" in tokenizer.decode(tokens.tolist())
  assert "You are in the middle of a room" in tokenizer.decode(tokens.tolist())
  assert "You arrive at desk 1" not in tokenizer.decode(tokens.tolist())
  if trained is None:
    head_n = int(data.arrays["attention_mask"][0].sum())
    end = int(np.nonzero(full_turn_ids == 2)[0][-1]) + 1
    np.testing.assert_array_equal(data.arrays["tokens"][0][:head_n], full_tokens[:end])
  # A window as long as the episode leaves it whole; none at all is refused.
  assert sft_data.windowed(demo, 2) == [demo] and sft_data.windowed(demo, None) == [demo]
  with pytest.raises(ValueError, match="history_turns=0"):
    sft_data.windowed(demo, 0)


def test_judge_sample_masks_only_the_label_word(tokenizer):
  data = sft_data.build_sft_data(tokenizer, [], [JUDGE], seq_len=400, history_turns=2, seed=None)
  tokens, mask, turn_ids = (data.arrays[k][0] for k in ("tokens", "attention_mask", "turn_ids"))
  assert data.arrays["is_judge"].tolist() == [True]
  assert _turn_text(tokenizer, tokens, turn_ids, 1) == "Weak<|im_end|>"
  assert set(np.unique(turn_ids).tolist()) == {0, 1}
  prompt = prompts.render_judge_prompt(
      tokenizer, TASK, JUDGE.history, JUDGE.observation, "<think></think><action>look</action>", JUDGE.feedback,
      JUDGE.admissible_actions, 2)
  assert tokenizer.decode(tokens[(turn_ids == 0) & (mask == 1)].tolist()) == prompt
  assert "The environment's feedback to it:\nYou see a desk 1." in prompt
  assert "Admissible actions were:" in prompt
  # config.judge.show_admissible=False trains the question without the list.
  bare = sft_data.build_sft_data(tokenizer, [], [JUDGE], seq_len=400, history_turns=2, judge_admissible=False,
                                 seed=None).arrays
  bare_prompt = prompts.render_judge_prompt(
      tokenizer, TASK, JUDGE.history, JUDGE.observation, "<think></think><action>look</action>", JUDGE.feedback,
      [], 2)
  assert "Admissible actions were:" not in bare_prompt
  assert tokenizer.decode(bare["tokens"][0][(bare["turn_ids"][0] == 0) & (bare["attention_mask"][0] == 1)].tolist()
                          ) == bare_prompt


def test_long_episodes_keep_their_first_whole_turns(tokenizer):
  full = sft_data.build_sft_data(tokenizer, [DEMO], [], seq_len=400, seed=None)
  turn_ids = full.arrays["turn_ids"][0]
  end_of_turn_2 = int(np.flatnonzero(turn_ids == 2)[-1]) + 1
  cut = sft_data.build_sft_data(tokenizer, [DEMO], [], seq_len=end_of_turn_2 + 3, seed=None)
  assert cut.num_truncated == 1 and cut.num_dropped == 0
  assert cut.arrays["num_turns"].tolist() == [2]
  np.testing.assert_array_equal(cut.arrays["tokens"][0, :end_of_turn_2], full.arrays["tokens"][0, :end_of_turn_2])
  assert cut.arrays["attention_mask"][0].sum() == end_of_turn_2
  # A turn limit cuts the same way: turn ids never exceed it.
  limited = sft_data.build_sft_data(tokenizer, [DEMO], [], seq_len=400, max_turns=2, seed=None)
  assert limited.num_truncated == 1 and limited.arrays["turn_ids"].max() == 2
  assert limited.arrays["attention_mask"][0].sum() == end_of_turn_2
  np.testing.assert_array_equal(limited.arrays["tokens"][0, :end_of_turn_2], full.arrays["tokens"][0, :end_of_turn_2])
  # Too short for even the first turn, or for the judge question: dropped and counted.
  tiny = sft_data.build_sft_data(tokenizer, [DEMO], [JUDGE], seq_len=20, seed=None)
  assert tiny.num_dropped == 2 and tiny.arrays["tokens"].shape == (0, 20)


def test_batch_feeds_the_sft_loss(tokenizer):
  data = sft_data.build_sft_data(tokenizer, [DEMO, DEMO], [JUDGE], seq_len=400, seed=1)
  arrays = data.arrays
  assert arrays["tokens"].shape == (3, 400) and arrays["is_judge"].sum() == 1
  batch = {k: jnp.asarray(arrays[k]) for k in ("tokens", "turn_ids")}
  losses.validate_batch(batch, num_turns=3)
  # Uniform logits: the SFT loss is log V on every masked token, and only those count.
  vocab = len(tokenizer)
  loss, metrics = losses.sage_opd_loss(jnp.zeros((3, 400, vocab)), batch, method="sft", num_turns=3)
  assert float(metrics["num_tokens"]) == float((arrays["turn_ids"] > 0).sum())
  np.testing.assert_allclose(float(loss), np.log(vocab), rtol=1e-6)


def test_unparseable_judge_example_has_no_action_tag(tokenizer):
  example = sft_data.JudgeExample(
      task_text=TASK, history=[], observation=DEMO.observations[0], action=None, feedback="Nothing happens.",
      admissible_actions=DEMO.admissible_actions[0], label="strong")
  assert example.label == losses.Label.STRONG
  data = sft_data.build_sft_data(tokenizer, [], [example], seq_len=400, seed=None)
  tokens, turn_ids = data.arrays["tokens"][0], data.arrays["turn_ids"][0]
  prompt = tokenizer.decode(tokens[(turn_ids == 0) & (data.arrays["attention_mask"][0] == 1)].tolist())
  assert "The agent's latest response:\n\nThe environment's feedback to it:\nNothing happens." in prompt
  assert prompts.parse_action(prompt.split("latest response:")[1].split("The environment")[0]) is None
  assert _turn_text(tokenizer, tokens, turn_ids, 1) == "Strong<|im_end|>"


def test_bad_inputs_name_the_problem(tokenizer):
  with pytest.raises(ValueError, match="label"):
    sft_data.label_code("Maybe")
  with pytest.raises(ValueError, match="label"):
    sft_data.JudgeExample(task_text=TASK, history=[], observation="", action="look", feedback="",
                          admissible_actions=[], label=7)
  bad = sft_data.Demonstration(task_text=TASK, observations=DEMO.observations, actions=DEMO.actions)
  with pytest.raises(ValueError, match="admissible_actions"):
    sft_data.build_sft_data(tokenizer, [bad], [], seq_len=400)
  data = sft_data.build_sft_data(tokenizer, [bad], [], seq_len=400, show_admissible=False)
  assert data.arrays["tokens"].shape[0] == 1


def test_subgoal_thoughts_fill_the_think_tags(tokenizer):
  record = {"env": "alfworld", "task_id": "pick_and_place_simple-Pen-None-Drawer-301/trial_T1", "task": TASK,
            "observations": list(DEMO.observations), "actions": list(DEMO.actions),
            "admissible_actions": [list(a) for a in DEMO.admissible_actions]}
  plain = sft_data.Demonstration.from_record(record)
  demo = sft_data.Demonstration.from_record(record, thoughts="subgoal")
  assert plain.thoughts is None
  assert list(demo.thoughts) == ["find pen", "find pen", "put pen 1 in drawer"]
  named = sft_data.Demonstration.from_record(record, thoughts="subgoal_take")
  assert list(named.thoughts) == ["find pen", "take pen", "put pen 1 in drawer"]
  data = sft_data.build_sft_data(tokenizer, [demo], [], seq_len=400, seed=None)
  tokens, turn_ids = data.arrays["tokens"][0], data.arrays["turn_ids"][0]
  assert prompts.THINK_OPEN + "put pen 1 in drawer" + prompts.THINK_CLOSE in _turn_text(tokenizer, tokens, turn_ids, 3)
  with pytest.raises(ValueError, match="scienceworld"):
    sft_data.Demonstration.from_record(dict(record, env="scienceworld"), thoughts="subgoal")
  with pytest.raises(ValueError, match="thoughts"):
    sft_data.Demonstration.from_record(record, thoughts="chain")


def _rollout_episode(layout, steps):
  """An episode as the rollout records it: each response's ids end with the end-of-turn token the
  sampler stopped at and kept, and the next turn's text is encoded after it."""
  from sage_opd_jax import rollout  # pylint: disable=g-import-not-at-top
  from sage_opd_jax.envs import base as env_base  # pylint: disable=g-import-not-at-top

  tokenizer = layout.tokenizer
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  episode = rollout.Episode(task=env_base.Task("alfworld", "train", "fixture", "pick_and_place_simple"),
                            task_text=TASK)
  episode.prompt_tokens = encode(prompts.episode_start_text(layout, TASK, steps[0][0]))
  for observation, response, action, feedback in steps:
    ids = encode(response + "<|im_end|>")
    episode.turns.append(rollout.Turn(
        observation=observation, admissible=[], response=response, response_tokens=ids, response_end="<|im_end|>",
        response_logprobs=np.zeros(len(ids), np.float32), action=action, feedback=feedback, valid=True,
        next_tokens=encode(prompts.next_turn_text(layout, feedback, None, "<|im_end|>"))))
  return episode


@pytest.mark.parametrize("tokenizer_name, acting_thinking", [("word", None), ("qwen3", True), ("qwen3", False)])
@pytest.mark.parametrize("last", [True, False])
def test_transcript_judge_sample_is_the_question_the_trainer_asks(request, tokenizer_name, acting_thinking, last):
  from sage_opd_jax import judge  # pylint: disable=g-import-not-at-top
  from sage_opd_jax import rollout  # pylint: disable=g-import-not-at-top

  tokenizer = request.getfixturevalue({"word": "tokenizer", "qwen3": "qwen3_tokenizer"}[tokenizer_name])
  layout = prompts.ChatLayout.from_tokenizer(tokenizer, acting_thinking)
  example = sft_data.JudgeExample(task_text=TASK, history=[(DEMO.observations[0], DEMO.actions[0])],
                                  observation=DEMO.observations[1], action="look", feedback=JUDGE.feedback,
                                  admissible_actions=list(DEMO.admissible_actions[1]), label="Strong",
                                  thought="find pen", history_thoughts=["find desk"])
  data = sft_data.build_sft_data(tokenizer, [], [example], seq_len=400, judge_admissible=False,
                                 judge_transcript=True, show_admissible=False, seed=None,
                                 enable_thinking=acting_thinking).arrays
  tokens, mask, turn_ids = data["tokens"][0], data["attention_mask"][0], data["turn_ids"][0]
  assert _turn_text(tokenizer, tokens, turn_ids, 1) == "Strong<|im_end|>"
  question = tokens[(turn_ids == 0) & (mask == 1)].tolist()
  # The held-out accuracy asks the same ids.
  assert sft_data.judge_prompt_ids(tokenizer, example, 2, False, transcript=True,
                                   acting_thinking=acting_thinking) == question

  # The same turn in a rollout transcript, as the last turn of its episode or followed by
  # another, whose user message holds the judged turn's feedback: the question re-encodes that
  # feedback with its own lines, so that it ends in the same tokens ("desk 1." then a newline
  # merge in Qwen's BPE).
  steps = [(DEMO.observations[0], sft_data.expert_response(DEMO.actions[0], "find desk", layout), DEMO.actions[0],
            DEMO.observations[1]),
           (DEMO.observations[1], sft_data.expert_response("look", "find pen", layout), "look", JUDGE.feedback)]
  if not last:
    steps.append((JUDGE.feedback, sft_data.expert_response("look", "", layout), "look", JUDGE.feedback))
  episode = _rollout_episode(layout, steps)
  batch = rollout.assemble_batch([episode], max_turns=4, pad_id=tokenizer.pad_token_id)
  asked = np.zeros((1, 4), bool)
  asked[0, 1] = True
  ((b, t, reach, text),) = judge.transcript_questions([episode], batch.turn_ids, tokenizer, asked,
                                                      show_admissible=False)
  assert (b, t) == (0, 1) and (reach == batch.attention_mask[0].sum()) == last
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  assert [*batch.tokens[0, :reach].tolist(), *encode(text)] == question
  # What the packed questions hold for the teacher's scoring forward is that sequence.
  packed = judge.prepare_transcript_judge([episode], 4, judge.JudgeConfig(mode="transcript", show_admissible=False),
                                          tokenizer, batch.tokens, batch.attention_mask, batch.turn_ids)
  (r,) = [r for _, t, r in packed.turns if t == 1]
  rows = packed.segments[0] == r + 1
  assert [*batch.tokens[0, :packed.reach[0][rows][0]].tolist(), *packed.tokens[0][rows].tolist()] == question


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_judge_samples_under_qwen3_thinking(qwen3_tokenizer, enable_thinking):
  data = sft_data.build_sft_data(qwen3_tokenizer, [], [JUDGE], seq_len=800, history_turns=2,
                                 judge_thinking=enable_thinking, seed=None).arrays
  tokens, mask, turn_ids = data["tokens"][0], data["attention_mask"][0], data["turn_ids"][0]
  question = tokens[(turn_ids == 0) & (mask == 1)].tolist()
  assert qwen3_tokenizer.decode(question).endswith(
      "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"))
  assert question == sft_data.judge_prompt_ids(qwen3_tokenizer, JUDGE, 2, enable_thinking=enable_thinking)
  # Thinking, the trained reply closes an empty thought before its label, which the judge parses.
  answer = _turn_text(qwen3_tokenizer, tokens, turn_ids, 1)
  assert answer == ("<think>\n\n</think>\n\n" if enable_thinking else "") + "Weak<|im_end|>"
  assert prompts.parse_judge_reply(answer.removesuffix("<|im_end|>")) == (losses.Label.WEAK, "answered")


def _pick_record(obj_class, observations, actions, task_id_trial="trial_T1"):
  return {"env": "alfworld", "task_id": f"pick_and_place_simple-{obj_class}-None-Drawer-301/{task_id_trial}",
          "task": f"Your task is to: put a {obj_class.lower()} in drawer.", "observations": observations,
          "actions": actions, "admissible_actions": [[a, "look"] for a in actions]}


def test_renamed_copies_rename_the_task_object_everywhere_and_only_it():
  pen = _pick_record("Pen", ["You see a desk 1 and a drawer 2.", "On the desk 1, you see a pen 1, and a pencil 2.",
                             "You pick up the pen 1 from the desk 1.", "You won!"],
                     ["go to desk 1", "take pen 1 from desk 1", "move pen 1 to drawer 2"])
  mug = _pick_record("Mug", ["You see a shelf 1.", "On the shelf 1, you see a mug 3, and a pen 2.",
                             "You pick up the mug 3 from the shelf 1.", "You won!"],
                     ["go to shelf 1", "take mug 3 from shelf 1", "move mug 3 to shelf 1"], "trial_T2")
  cd = _pick_record("CD", ["You see a safe 1.", "On the safe 1, you see a cd 1.", "You pick up the cd 1.", "You won!"],
                    ["go to safe 1", "take cd 1 from safe 1", "move cd 1 to drawer 1"], "trial_T3")
  out = sft_data.copies_with_renamed_objects([pen, mug, cd], copies=1, seed=0)
  assert len(out) == 3
  copies = {r["task_id"].split("/")[1]: r for r in out}
  # The mug episode shows a pen, so its copy can only be a cd; the pen episode's is a mug or a cd.
  assert copies["trial_T2"]["task_id"] == "pick_and_place_simple-CD-None-Drawer-301/trial_T2"
  assert copies["trial_T2"]["observations"][1] == "On the shelf 1, you see a cd 3, and a pen 2."
  assert copies["trial_T2"]["task"] == "Your task is to: put a cd in drawer."
  new = copies["trial_T1"]["task_id"].split("-")[1]
  assert new in ("Mug", "CD")
  word = new.lower()
  assert copies["trial_T1"]["observations"][1] == f"On the desk 1, you see a {word} 1, and a pencil 2."
  assert copies["trial_T1"]["actions"] == ["go to desk 1", f"take {word} 1 from desk 1", f"move {word} 1 to drawer 2"]
  assert copies["trial_T1"]["admissible_actions"][1] == [f"take {word} 1 from desk 1", "look"]
  # Thoughts follow the new name (they read the task folder).
  demo = sft_data.Demonstration.from_record(copies["trial_T1"], thoughts="subgoal")
  assert list(demo.thoughts) == [f"find {word}", f"find {word}", f"put {word} 1 in drawer"]
  assert sft_data.copies_with_renamed_objects([pen, mug, cd], copies=1, seed=0) == out  # Seeded.
  assert len(sft_data.copies_with_renamed_objects([pen, mug, cd], copies=2, seed=0)) == 2 + 1 + 2
  with pytest.raises(ValueError, match="copies=-1"):
    sft_data.copies_with_renamed_objects([pen], copies=-1, seed=0)


def test_read_demonstrations_adds_copies_of_the_first_limit(tmp_path):
  records = [_pick_record(c, [f"On the desk 1, you see a {c.lower()} 1.", "You won!"],
                          [f"take {c.lower()} 1 from desk 1"], f"trial_{c}") for c in ("Pen", "Mug", "Book")]
  demos.rewrite_jsonl(tmp_path / demos.DEMOS, records)
  read = sft_data.read_demonstrations(tmp_path, limit=2, renamed_copies=1, seed=3)
  firsts = [d.task_text for d in sft_data.read_demonstrations(tmp_path)][:2]
  assert [d.task_text for d in read[:2]] == firsts and len(read) == 4
  # Each copy follows its source, under another of the three names.
  assert all(copy.task_text != first for copy, first in zip(read[2:], firsts))
  assert all(copy.observations[0].split()[-2] == copy.task_text.split()[-3] for copy in read[2:])
  # Renamed copies of all three, then two renumbered copies of each, in the same order.
  both = sft_data.read_demonstrations(tmp_path, renamed_copies=1, renumbered_copies=2, seed=0)
  assert len(both) == 3 + 3 + 6
  assert [d.task_text for d in both[6:]] == [d.task_text for d in both[:3] for _ in range(2)]


def test_renumbered_copies_permute_each_receptacle_class_consistently():
  room = ("You are in the middle of a room. Looking quickly around you, you see a cabinet 2, a cabinet 1, a drawer 3, "
          "a drawer 2, a drawer 1, and a sidetable 1.\n\nYour task is to: put a pen in sidetable.")
  actions = ["go to drawer 1", "open drawer 1", "close drawer 1", "go to drawer 3", "take pen 2 from drawer 3",
             "go to sidetable 1", "move pen 2 to sidetable 1"]
  observations = [room, "You arrive at drawer 1. The drawer 1 is closed.",
                  "You open the drawer 1. The drawer 1 is open. In it, you see a cd 3.", "You close the drawer 1.",
                  "You arrive at drawer 3. On the drawer 3, you see a pen 2.",
                  "You pick up the pen 2 from the drawer 3.",
                  "You arrive at sidetable 1. On the sidetable 1, you see nothing.", "You won!"]
  record = {"env": "alfworld", "task_id": "pick_and_place_simple-Pen-None-SideTable-301/trial_T1",
            "task": "Your task is to: put a pen in sidetable.", "observations": observations, "actions": actions,
            "admissible_actions": [sorted([a, "go to cabinet 2", "go to drawer 2", "look"]) for a in actions]}
  out = sft_data.copies_with_renumbered_receptacles([record], copies=8, seed=0)
  assert len(out) == 8
  drawers = set()
  for copy in out:
    assert copy["observations"][0] == room  # The room lists the same receptacles under any permutation.
    took = copy["actions"][4]
    drawer = took.split(" from ")[1]
    drawers.add(drawer)
    # One drawer is renumbered the same everywhere; objects and the lone side table keep theirs.
    assert copy["actions"][3] == f"go to {drawer}" and took == f"take pen 2 from {drawer}"
    assert copy["observations"][4] == f"You arrive at {drawer}. On the {drawer}, you see a pen 2."
    assert copy["observations"][2].endswith("In it, you see a cd 3.")
    assert copy["actions"][5:] == actions[5:]
    opened = copy["actions"][0].removeprefix("go to ")
    assert opened != drawer and copy["actions"][1:3] == [f"open {opened}", f"close {opened}"]
    assert all(turn == sorted(turn) for turn in copy["admissible_actions"])
    assert {a for turn in copy["admissible_actions"] for a in turn} <= {
        "go to cabinet 1", "go to cabinet 2", "go to drawer 1", "go to drawer 2", "go to drawer 3", "look",
        "open drawer 1", "open drawer 2", "open drawer 3", "close drawer 1", "close drawer 2", "close drawer 3",
        "take pen 2 from drawer 1", "take pen 2 from drawer 2", "take pen 2 from drawer 3", "go to sidetable 1",
        "move pen 2 to sidetable 1"}
    # Thoughts read the task folder, which is unchanged.
    assert sft_data.Demonstration.from_record(copy, thoughts="subgoal").thoughts[5] == "put pen 2 in sidetable"
  assert len(drawers) > 1  # Eight draws of three drawers: not all the identity.
  assert sft_data.copies_with_renumbered_receptacles([record], copies=8, seed=0) == out  # Seeded.
  assert sft_data.copies_with_renumbered_receptacles([record], copies=8, seed=1) != out
  with pytest.raises(ValueError, match="copies=-1"):
    sft_data.copies_with_renumbered_receptacles([record], copies=-1, seed=0)

