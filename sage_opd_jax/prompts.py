"""The acting and judge prompts, and parsing of the model's answers.

Pure host-side text code: it may use a tokenizer's chat template, never jax (it takes the label
codes from `losses.Label`, their one definition).

Two acting layouts exist, both ReAct style as in GiGPO / verl-agent (think in
`<think></think>`, answer in `<action></action>`):

* **Step-wise** (`acting_prompt_text` / `render_acting_prompt`): every turn is a
  fresh single-user-message prompt with the task, the last k observations and
  actions, the current observation and the admissible actions.
* **Multi-turn chat** (`ChatLayout`, `episode_start_text`, `next_turn_text`,
  `episode_segments`): the episode is one growing conversation
  `system, user(task + o_1), assistant(y_1), user(o_2), assistant(y_2), ...`. Each
  turn only APPENDS text, so a sampler can keep its KV cache across turns.

Rendering goes through the tokenizer's chat template. Passing `tokenizer=None`
selects the plain format of `plain_chat_text` instead; a tokenizer WITHOUT a chat
template is an error, never a silent switch to the plain format.

**Thinking mode** (`ChatLayout.enable_thinking`, config.sampling.enable_thinking) is passed to
the chat template as Qwen3's `enable_thinking`: off, the generation prompt holds an empty think
block (`<think>\n\n</think>\n\n`) and the response is the action alone; on, the response
starts with its own think block. A response's think tokens are the student's and are trained
(they carry its turn id); the generation prompt's are context.

**History keeps its think blocks.** Qwen3's template re-renders earlier assistant messages
without their `<think>` block (an empty one included). The multi-turn layout does not: each
turn only appends, and an earlier response stays in the context exactly as it was sampled. The
transcript then stays one token sequence that is every turn's context, which the teacher and
the loss score in one forward, and the sampler's KV cache is reused whole. Re-rendering as
Qwen3 does would give each turn a context that is no prefix of the transcript (so each turn
would need its own scoring segment, as turns past a history window have) and re-encode the previous response, without its thought,
at every turn; what it would save is context length: a thinking response's tokens stay in
every later context. `benchmarks/bench_thinking_layout.py` counts both with Qwen3's tokenizer
on 50 ALFWorld-like turns: a turn encodes 37 tokens here and 51 under Qwen3's rendering, but a
4,096-token transcript holds 30, 12 and 6 turns at 64-, 256- and 500-token thoughts here,
against all 50 (3,201 tokens) under Qwen3's rendering.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple, Sequence

from sage_opd_jax.losses import Label

ACTION_OPEN = "<action>"
ACTION_CLOSE = "</action>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")  # Either ends a Qwen turn (a sampler stops at both).
# A turn without thought as Qwen3 writes it (its template's `enable_thinking=False` reply opening).
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"

# The judge's answer words, in `Label` code order (labels[B, T] hold the codes; E5).
LABEL_NAMES = tuple(label.word for label in Label)

# ChatML as Qwen uses it, without a default system message: every message renders
# independently of its position, so the multi-turn layout is prefix-stable.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_SYSTEM_PROMPT = "You are an agent acting in a text environment."

_NO_ACTION = "(no valid action)"
# The feedback a judge reads for a turn the env has not answered yet (`opd_two_rollout`'s hook).
NOT_EXECUTED = "(not executed yet)"

Message = Mapping[str, str]  # {"role": ..., "content": ...}
History = Sequence[tuple[str, str | None]]  # (observation, the action taken after it)

# ---------------------------------------------------------------------------
# Parsing.

_ACTION_OPEN_RE = re.compile(r"<\s*action\s*>", re.IGNORECASE)
_ACTION_CLOSE_RE = re.compile(r"<\s*/\s*action\s*>", re.IGNORECASE)
_THINK_OPEN_RE = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_LABEL_RE = re.compile(r"\b(" + "|".join(LABEL_NAMES) + r")\b", re.IGNORECASE)


def parse_action(response: str, lowercase: bool = True) -> str | None:
  """The FIRST complete action of a model response's answer (after its thought).

  The answer is the text after the last `</think>` when an `<action>` tag follows it (tags
  quoted while thinking never count), else the whole response. Its action is the first
  complete `<action>...</action>`: the last `<action>` before the first `</action>`, so a
  quoted tag format before the answer loses and anything the model writes after its first
  complete action (a sampler whose `</action>` stop did not fire under a BPE merge, e.g.
  `</action>\n` as `</`, `action`, `>\n`) never wins. Without a closing tag the action runs
  from the last `<action>` to the end (generation stopped right at it). Tags are matched
  case-insensitively and may hold spaces (`< Action >`). Internal whitespace and newlines
  collapse to single spaces.

  Args:
    response: the raw model response.
    lowercase: lower-case the command; both ALFWorld and ScienceWorld spell every
      command in lower case, so "Go to Desk 1" means "go to desk 1".

  Returns:
    The command, or None when there is no `<action>` tag or the action is empty.
  """
  span = action_span(response)
  if span is None:
    return None
  action = " ".join(response[span[0]:span[1]].split())
  return action.lower() if lowercase else action


def action_span(response: str) -> tuple[int, int] | None:
  """The characters [start, end) of `parse_action`'s command in `response`, without the
  whitespace around it; None when there is no `<action>` tag or the command is empty. The judge
  reads it to find the tokens that spell the command."""
  closes = list(_THINK_CLOSE_RE.finditer(response))
  begin = closes[-1].end() if closes and _ACTION_OPEN_RE.search(response, closes[-1].end()) else 0
  opens = list(_ACTION_OPEN_RE.finditer(response, begin))
  if not opens:
    return None
  close = _ACTION_CLOSE_RE.search(response, opens[0].end())
  if close is None:
    start, end = opens[-1].end(), len(response)
  else:
    start, end = [m for m in opens if m.end() <= close.start()][-1].end(), close.start()
  while start < end and response[start].isspace():
    start += 1
  while end > start and response[end - 1].isspace():
    end -= 1
  return (start, end) if end > start else None


# The label a judge reply without one gets (`JudgeReply.status` says why): Strong, E5's "when in
# doubt, supervise". The judge counts these replies (`judge/unanswered_frac`), so a teacher that
# never answers (one still thinking when its budget ends) shows up in the metrics rather than
# silently turning every turn Strong.
UNANSWERED_LABEL = Label.STRONG
# Why a judge reply has no label: its think block never closed (the budget ended first), or the
# text after the think block holds no single label word.
UNCLOSED_THINK, NO_LABEL = "unclosed_think", "no_label"


class JudgeReply(NamedTuple):
  """A parsed judge reply: its label, and "answered" or why it fell back to `UNANSWERED_LABEL`."""

  label: Label
  status: str


def parse_judge_reply(text: str) -> JudgeReply:
  """The judge's label (`Label.SKIP`, `Label.WEAK` or `Label.STRONG`) and where it came from.

  Only the text after the last `</think>` counts, so a judge may reason first; a `<think>`
  left open after it (or with no `</think>` at all) is a reply still thinking, which has no
  answer (`UNCLOSED_THINK`), whatever label words its thought mentions. The label words are
  matched as whole words, in any case, among other words ("Answer: weak."). Anything that is
  not clearly one label (no label word, or two different ones) is `NO_LABEL`. Both give
  `UNANSWERED_LABEL`.
  """
  closes = list(_THINK_CLOSE_RE.finditer(text))
  answer = text[closes[-1].end():] if closes else text
  if _THINK_OPEN_RE.search(answer):
    return JudgeReply(UNANSWERED_LABEL, UNCLOSED_THINK)
  found = {m.group(1).lower() for m in _LABEL_RE.finditer(answer)}
  if len(found) != 1:
    return JudgeReply(UNANSWERED_LABEL, NO_LABEL)
  return JudgeReply(Label[found.pop().upper()], "answered")


def visible_response(response: str) -> str:
  """A response without its think block: the text after its last `</think>`, as Qwen3's chat
  template shows a past assistant turn; a response with no `</think>` is kept whole."""
  closes = list(_THINK_CLOSE_RE.finditer(response))
  return response[closes[-1].end():] if closes else response


# ---------------------------------------------------------------------------
# Rendering through a chat template (or the explicit plain format).


def plain_chat_text(messages: Sequence[Message], add_generation_prompt: bool) -> str:
  """The plain format used when no tokenizer is given: `Role: content` blocks.

  Each message renders as `"{Role}: {content}\\n\\n"`; the generation prompt is
  `"Assistant: "`. Like ChatML it is prefix-stable.
  """
  parts = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
  if add_generation_prompt:
    parts.append("Assistant: ")
  return "".join(parts)


def render_chat(tokenizer: Any | None, messages: Sequence[Message], add_generation_prompt: bool,
                enable_thinking: bool | None = None) -> str:
  """Renders messages through `tokenizer`'s chat template (plain format if None).

  `enable_thinking` is passed to the template when not None (Qwen3's switch; a template that
  does not read it ignores it).
  """
  for i, m in enumerate(messages):
    if set(m) != {"role", "content"}:
      raise ValueError(f"messages[{i}] must have exactly the keys 'role' and 'content'; got {sorted(m)}.")
  if tokenizer is None:
    return plain_chat_text(messages, add_generation_prompt)
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no chat_template; set one (e.g. prompts.CHATML_TEMPLATE) "
        "or pass tokenizer=None to use the plain format explicitly."
    )
  kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
  text = tokenizer.apply_chat_template(
      [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
  )
  if not isinstance(text, str):
    raise ValueError(f"tokenizer.apply_chat_template returned {type(text).__name__}, expected str.")
  return text


# ---------------------------------------------------------------------------
# The step-wise acting prompt.


def format_history(history: History, k: int, first_turn: int = 1) -> list[str]:
  """The last `k` (observation, action) pairs as lines, numbered from `first_turn`."""
  if k < 0:
    raise ValueError(f"history window k must be >= 0; got {k}.")
  start = max(0, len(history) - k)
  lines = []
  for i, (observation, action) in enumerate(history[start:], start=first_turn + start):
    lines.append(f"[Observation {i}: {observation.strip()}]")
    lines.append(f"[Action {i}: {action if action is not None else _NO_ACTION}]")
  return lines


def _format_actions(actions: Sequence[str]) -> str:
  return "[" + ", ".join(actions) + "]"


_ANSWER_INSTRUCTION = (
    f"Now take your turn. First think step by step about the situation inside {THINK_OPEN} {THINK_CLOSE}; "
    f"then give exactly one admissible action inside {ACTION_OPEN} {ACTION_CLOSE}."
)


def acting_prompt_text(
    task: str,
    history: History,
    observation: str,
    admissible_actions: Sequence[str],
    k: int,
) -> str:
  """The step-wise ReAct prompt of one turn (the user message's content).

  Args:
    task: the task text as the env shows it ("Your task is to: ...").
    history: every earlier turn's (observation, parsed action), oldest first; an
      unparseable turn's action is None. Only the last `k` are shown.
    observation: the current observation.
    admissible_actions: valid commands now; omitted from the prompt when empty.
    k: the history window.
  """
  if k < 0:
    raise ValueError(f"history window k must be >= 0; got {k}.")
  lines = [DEFAULT_SYSTEM_PROMPT, task.strip()]
  if history and k > 0:
    shown = min(k, len(history))
    lines.append(
        f"You have taken {len(history)} step(s) so far. Your last {shown} observation(s) and the action "
        "taken after each, oldest first:"
    )
    lines.extend(format_history(history, k))
  lines.append(f"You are now at step {len(history) + 1}. Your current observation is: {observation.strip()}")
  if admissible_actions:
    lines.append(f"Your admissible actions now are: {_format_actions(admissible_actions)}")
  lines.append(_ANSWER_INSTRUCTION)
  return "\n".join(lines)


def render_acting_prompt(
    tokenizer: Any | None,
    task: str,
    history: History,
    observation: str,
    admissible_actions: Sequence[str],
    k: int,
) -> str:
  """`acting_prompt_text` as one user message, with the generation prompt."""
  content = acting_prompt_text(task, history, observation, admissible_actions, k)
  return render_chat(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)


# ---------------------------------------------------------------------------
# The multi-turn chat layout.

_SENTINEL_A = "\x00ASSISTANT\x00"
_SENTINEL_U = "\x00USER\x00"
_SENTINEL_T = "\x00THOUGHT\x00"


def has_single_token(tokenizer: Any, text: str) -> bool:
  """Whether `tokenizer` spells `text` as one token of its own (an added token, never merged)."""
  return len(tokenizer.encode(text, add_special_tokens=False)) == 1


@dataclasses.dataclass(frozen=True)
class ChatLayout:
  """The text around each new user turn, derived once from a chat template.

  A later turn appends `after_assistant + observation + user_close` to the text so
  far (see `next_turn_text`). With ChatML, `after_assistant` is
  `"<|im_end|>\\n<|im_start|>user\\n"` and `user_close` is
  `"<|im_end|>\\n<|im_start|>assistant\\n"` (Qwen3 with thinking off appends
  `"<think>\\n\\n</think>\\n\\n"`). `think_open`/`think_close` are how the template writes a
  thought around its answer (`"<think>\\n"`/`"\\n</think>\\n\\n"` for Qwen3; `"<think>"`/`"</think>"`
  for ChatML, which writes contents verbatim): responses are trained in that format
  (`response_text`).
  """

  tokenizer: Any | None
  after_assistant: str  # From the end of an assistant's content to the next user's content.
  user_close: str  # From the end of a user's content through the generation prompt.
  enable_thinking: bool | None = None  # Passed to the template (None: its default).
  think_open: str = THINK_OPEN
  think_close: str = THINK_CLOSE

  @classmethod
  def from_tokenizer(cls, tokenizer: Any | None, enable_thinking: bool | None = None) -> "ChatLayout":
    """The layout of `tokenizer`'s template; raises if `enable_thinking` cannot take effect.

    With `enable_thinking` set, the tokenizer must spell `<think>` as one token, and turning
    thinking off must change the generation prompt (a template that ignores the switch would
    silently leave the model thinking).
    """
    check_thinking(tokenizer, enable_thinking)
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": _SENTINEL_A},
        {"role": "user", "content": _SENTINEL_U},
    ]
    text = render_chat(tokenizer, messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    if text.count(_SENTINEL_A) != 1 or text.count(_SENTINEL_U) != 1:
      raise ValueError("The chat template does not render message contents verbatim; cannot derive its layout.")
    after_assistant, user_close = text.split(_SENTINEL_A)[1].split(_SENTINEL_U)
    if enable_thinking is False and text == render_chat(tokenizer, messages, add_generation_prompt=True):
      raise ValueError("enable_thinking=False: this tokenizer's chat template ignores enable_thinking, so the "
                       "model would think anyway (Qwen3's template reads it).")
    thought = render_chat(tokenizer, [{"role": "user", "content": "u"}, {
        "role": "assistant", "content": f"{THINK_OPEN}{_SENTINEL_T}{THINK_CLOSE}{_SENTINEL_A}"}], False)
    if thought.count(_SENTINEL_T) != 1 or thought.count(_SENTINEL_A) != 1:
      raise ValueError("The chat template drops the thought of the last assistant message; cannot derive its layout.")
    before, after = thought.split(_SENTINEL_T)
    think_open = before[before.rfind(THINK_OPEN):] if THINK_OPEN in before else THINK_OPEN
    think_close = after.split(_SENTINEL_A)[0]
    return cls(tokenizer=tokenizer, after_assistant=after_assistant, user_close=user_close,
               enable_thinking=enable_thinking, think_open=think_open, think_close=think_close)


def check_thinking(tokenizer: Any | None, enable_thinking: bool | None) -> None:
  """Raises unless `tokenizer` spells `<think>` and `</think>` as one token each, when `enable_thinking` is set."""
  if enable_thinking is None or tokenizer is None:
    return
  for tag in (THINK_OPEN, THINK_CLOSE):
    if not has_single_token(tokenizer, tag):
      raise ValueError(f"enable_thinking={enable_thinking} needs a tokenizer with a {tag} token; "
                       f"{type(tokenizer).__name__} spells it {tokenizer.encode(tag, add_special_tokens=False)}.")


def response_text(layout: ChatLayout, action: str | None, thought: str = "") -> str:
  """A response in the layout's format: its thought (none with thinking off, where the generation
  prompt holds the empty think block), then `<action>action</action>` unless `action` is None."""
  think = "" if layout.enable_thinking is False else f"{layout.think_open}{thought}{layout.think_close}"
  return think if action is None else f"{think}{ACTION_OPEN}{action}{ACTION_CLOSE}"


def first_user_content(task: str, observation: str, admissible_actions: Sequence[str] | None = None) -> str:
  """The first user message of a multi-turn episode: instructions, task, o_1."""
  lines = [
      task.strip(),
      f"Each turn, first think step by step inside {THINK_OPEN} {THINK_CLOSE}; then give exactly one "
      f"action inside {ACTION_OPEN} {ACTION_CLOSE}. The environment answers with its next observation.",
      turn_user_content(observation, admissible_actions),
  ]
  return "\n".join(lines)


def turn_user_content(observation: str, admissible_actions: Sequence[str] | None = None) -> str:
  """A later user message: the observation, then the admissible actions if given."""
  text = f"Observation: {observation.strip()}"
  if admissible_actions:
    text += f"\nAdmissible actions: {_format_actions(admissible_actions)}"
  return text


def episode_messages(
    task: str,
    observations: Sequence[str],
    responses: Sequence[str],
    admissible_actions: Sequence[Sequence[str] | None] | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[dict[str, str]]:
  """The conversation of an episode: system, user(o_1), assistant(y_1), user(o_2), ...

  `observations[t]` precedes `responses[t]`; there are as many responses as
  observations (a finished episode) or one fewer (the next response is pending).
  `admissible_actions[t]`, if given, is listed with `observations[t]`.
  """
  if len(responses) not in (len(observations), len(observations) - 1) or not observations:
    raise ValueError(
        f"need >= 1 observations and len(responses) in {{len(observations), len(observations) - 1}}; "
        f"got {len(observations)} observations and {len(responses)} responses."
    )
  if admissible_actions is not None and len(admissible_actions) != len(observations):
    raise ValueError(
        f"admissible_actions has {len(admissible_actions)} entries for {len(observations)} observations."
    )
  acts = admissible_actions if admissible_actions is not None else [None] * len(observations)
  messages = [
      {"role": "system", "content": system_prompt},
      {"role": "user", "content": first_user_content(task, observations[0], acts[0])},
  ]
  for t, response in enumerate(responses):
    messages.append({"role": "assistant", "content": response})
    if t + 1 < len(observations):
      messages.append({"role": "user", "content": turn_user_content(observations[t + 1], acts[t + 1])})
  return messages


def episode_start_text(
    layout: ChatLayout,
    task: str,
    observation: str,
    admissible_actions: Sequence[str] | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
  """The prompt of turn 1: system, user(task + o_1) and the generation prompt."""
  messages = episode_messages(task, [observation], [], [admissible_actions], system_prompt)
  return render_chat(layout.tokenizer, messages, add_generation_prompt=True, enable_thinking=layout.enable_thinking)


def next_turn_text(
    layout: ChatLayout,
    observation: str,
    admissible_actions: Sequence[str] | None = None,
    response_end: str = "",
) -> str:
  """The text to append after an assistant response to start the next turn.

  Args:
    layout: from `ChatLayout.from_tokenizer`.
    observation: the env's answer to the response.
    admissible_actions: listed after the observation when given.
    response_end: the end-of-turn text that the sampler already kept at the end of
      the response (e.g. "<|im_end|>" when the stop token stays in the sequence);
      "" when the response text stops right after its content.

  Returns:
    The rest of the assistant message, the user message, and the generation prompt.
  """
  return _user_turn(layout, turn_user_content(observation, admissible_actions), response_end)


def _user_turn(layout: ChatLayout, content: str, response_end: str, close: str | None = None) -> str:
  """After an assistant response: the rest of its message, a user message, and `close` (default: the
  layout's end of a user message and generation prompt)."""
  if not layout.after_assistant.startswith(response_end):
    raise ValueError(
        f"response_end {response_end!r} is not how an assistant message ends in this template "
        f"(it ends with {layout.after_assistant!r})."
    )
  return layout.after_assistant[len(response_end):] + content + (layout.user_close if close is None else close)


def episode_segments(
    layout: ChatLayout,
    task: str,
    observations: Sequence[str],
    responses: Sequence[str],
    admissible_actions: Sequence[Sequence[str] | None] | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    response_end: str | None = None,
) -> list[tuple[str, bool]]:
  """An episode transcript as (text, is_response) pieces, for SFT loss masks.

  The concatenation of the texts is exactly what a sampler builds with
  `episode_start_text` and `next_turn_text`. For a prefix-stable template (ChatML)
  it also equals `render_chat(episode_messages(...))`; templates that rewrite
  earlier turns (Qwen3 drops old `<think>` blocks) differ, and this layout, what the
  model actually saw while acting, is then the definition.

  Args:
    response_end: the end-of-turn text trained as part of every response so that the
      model learns to stop (default: the template's own, e.g. "<|im_end|>", taken as
      `after_assistant` up to its first newline). Pass "" to not train it.
  """
  # Validates the lengths with the same messages as the full rendering.
  episode_messages(task, observations, responses, admissible_actions, system_prompt)
  if response_end is None:
    response_end = layout.after_assistant.split("\n", 1)[0]
  acts = admissible_actions if admissible_actions is not None else [None] * len(observations)
  segments = [(episode_start_text(layout, task, observations[0], acts[0], system_prompt), False)]
  for t, response in enumerate(responses):
    segments.append((response + response_end, True))
    if t + 1 < len(observations):
      segments.append((next_turn_text(layout, observations[t + 1], acts[t + 1], response_end), False))
  return segments


# ---------------------------------------------------------------------------
# The judge prompt (docs/method.md).


def judge_prompt_text(
    task: str,
    history: History,
    observation: str,
    response: str,
    feedback: str,
    admissible_actions: Sequence[str],
    k: int,
) -> str:
  """The judge's question about turn t, worded as in docs/method.md.

  Args:
    task: the task text.
    history: the turns before t as (observation, parsed action); the last `k` are
      shown, followed by `observation`.
    observation: o_t, what the agent saw when it answered.
    response: the student's response y_t. Its think block is left out (`visible_response`): the
      judge labels the step the env acted on, as Qwen3's template shows a past turn, and the
      thought (up to the response budget, hundreds of tokens) would multiply the judge's
      prefill, its main cost, for words the label does not rest on. The rest of the response
      is kept, not just the parsed command, so the judge sees the step as the student wrote it.
    feedback: the env's answer to it, o_{t+1}.
    admissible_actions: the admissible actions at turn t; the line is left out when empty
      (`config.judge.show_admissible=False`).
    k: the history window.
  """
  recent = format_history(history, k)
  recent.append(f"[Observation {len(history) + 1}: {observation.strip()}]")
  lines = [
      "You are supervising an agent in a text environment.",
      f"Task: {task.strip()}",
      "Recent history (oldest first):",
      *recent,
      "The agent's latest response:",
      visible_response(response).strip(),
      "The environment's feedback to it:",
      feedback.strip(),
      *judge_question_lines(admissible_actions),
  ]
  return "\n".join(lines)


def judge_question_lines(admissible_actions: Sequence[str]) -> list[str]:
  """Section 5's lines after the env's feedback, through the answer format, which both judges ask."""
  return [
      *([f"Admissible actions were: {', '.join(admissible_actions)}"] if admissible_actions else []),
      "Decide whether the agent needs correction at this step.",
      "Skip   = the step is fine (it makes progress, or it is a reasonable alternative).",
      "Weak   = the step is valid but poor (off-plan, redundant, repeated).",
      "Strong = the step is wrong (invalid, harmful, or repeats a failure).",
      "Answer with one word: Skip, Weak or Strong.",
  ]


def judge_user_close(tokenizer: Any | None, enable_thinking: bool) -> str:
  """From the end of a judge question's user content to where the teacher's reply begins.

  The chat template's end of a user message and its generation prompt, rendered with the
  judge's `enable_thinking` (`config.judge.enable_thinking`): with Qwen3's template, False
  ends in the empty think block `<think>\n\n</think>\n\n`, so that the reply's first token is
  its label; a template without the switch (ChatML, the word-level tokenizer's) renders the
  same either way.
  """
  text = render_chat(tokenizer, [{"role": "user", "content": _SENTINEL_U}], add_generation_prompt=True,
                     enable_thinking=enable_thinking)
  if text.count(_SENTINEL_U) != 1:
    raise ValueError("The chat template does not render message contents verbatim; cannot derive its layout.")
  return text.split(_SENTINEL_U)[1]


def transcript_judge_text(layout: ChatLayout, feedback: str, admissible_actions: Sequence[str],
                          response_end: str = "", enable_thinking: bool = False) -> str:
  """The judge's question as a continuation of the acting transcript (`judge.mode='transcript'`).

  The transcript through the judged response stands in for section 5's task, history and
  response lines. The question follows that response: the rest of its assistant message, a
  user message with the env's feedback as the student saw it (`turn_user_content`) and
  section 5's remaining lines (`judge_question_lines`), then the reply's opening
  (`judge_user_close`), so the teacher's next token is its answer. It is one text, encoded as
  one string wherever it is used (SFT, held-out accuracy, rollouts), so that BPE merges across
  the feedback's end and the question's first newline the same way everywhere. Every judged
  turn reads this same layout, the last one included (its feedback is not in the transcript).

  Args:
    layout: from `ChatLayout.from_tokenizer`.
    feedback: o_{t+1}, the env's answer to the judged response.
    admissible_actions: turn t's, listed as in section 5 when given.
    response_end: as in `next_turn_text`.
    enable_thinking: the judge's (`judge_user_close`).
  """
  content = "\n".join([turn_user_content(feedback), *judge_question_lines(admissible_actions)])
  return _user_turn(layout, content, response_end, judge_user_close(layout.tokenizer, enable_thinking))


def render_judge_prompt(
    tokenizer: Any | None,
    task: str,
    history: History,
    observation: str,
    response: str,
    feedback: str,
    admissible_actions: Sequence[str],
    k: int,
    enable_thinking: bool = False,
) -> str:
  """`judge_prompt_text` as one user message of the teacher's chat, through the reply's opening
  under the judge's `enable_thinking` (`judge_user_close`)."""
  content = judge_prompt_text(task, history, observation, response, feedback, admissible_actions, k)
  return render_chat(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True,
                     enable_thinking=enable_thinking)
