"""Prompts: action and label parsing, the acting and judge prompts, the multi-turn layout."""

import hypothesis
import hypothesis.strategies as st
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sage_opd_jax import prompts
from sage_opd_jax.losses import Label

# Qwen2.5's ChatML template in shape (tools left out): a default system message when
# the conversation has none, then every message as <|im_start|>role\ncontent<|im_end|>\n.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _tiny_tokenizer(chat_template):
  tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_end|>": 1}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
  hf.chat_template = chat_template
  return hf


@pytest.fixture(scope="module")
def qwen_tok():
  return _tiny_tokenizer(QWEN25_TEMPLATE)


# -- parse_action ------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>go</think><action>go to desk 1</action>", "go to desk 1"),
        ("<action>  go   to\n desk 1 \n</action>", "go to desk 1"),
        ("<ACTION>Take Mug 2 from Desk 1</Action>", "take mug 2 from desk 1"),
        ("< action >open drawer 3< /action >", "open drawer 3"),
        ("I will act.\n<action>look</action>\nDone.", "look"),
        ("<think>x</think><action>go to bed 1", "go to bed 1"),  # Stopped before the closing tag.
        ("<think>maybe <action>look</action>?</think><action>inventory</action>", "inventory"),  # The last.
        # The first complete action wins: what follows it (a `</action>` stop that BPE merged away) never does.
        ("<action>look</action><action>", "look"),
        ("<action>look</action>\n<action>inventory</action>", "look"),
        ("<think>\nquote <action>x</action>\n</think>\n\n<action>go</action>\n<action>take</action>", "go"),
        ("<action>a <action>b</action>", "b"),  # An unclosed tag before the answer's.
        ("<action>look</action>", "look"),
        ("<think><action>look</action></think>", "look"),  # No answer after the thought: the thought's.
        ("<action></action><action>look</action>", None),  # The first complete action is empty.
        ("<action>   </action>", None),
        ("go to desk 1", None),
        ("", None),
        ("<act>look</act>", None),
    ],
)
def test_parse_action(response, expected):
  assert prompts.parse_action(response) == expected


def test_parse_action_can_keep_case():
  assert prompts.parse_action("<action>Focus on Red Box</action>", lowercase=False) == "Focus on Red Box"


_words = st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8), min_size=1, max_size=6)
_space = st.text(" \n\t", max_size=3)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(words=_words, before=_space, between=_space, after=_space, prefix=st.text(max_size=20),
                  closed=st.booleans())
def test_parse_action_property(words, before, between, after, prefix, closed):
  hypothesis.assume("<" not in prefix)
  body = before + (between + " ").join(words) + after
  response = prefix + "<action>" + body + ("</action> trailing text" if closed else "")
  assert prompts.parse_action(response) == " ".join(words)
  # The span starts at the first word and ends at the last one's end, whatever whitespace wraps them.
  start, end = prompts.action_span(response)
  assert response[start:end] == (between + " ").join(words)


# -- parse_judge_reply ---------------------------------------------------------

ANSWERED, UNCLOSED, NO_LABEL = "answered", prompts.UNCLOSED_THINK, prompts.NO_LABEL


@pytest.mark.parametrize(
    "text, label, status",
    [
        ("Skip", Label.SKIP, ANSWERED),
        ("  weak\n", Label.WEAK, ANSWERED),
        ("STRONG.", Label.STRONG, ANSWERED),
        ("Answer: Skip", Label.SKIP, ANSWERED),
        ("The step is Weak, I think.", Label.WEAK, ANSWERED),
        ("<think>Skip or Strong? It is redundant.</think> Weak", Label.WEAK, ANSWERED),
        ("<think>\nOkay, the agent went to the desk.\n</think>\n\nSkip", Label.SKIP, ANSWERED),  # Qwen3's.
        ("", Label.STRONG, NO_LABEL),
        ("banana", Label.STRONG, NO_LABEL),
        ("Skip or Weak", Label.STRONG, NO_LABEL),
        ("Skipping", Label.STRONG, NO_LABEL),  # Not the word itself.
        ("skip skip", Label.SKIP, ANSWERED),  # Repeating one label is still one label.
        # A reply still thinking has no answer, whatever labels its thought mentions.
        ("<think>\nOkay,", Label.STRONG, UNCLOSED),
        ("<think>The step is a Skip", Label.STRONG, UNCLOSED),
        ("<think>a</think>Weak<think>no, Skip", Label.STRONG, UNCLOSED),
        ("<think>Skip, surely.</think>\n\n", Label.STRONG, NO_LABEL),  # The label must follow the thought.
    ],
)
def test_parse_judge_reply(text, label, status):
  assert prompts.parse_judge_reply(text) == (label, status)
  if status != ANSWERED:
    assert label == prompts.UNANSWERED_LABEL


def test_label_names_match_constants():
  for name, label in zip(prompts.LABEL_NAMES, Label):
    assert prompts.parse_judge_reply(name) == (label, ANSWERED)


# -- The step-wise acting prompt -----------------------------------------------

TASK = "Your task is to: put a clean mug in coffeemachine."
HISTORY = [("obs one", "go to desk 1"), ("obs two", None), ("obs three", "take mug 1 from desk 1")]


def test_acting_prompt_shows_only_last_k():
  text = prompts.acting_prompt_text(TASK, HISTORY, "obs four", ["look", "go to sinkbasin 1"], k=2)
  assert TASK in text
  assert "obs one" not in text and "go to desk 1" not in text
  assert "[Observation 2: obs two]" in text and "[Action 2: (no valid action)]" in text
  assert "[Observation 3: obs three]" in text and "[Action 3: take mug 1 from desk 1]" in text
  assert "step 4" in text and "obs four" in text
  assert "[look, go to sinkbasin 1]" in text
  assert "<think>" in text and "</think>" in text and "<action>" in text and "</action>" in text
  # The history comes before the current observation.
  assert text.index("obs three") < text.index("obs four")


def test_acting_prompt_without_history_or_actions():
  text = prompts.acting_prompt_text(TASK, [], "first obs", [], k=3)
  assert "Observation 1" not in text and "admissible actions now" not in text
  assert "step 1" in text and "first obs" in text
  with pytest.raises(ValueError, match="k"):
    prompts.acting_prompt_text(TASK, HISTORY, "o", [], k=-1)


def test_acting_prompt_through_chat_template(qwen_tok):
  content = prompts.acting_prompt_text(TASK, HISTORY, "obs four", ["look"], k=3)
  rendered = prompts.render_acting_prompt(qwen_tok, TASK, HISTORY, "obs four", ["look"], k=3)
  default_system = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n")
  assert rendered == default_system + f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def test_no_chat_template_is_an_error_and_none_is_plain():
  with pytest.raises(ValueError, match="chat_template"):
    prompts.render_acting_prompt(_tiny_tokenizer(None), TASK, [], "o", [], k=2)
  plain = prompts.render_acting_prompt(None, TASK, [], "o", [], k=2)
  assert plain == "User: " + prompts.acting_prompt_text(TASK, [], "o", [], k=2) + "\n\nAssistant: "


# -- The judge prompt ------------------------------------------------------------

# The judge prompt of docs/method.md, line by line, with the placeholders filled in below.
METHOD_JUDGE_LINES = [
    "You are supervising an agent in a text environment.",
    "Task: {task}",
    "Recent history (oldest first):",
    "{history}",
    "The agent's latest response:",
    "{response}",
    "The environment's feedback to it:",
    "{feedback}",
    "Admissible actions were: {admissible}",
    "Decide whether the agent needs correction at this step.",
    "Skip   = the step is fine (it makes progress, or it is a reasonable alternative).",
    "Weak   = the step is valid but poor (off-plan, redundant, repeated).",
    "Strong = the step is wrong (invalid, harmful, or repeats a failure).",
    "Answer with one word: Skip, Weak or Strong.",
]


def test_judge_prompt_matches_method(qwen_tok):
  response = "<think>the mug is here</think><action>take mug 1 from desk 1</action>"
  text = prompts.judge_prompt_text(
      TASK, HISTORY[:2], "obs three", response, "You pick up the mug 1 from the desk 1.", ["look", "inventory"], k=1
  )
  history = "[Observation 2: obs two]\n[Action 2: (no valid action)]\n[Observation 3: obs three]"
  # The response goes in without its think block.
  expected = "\n".join(METHOD_JUDGE_LINES).format(
      task=TASK, history=history, response="<action>take mug 1 from desk 1</action>",
      feedback="You pick up the mug 1 from the desk 1.", admissible="look, inventory",
  )
  assert text == expected
  rendered = prompts.render_judge_prompt(qwen_tok, TASK, HISTORY[:2], "obs three", response, "fb", ["look"], k=1)
  assert rendered.endswith("Answer with one word: Skip, Weak or Strong.<|im_end|>\n<|im_start|>assistant\n")
  # config.judge.show_admissible=False passes no list: exactly that one line goes.
  without = prompts.judge_prompt_text(
      TASK, HISTORY[:2], "obs three", response, "You pick up the mug 1 from the desk 1.", [], k=1)
  assert without == expected.replace("Admissible actions were: look, inventory\n", "")


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_judge_questions_open_the_reply_as_qwen3_renders_thinking(qwen3_tokenizer, enable_thinking):
  # Qwen3's own format: a thought of several lines, then the action.
  response = "<think>\nThe mug is on the desk.\nTake it.\n</think>\n\n<action>take mug 1 from desk 1</action>"
  content = prompts.judge_prompt_text(TASK, HISTORY[:2], "obs three", response, "fb", ["look"], k=1)
  assert "The agent's latest response:\n<action>take mug 1 from desk 1</action>\n" in content
  assert "Take it." not in content
  rendered = prompts.render_judge_prompt(qwen3_tokenizer, TASK, HISTORY[:2], "obs three", response, "fb", ["look"],
                                         k=1, enable_thinking=enable_thinking)
  reference = qwen3_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=enable_thinking)
  assert rendered == reference
  # Off, the reply opens after Qwen3's empty think block, so its first token is the label.
  opening = "<|im_end|>\n<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
  assert rendered.endswith("Skip, Weak or Strong." + opening)
  assert prompts.judge_user_close(qwen3_tokenizer, enable_thinking) == opening
  layout = prompts.ChatLayout.from_tokenizer(qwen3_tokenizer)
  question = prompts.transcript_judge_text(layout, "fb", [], "<|im_end|>", enable_thinking)
  assert question == "\n<|im_start|>user\nObservation: fb\n" + "\n".join(prompts.judge_question_lines([])) + opening
  # A template without the switch (ChatML) renders the same either way.
  chatml = _tiny_tokenizer(prompts.CHATML_TEMPLATE)
  assert prompts.judge_user_close(chatml, enable_thinking) == "<|im_end|>\n<|im_start|>assistant\n"


def test_visible_response_drops_only_a_closed_think_block():
  assert prompts.visible_response("<think>a</think><think>b</think>\n<action>look</action>") == "\n<action>look</action>"
  assert prompts.visible_response("<action>look</action>") == "<action>look</action>"
  assert prompts.visible_response("<think>still thinking") == "<think>still thinking"


# -- The multi-turn chat layout --------------------------------------------------

OBSERVATIONS = ["You are in a room. Your task is to: put a mug on desk.", "You arrive at desk 1.", "Nothing happens."]
RESPONSES = [
    "<think>find it</think><action>go to desk 1</action>",
    "<think>take</think><action>take mug</action>",
    "<think>again</think>\n<action>look</action>",
]
ADMISSIBLE = [["go to desk 1", "look"], ["take mug 1 from desk 1"], ["look"]]


@pytest.mark.parametrize("admissible", [None, ADMISSIBLE])
@pytest.mark.parametrize("keeps_stop_token", [False, True])
def test_incremental_pieces_equal_full_rendering(qwen_tok, admissible, keeps_stop_token):
  layout = prompts.ChatLayout.from_tokenizer(qwen_tok)
  end = "<|im_end|>" if keeps_stop_token else ""
  acts = admissible or [None] * len(OBSERVATIONS)
  text = prompts.episode_start_text(layout, TASK, OBSERVATIONS[0], acts[0])
  for t in range(1, len(OBSERVATIONS)):
    # The sampler appends its response (and perhaps the stop token it kept), then the new turn.
    text += RESPONSES[t - 1] + end
    text += prompts.next_turn_text(layout, OBSERVATIONS[t], acts[t], response_end=end)
  messages = prompts.episode_messages(TASK, OBSERVATIONS, RESPONSES[:-1], admissible)
  assert text == qwen_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
  assert TASK in messages[1]["content"] and OBSERVATIONS[0] in messages[1]["content"]
  if admissible:
    assert "take mug 1 from desk 1" in messages[3]["content"]


@pytest.mark.parametrize("tokenizer_kind", ["qwen", "chatml", "plain"])
def test_segments_concatenate_to_full_rendering(qwen_tok, tokenizer_kind):
  tok = {"qwen": qwen_tok, "chatml": _tiny_tokenizer(prompts.CHATML_TEMPLATE), "plain": None}[tokenizer_kind]
  layout = prompts.ChatLayout.from_tokenizer(tok)
  segments = prompts.episode_segments(layout, TASK, OBSERVATIONS, RESPONSES, ADMISSIBLE)
  full = prompts.render_chat(tok, prompts.episode_messages(TASK, OBSERVATIONS, RESPONSES, ADMISSIBLE), False)
  joined = "".join(text for text, _ in segments)
  # A finished episode stops at the last response's end-of-turn token; the full rendering
  # goes on only with the separator the template writes between messages.
  assert full.startswith(joined)
  assert full[len(joined):] == ("\n\n" if tokenizer_kind == "plain" else "\n")
  responses = [text for text, is_response in segments if is_response]
  suffix = "" if tokenizer_kind == "plain" else "<|im_end|>"
  assert responses == [r + suffix for r in RESPONSES]


def test_chatml_layout_pieces():
  layout = prompts.ChatLayout.from_tokenizer(_tiny_tokenizer(prompts.CHATML_TEMPLATE))
  assert layout.after_assistant == "<|im_end|>\n<|im_start|>user\n"
  assert layout.user_close == "<|im_end|>\n<|im_start|>assistant\n"
  with pytest.raises(ValueError, match="response_end"):
    prompts.next_turn_text(layout, "o", response_end="</s>")


def test_episode_messages_validates_lengths():
  with pytest.raises(ValueError, match="responses"):
    prompts.episode_messages(TASK, ["o1"], ["r1", "r2"])
  with pytest.raises(ValueError, match="admissible_actions"):
    prompts.episode_messages(TASK, ["o1", "o2"], ["r1"], [["look"]])
