"""SFT data for one model that both acts and judges (the CPU pipeline's teacher).

Two kinds of samples, tokenized and padded into the rollout batch's layout (`tokens`,
`attention_mask`, `turn_ids`, all `[N, S]`), so that the `sft` loss (cross-entropy on the
tokens with `turn_ids > 0`) consumes them unchanged:

* **acting**: an expert demonstration as the multi-turn chat transcript the student sees while
  acting (`prompts.episode_segments`): system, user(task + o_1), assistant(y_1), user(o_2), ...
  Turn k's response tokens (the expert's `<think>thought</think><action>a_k</action>` and the
  end-of-turn token) carry `turn_ids == k`; everything else is 0. The thought is empty, or
  with `thoughts="subgoal"` the ALFWorld subgoal (`envs.alfworld.subgoal_thoughts`).
* **judge**: a judge question about one step (`prompts.render_judge_prompt`, the feedback in
  it) answered with one word, Skip/Weak/Strong, plus the end-of-turn token (`judge_answer`);
  only the answer carries `turn_ids == 1`.

Each segment is tokenized on its own and the ids are concatenated, as the sampler builds a
rollout (generated ids, then the encoded next observation), so the model is trained on the
token sequences it will see.

Host side only: numpy and the tokenizer.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import random
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sage_opd_jax import losses
from sage_opd_jax import prompts
from sage_opd_jax.config import THOUGHTS
from sage_opd_jax.envs import demos



@dataclasses.dataclass(frozen=True)
class Demonstration:
  """One expert episode: `observations[t]` precedes `actions[t]`.

  `observations` may hold one more entry than `actions` (the answer to the last action); it is
  not part of the transcript, since no response follows it.
  """

  task_text: str
  observations: Sequence[str]
  actions: Sequence[str]
  admissible_actions: Sequence[Sequence[str]] | None = None  # Per turn, shown with o_t.
  thoughts: Sequence[str] | None = None  # Per turn, inside <think></think>; empty if None.
  # Per turn, whether its response is a training target; None trains every turn. A DAgger
  # correction (`sage_opd_jax.dagger`) trains only its last turn: the policy's earlier turns are
  # context, not targets.
  trained: Sequence[bool] | None = None

  @classmethod
  def from_record(cls, record: Mapping[str, Any], thoughts: str = "none") -> "Demonstration":
    """From one `demos.jsonl` record (`envs.demos.DEMO_KEYS`).

    Args:
      record: the record.
      thoughts: one of `THOUGHTS`: "none" leaves every <think></think> empty; "subgoal" fills
        it with `envs.alfworld.subgoal_thoughts` (ALFWorld records only), "subgoal_take" with
        its `name_take` thoughts.
    """
    for key in ("task", "observations", "actions", "admissible_actions"):
      if key not in record:
        raise ValueError(f"demo record {record.get('task_id', '?')!r} lacks the key {key!r}.")
    if thoughts not in THOUGHTS:
      raise ValueError(f"thoughts={thoughts!r}: must be one of {THOUGHTS}.")
    texts = None
    if thoughts != "none":
      # Imported here, so that a trainer that only reads demos never loads TextWorld.
      from sage_opd_jax.envs import alfworld  # pylint: disable=g-import-not-at-top

      if record.get("env") != alfworld.ENV_NAME:
        raise ValueError(f"thoughts={thoughts!r} is defined for ALFWorld demos; record "
                         f"{record.get('task_id', '?')!r} is from env {record.get('env')!r}.")
      texts = expert_thoughts(thoughts, record["task_id"], record["actions"], record["observations"])
    return cls(task_text=record["task"], observations=record["observations"], actions=record["actions"],
               admissible_actions=record["admissible_actions"], thoughts=texts, trained=record.get("trained"))


def windowed(demo: Demonstration, history_turns: int | None) -> list[Demonstration]:
  """`demo` as the rollout shows it under a `history_turns` window (config.env.history_turns).

  Why: from turn k + 2 on, the rollout's context is the episode's start (P and o_1), the last k
  turns' responses and observations, and o_t (`rollout.RolloutEngine`); SFT on the whole transcript
  would teach contexts the policy never acts from. Turns 1..k+1 keep their whole history, so they
  stay one demonstration; each later turn t is one of its own, with responses a_{t-k}..a_t, in
  which only a_t is a target. None (or a window as long as the episode) returns `[demo]`.
  """
  num = len(demo.actions)
  if history_turns is None or num <= history_turns + 1:
    return [demo]
  if history_turns < 1:
    raise ValueError(f"history_turns={history_turns}: SFT needs a window of at least one turn (at 0 the rollout "
                     "shows o_t after an empty assistant message, which a demonstration does not hold).")
  k = history_turns

  def part(values, picked):
    return None if values is None else [values[i] for i in picked]

  trained = demo.trained if demo.trained is not None else [True] * num
  head = list(range(k + 1))
  out = [dataclasses.replace(demo, observations=part(demo.observations, head), actions=part(demo.actions, head),
                             admissible_actions=part(demo.admissible_actions, head),
                             thoughts=part(demo.thoughts, head), trained=part(trained, head))]
  for t in range(k + 1, num):  # 0-based: the turn acted without turns 0..t-k-1.
    if not trained[t]:
      continue
    turns = list(range(t - k, t + 1))
    shown = [0, *range(t - k + 1, t + 1)]  # o_1, then the observations the kept responses answered.
    out.append(dataclasses.replace(
        demo, observations=part(demo.observations, shown), actions=part(demo.actions, turns),
        admissible_actions=part(demo.admissible_actions, shown), thoughts=part(demo.thoughts, turns),
        trained=[False] * k + [True]))
  return [d for d in out if any(d.trained)]


def expert_thoughts(thoughts: str, task_id: str, actions: Sequence[str], observations: Sequence[str]
                     ) -> list[str]:
  """The `thoughts` mode's texts (not "none") for an ALFWorld expert episode, one per action."""
  # Imported here, so that a trainer that only reads demos never loads TextWorld.
  from sage_opd_jax.envs import alfworld  # pylint: disable=g-import-not-at-top

  return alfworld.subgoal_thoughts(task_id, actions, observations, name_take=thoughts == "subgoal_take")


def read_demonstrations(out_dir: str | os.PathLike[str], thoughts: str = "none", *, limit: int = 0,
                        renamed_copies: int = 0, renumbered_copies: int = 0,
                        seed: int = 0) -> list[Demonstration]:
  """The demonstrations of a collection folder (`envs.demos.collect`'s demos.jsonl), in
  `envs.demos.in_fixed_order`: the first `limit` (0: all), then `renamed_copies` of each of
  those (`copies_with_renamed_objects`) and `renumbered_copies` of each
  (`copies_with_renumbered_receptacles`), drawn with `seed`; see `from_record`."""
  path = pathlib.Path(out_dir) / demos.DEMOS
  if not path.exists():
    raise FileNotFoundError(f"No demonstrations at {path}; collect them first (stage collect_demos).")
  records = demos.in_fixed_order(demos.read_jsonl(path))
  records = records[:limit] if limit else records
  copies = []
  if renamed_copies:
    copies += copies_with_renamed_objects(records, renamed_copies, seed)
  if renumbered_copies:
    copies += copies_with_renumbered_receptacles(records, renumbered_copies, seed)
  return [Demonstration.from_record(record, thoughts) for record in [*records, *copies]]


def _task_object(task_id: str) -> tuple[str, bool]:
  """The object class an ALFWorld task's folder names, in ALFRED's spelling (e.g. "CellPhone"), and
  whether it is sliced (`envs.alfworld.parse_task_folder`)."""
  from sage_opd_jax.envs import alfworld  # pylint: disable=g-import-not-at-top

  params = alfworld.parse_task_folder(task_id)
  return params["object"], params["sliced"]


def _words(cls: str) -> re.Pattern[str]:
  return re.compile(rf"\b{cls.lower()}\b")


def renamed_object(record: Mapping[str, Any], new_class: str) -> dict[str, Any]:
  """An ALFWorld demo record whose task object class is `new_class` (ALFRED's spelling) in every
  text, and in the task folder that the subgoal thoughts read."""
  old, sliced = _task_object(record["task_id"])
  if sliced:
    raise ValueError(f"renamed_object: {record['task_id']!r} names a sliced object; its text says it otherwise.")
  word, new = _words(old), new_class.lower()
  folder, trial = record["task_id"].split("/", 1)
  parts = folder.split("-")
  return {**record, "task_id": "-".join([parts[0], new_class, *parts[2:]]) + "/" + trial,
          "task": word.sub(new, record["task"]),
          "observations": [word.sub(new, o) for o in record["observations"]],
          "actions": [word.sub(new, a) for a in record["actions"]],
          "admissible_actions": [[word.sub(new, a) for a in turn] for turn in record["admissible_actions"]]}


def copies_with_renamed_objects(records: Sequence[Mapping[str, Any]], copies: int,
                                seed: int) -> list[dict[str, Any]]:
  """Per record `copies` renamed ones (`renamed_object`), each to a task-object class
  of `records` that its episode never mentions, drawn with `seed`.

  Why: in an expert's episode the task's object turns up at a receptacle where that class
  usually is, so a tiny model can learn to take at a likely receptacle in place of reading
  whether the object is there. Under another name the object's receptacles predict nothing;
  reading the observation for the task's word does. The new class is one the demos' tasks name,
  so the tokenizer's corpus holds it. Records of sliced objects get no copies. It did not help
  the tiny pick teacher: with one copy each it won 15 of 35 valid_seen games and took another
  object in 15, against 15 and 16 without copies.
  """
  if copies < 0:
    raise ValueError(f"copies={copies}: must be >= 0.")
  objects = [_task_object(r["task_id"]) for r in records]
  classes = sorted({c for c, sliced in objects if not sliced})
  renamed = []
  for record, (_, sliced) in zip(records, objects):
    if sliced:
      continue  # Its text names the slices ("apple slice"); it keeps only its own name.
    text = "\n".join([record["task"], *record["observations"], *record["actions"],
                      *(a for turn in record["admissible_actions"] for a in turn)])
    absent = [c for c in classes if not _words(c).search(text)]
    rng = random.Random(f"{seed}/{record['task_id']}")
    renamed += [renamed_object(record, c) for c in rng.sample(absent, min(copies, len(absent)))]
  return renamed


# The room's receptacles, as the first observation lists them ("you see a cabinet 2, a cabinet 1, ...").
_LISTED = re.compile(r"\ba ([a-z]+) (\d+)\b")


def renumbered_receptacles(record: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
  """An ALFWorld demo record whose receptacles of each class are renumbered by one permutation
  drawn from `rng` ("drawer 3" is "drawer 5" in every observation, action and admissible list).

  The first observation stays as it is: it lists the room's receptacles, and a permutation of a
  class's numbers lists the same set. Admissible lists stay sorted where they were.
  """
  listed = collections.defaultdict(list)
  for cls, number in _LISTED.findall(record["observations"][0]):
    listed[cls].append(number)
  mapping = {}
  for cls, numbers in sorted(listed.items()):
    for old, new in zip(numbers, rng.sample(numbers, len(numbers))):
      mapping[cls, old] = new
  if not mapping:
    return dict(record)
  pattern = re.compile(rf"\b({'|'.join(map(re.escape, sorted(listed)))}) (\d+)\b")

  def sub(text: str) -> str:
    return pattern.sub(lambda m: f"{m[1]} {mapping.get((m[1], m[2]), m[2])}", text)

  def sub_list(actions: Sequence[str]) -> list[str]:
    renamed = [sub(a) for a in actions]
    return sorted(renamed) if list(actions) == sorted(actions) else renamed

  return {**record, "observations": [record["observations"][0], *map(sub, record["observations"][1:])],
          "actions": [sub(a) for a in record["actions"]],
          "admissible_actions": [sub_list(turn) for turn in record["admissible_actions"]]}


def copies_with_renumbered_receptacles(records: Sequence[Mapping[str, Any]], copies: int,
                                       seed: int) -> list[dict[str, Any]]:
  """Per record `copies` with the room's receptacles renumbered
  (`renumbered_receptacles`), drawn with `seed`.

  Why: the tiny pick teachers take an absent object mostly at receptacles where a train game of
  the same room had a take (`experiments/failure_modes.py --train_demos`: the seed-0 teacher took
  an absent object at 0.30 of those states, 0.17 elsewhere): they key the take on "this room,
  drawer 3" as well as on the observation. In a copy whose drawers are renumbered that key
  predicts nothing; reading the observation does.
  """
  if copies < 0:
    raise ValueError(f"copies={copies}: must be >= 0.")
  renumbered = []
  for record in records:
    rng = random.Random(f"{seed}/renumbered/{record['task_id']}")
    renumbered += [renumbered_receptacles(record, rng) for _ in range(copies)]
  return renumbered


@dataclasses.dataclass(frozen=True)
class JudgeExample:
  """One judged step with its known label (the fields of docs/method.md's judge prompt).

  Attributes:
    task_text: the task.
    history: the turns before this one as (observation, action), oldest first.
    observation: o_t.
    action: the judged action; None stands for an unparseable response (no action tag).
    feedback: the env's answer to it, o_{t+1}.
    admissible_actions: the admissible actions at o_t.
    label: a `losses.Label` code.
    thought: the <think> text of the judged response (as the acting demos are trained).
    history_thoughts: the <think> texts of the `history` turns' responses ("" each if empty);
      the transcript judge's question shows those responses whole.
  """

  task_text: str
  history: Sequence[tuple[str, str | None]]
  observation: str
  action: str | None
  feedback: str
  admissible_actions: Sequence[str]
  label: int
  thought: str = ""
  history_thoughts: Sequence[str] = ()

  def __post_init__(self):
    object.__setattr__(self, "label", label_code(self.label))
    if self.history_thoughts and len(self.history_thoughts) != len(self.history):
      raise ValueError(f"JudgeExample.history_thoughts has {len(self.history_thoughts)} entries for "
                       f"{len(self.history)} history turns.")

  @classmethod
  def from_demo(cls, example: Any, thought: str = "", history_thoughts: Sequence[str] = ()) -> "JudgeExample":
    """From an `envs.demos.JudgeExample` (as `envs.demos.load_judge_examples` yields them)."""
    return cls(task_text=example.task, history=list(example.history), observation=example.observation,
               action=example.action, feedback=example.feedback,
               admissible_actions=list(example.admissible_actions), label=label_code(example.label),
               thought=thought, history_thoughts=list(history_thoughts))


def judge_window(judge: Any) -> int | None:
  """The past turns a judge example keeps (`config.judge`): section 5's window, or all of them
  for the transcript judge, whose question follows the whole transcript."""
  return None if judge["mode"] == "transcript" else int(judge["history_turns"])


def read_judge_examples(out_dir: str | os.PathLike[str], history_turns: int | None, thoughts: str = "none"
                        ) -> list[JudgeExample]:
  """The judge examples of a collection folder, their responses thought as its demos are.

  With `thoughts="subgoal"` (or "subgoal_take") the judged response (and each history turn's) carries the subgoal
  the expert would think in that state before that action (`envs.alfworld.subgoal_thoughts`
  over the episode's earlier turns), so the judge is trained on responses shaped like the ones
  the policy writes. `history_turns`: the past turns kept (None: all, `judge_window`).
  """
  if thoughts not in THOUGHTS:
    raise ValueError(f"thoughts={thoughts!r}: must be one of {THOUGHTS}.")
  episodes = {r["task_id"]: r for r in demos.read_jsonl(pathlib.Path(out_dir) / demos.DEMOS)}
  examples = list(demos.load_judge_examples(out_dir, history_turns, episodes))
  if thoughts == "none":
    return [JudgeExample.from_demo(ex) for ex in examples]
  out = []
  for ex in examples:
    episode, t = episodes[ex.task_id], ex.turn
    thoughts_so_far = expert_thoughts(thoughts, ex.task_id, [*episode["actions"][:t], ex.action or ""],
                                       [*episode["observations"][: t + 1], ex.feedback])
    out.append(JudgeExample.from_demo(ex, thoughts_so_far[-1], thoughts_so_far[t - len(ex.history):t]))
  return out


def label_code(label: str | int) -> int:
  """A label name ("Skip", any case) or code -> its `losses.Label`."""
  if isinstance(label, str):
    names = [n.lower() for n in prompts.LABEL_NAMES]
    if label.lower() not in names:
      raise ValueError(f"judge example label {label!r}: must be one of {prompts.LABEL_NAMES}.")
    return names.index(label.lower())
  if label not in tuple(losses.Label):
    raise ValueError(f"judge example label {label!r}: must be a losses.Label code {tuple(map(int, losses.Label))}.")
  return int(label)


def expert_response(action: str | None, thought: str = "", layout: prompts.ChatLayout | None = None) -> str:
  """The response an action is trained as, in the acting format; None gives no action tag.

  The thought is written as the layout's template writes one (`prompts.response_text`): Qwen3's
  `<think>\n{thought}\n</think>\n\n<action>...`, or `<think>{thought}</think><action>...` for
  ChatML and without a layout; with thinking off there is none.
  """
  return prompts.response_text(layout or prompts.ChatLayout(None, "", ""), action, thought)


def _end_of_turn(layout: prompts.ChatLayout) -> str:
  """The text that closes an assistant message (e.g. "<|im_end|>"), as `episode_segments` trains it."""
  return layout.after_assistant.split("\n", 1)[0]


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_segments(tokenizer: Any, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
  """(text, is_response) pieces -> (ids, turn ids): the k-th response piece gets turn id k."""
  ids: list[int] = []
  turn_ids: list[int] = []
  turn = 0
  for text, is_response in segments:
    piece = _encode(tokenizer, text)
    if is_response:
      turn += 1
    ids.extend(piece)
    turn_ids.extend([turn if is_response else 0] * len(piece))
  return ids, turn_ids


def acting_segments(
    layout: prompts.ChatLayout, demo: Demonstration, show_admissible: bool = True
) -> list[tuple[str, bool]]:
  """The demonstration's chat transcript as (text, is_response) pieces."""
  num = len(demo.actions)
  if num == 0:
    raise ValueError("Demonstration.actions is empty: an episode needs at least one action.")
  if len(demo.observations) not in (num, num + 1):
    raise ValueError(
        f"Demonstration has {len(demo.observations)} observations for {num} actions; expected {num} or {num + 1}.")
  if demo.thoughts is not None and len(demo.thoughts) != num:
    raise ValueError(f"Demonstration.thoughts has {len(demo.thoughts)} entries for {num} actions.")
  admissible = None
  if show_admissible:
    if demo.admissible_actions is None or len(demo.admissible_actions) != num:
      raise ValueError(
          "show_admissible=True needs Demonstration.admissible_actions with one list per action; got "
          f"{None if demo.admissible_actions is None else len(demo.admissible_actions)} for {num} actions.")
    admissible = [list(a) for a in demo.admissible_actions]
  thoughts = demo.thoughts if demo.thoughts is not None else [""] * num
  responses = [expert_response(a, th, layout) for a, th in zip(demo.actions, thoughts)]
  return prompts.episode_segments(layout, demo.task_text, list(demo.observations[:num]), responses, admissible)


def judge_prompt_segments(layout: prompts.ChatLayout, example: JudgeExample, history_turns: int,
                          show_admissible: bool = True, transcript: bool = False,
                          enable_thinking: bool = False) -> list[str]:
  """The judge question about `example`, through the reply's opening, as text pieces.

  Section 5's prompt is one piece. The transcript judge's (`transcript=True`) is the episode's
  acting transcript through the judged response, as the student saw it (without admissible
  lists: an example has none for its history), in `prompts.episode_segments`' pieces, then
  `prompts.transcript_judge_text`, one piece as the judge encodes it in a rollout
  (`judge.transcript_questions`); `history_turns` is then unused (load the examples with every
  past turn, `judge_window`). `enable_thinking`: the judge's (`config.judge.enable_thinking`).
  """
  response = expert_response(example.action, example.thought, layout)
  admissible = list(example.admissible_actions) if show_admissible else []
  if not transcript:
    return [prompts.render_judge_prompt(layout.tokenizer, example.task_text, list(example.history),
                                        example.observation, response, example.feedback, admissible,
                                        history_turns, enable_thinking)]
  thoughts = list(example.history_thoughts) or [""] * len(example.history)
  responses = [expert_response(action, thought, layout) for (_, action), thought in zip(example.history, thoughts)]
  end = _end_of_turn(layout)
  observations = [o for o, _ in example.history] + [example.observation]
  segments = prompts.episode_segments(layout, example.task_text, observations, [*responses, response],
                                      response_end=end)
  return [text for text, _ in segments] + [
      prompts.transcript_judge_text(layout, example.feedback, admissible, end, enable_thinking)]


def judge_prompt(tokenizer: Any, example: JudgeExample, history_turns: int, show_admissible: bool = True,
                 transcript: bool = False, enable_thinking: bool = False, acting_thinking: bool | None = None) -> str:
  """The judge question about `example`, rendered through the reply's opening (`judge_prompt_segments`),
  its transcript (`transcript`) as the student acts under `acting_thinking` (config.sampling.enable_thinking)."""
  return "".join(judge_prompt_segments(prompts.ChatLayout.from_tokenizer(tokenizer, acting_thinking), example,
                                       history_turns, show_admissible, transcript, enable_thinking))


def judge_prompt_ids(tokenizer: Any, example: JudgeExample, history_turns: int, show_admissible: bool = True,
                     transcript: bool = False, enable_thinking: bool = False,
                     acting_thinking: bool | None = None) -> list[int]:
  """`judge_prompt`'s token ids, its pieces encoded one by one as the SFT data encodes them
  (`tokenize_segments`): the ids the teacher is trained on, which the held-out accuracy asks."""
  segments = judge_prompt_segments(prompts.ChatLayout.from_tokenizer(tokenizer, acting_thinking), example,
                                   history_turns, show_admissible, transcript, enable_thinking)
  return tokenize_segments(tokenizer, [(text, False) for text in segments])[0]


def judge_answer(layout: prompts.ChatLayout, label: int, enable_thinking: bool = False) -> str:
  """A judge's trained reply: the label word and the end-of-turn text, after an empty think block
  (`prompts.EMPTY_THINK`) when the judge thinks, since the examples carry no thought; so a thinking
  teacher learns to close its block and answer, which the judge parses (`prompts.parse_judge_reply`)."""
  return (prompts.EMPTY_THINK if enable_thinking else "") + prompts.LABEL_NAMES[label] + _end_of_turn(layout)


def judge_segments(
    layout: prompts.ChatLayout, example: JudgeExample, history_turns: int, show_admissible: bool = True,
    transcript: bool = False, enable_thinking: bool = False,
) -> list[tuple[str, bool]]:
  """The judge question and its answer (`judge_answer`); only the answer trains."""
  question = judge_prompt_segments(layout, example, history_turns, show_admissible, transcript, enable_thinking)
  return [(text, False) for text in question] + [(judge_answer(layout, example.label, enable_thinking), True)]


def _fit_turns(ids: list[int], turn_ids: list[int], seq_len: int,
               max_turns: int | None = None) -> tuple[list[int], list[int]]:
  """The longest prefix of whole turns, at most `max_turns` of them, that fits `seq_len`."""
  limit = max(turn_ids, default=0) if max_turns is None else max_turns
  if len(ids) <= seq_len and max(turn_ids, default=0) <= limit:
    return ids, turn_ids
  cut = 0
  for s in range(min(len(ids), seq_len)):
    # A response token followed by a non-response token (or the end) closes a turn.
    if 0 < turn_ids[s] <= limit and (s + 1 == len(ids) or turn_ids[s + 1] != turn_ids[s]):
      cut = s + 1
  return ids[:cut], turn_ids[:cut]


def pad_examples(
    examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Right-pads (ids, turn ids) pairs to `[N, seq_len]` arrays of the rollout batch's layout."""
  n = len(examples)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  attention_mask = np.zeros((n, seq_len), np.int32)
  turn_ids = np.zeros((n, seq_len), np.int32)
  for i, (ids, tids) in enumerate(examples):
    if len(ids) > seq_len:
      raise ValueError(f"examples[{i}] has {len(ids)} tokens, more than seq_len={seq_len}.")
    tokens[i, : len(ids)] = ids
    attention_mask[i, : len(ids)] = 1
    turn_ids[i, : len(tids)] = tids
  return {"tokens": tokens, "attention_mask": attention_mask, "turn_ids": turn_ids}


@dataclasses.dataclass
class SftData:
  """Padded SFT arrays, `[N, S]` unless noted, plus what the build had to drop or cut.

  Attributes:
    arrays: `tokens`, `attention_mask`, `turn_ids` (int32 [N, S]), `num_turns` (int32 [N], the
      highest turn id of the row) and `is_judge` (bool [N]).
    num_truncated: acting episodes cut to their first whole turns to fit `seq_len` or
      `max_turns`.
    num_dropped: samples dropped because not even one turn (or the judge question) fits.
  """

  arrays: dict[str, np.ndarray]
  num_truncated: int = 0
  num_dropped: int = 0


def build_sft_data(
    tokenizer: Any,
    demonstrations: Iterable[Demonstration],
    judge_examples: Iterable[JudgeExample],
    seq_len: int,
    *,
    history_turns: int = 2,
    show_admissible: bool = True,
    judge_admissible: bool = True,
    judge_transcript: bool = False,
    judge_thinking: bool = False,
    max_turns: int | None = None,
    seed: int | None = 0,
    enable_thinking: bool | None = None,
) -> SftData:
  """Acting and judge samples for one model, shuffled together.

  Args:
    tokenizer: the shared tokenizer; it must have a chat template and a pad token.
    demonstrations: expert episodes (acting samples); a turn with `trained` False is context only.
    judge_examples: labelled judge questions (judge samples), e.g. `JudgeExample.from_demo`
      of each of `envs.demos.load_judge_examples(out_dir, history_turns)`.
    seq_len: S, the padded length; longer acting episodes keep their first whole turns.
    history_turns: the judge prompt's history window (config.judge.history_turns).
    show_admissible: list the admissible actions with each observation (as the rollout does).
    judge_admissible: list them in the judge questions (config.judge.show_admissible).
    judge_transcript: ask the judge questions as the transcript judge does
      (`config.judge.mode='transcript'`, `judge_prompt_segments`); its transcripts list no
      admissible actions, so `show_admissible` must be False then.
    judge_thinking: the judge's `enable_thinking` (config.judge.enable_thinking), for its
      questions' reply opening and its answers (`judge_answer`).
    max_turns: keep at most this many turns of an acting episode (the env's turn limit, so that
      no turn id exceeds the loss's `num_turns`); None keeps them all.
    seed: shuffles the samples; None keeps acting samples first, then judge samples, in order.
    enable_thinking: the acting prompts' thinking switch (config.sampling.enable_thinking), as the
      rollout renders them, also in the transcripts the transcript judge reads.
  """
  if tokenizer is None or getattr(tokenizer, "pad_token_id", None) is None:
    raise ValueError("build_sft_data: `tokenizer` must be given and have a pad_token_id.")
  if judge_transcript and show_admissible:
    raise ValueError("build_sft_data: judge_transcript=True trains the judge on transcripts without admissible "
                     "lists, but show_admissible=True lists them in the acting transcripts it will judge "
                     "(config.judge.mode='transcript' needs config.env.show_admissible=False).")
  # Judge samples too: the transcript judge's questions follow the acting transcript.
  acting_layout = prompts.ChatLayout.from_tokenizer(tokenizer, enable_thinking)
  examples: list[tuple[list[int], list[int]]] = []
  is_judge: list[bool] = []
  truncated = dropped = 0
  for demo in demonstrations:
    ids, tids = tokenize_segments(tokenizer, acting_segments(acting_layout, demo, show_admissible))
    if demo.trained is not None:
      if len(demo.trained) != len(demo.actions):
        raise ValueError(f"Demonstration.trained has {len(demo.trained)} entries for {len(demo.actions)} actions.")
      tids = [k if k and demo.trained[k - 1] else 0 for k in tids]
    fitted, fitted_tids = _fit_turns(ids, tids, seq_len, max_turns)
    if not any(fitted_tids):
      dropped += 1
      continue
    truncated += len(fitted) < len(ids)
    examples.append((fitted, fitted_tids))
    is_judge.append(False)
  for example in judge_examples:
    ids, tids = tokenize_segments(tokenizer, judge_segments(acting_layout, example, history_turns, judge_admissible,
                                                            judge_transcript, judge_thinking))
    if len(ids) > seq_len:
      dropped += 1
      continue
    examples.append((ids, tids))
    is_judge.append(True)
  if seed is not None:
    order = np.random.default_rng(seed).permutation(len(examples))
    examples = [examples[i] for i in order]
    is_judge = [is_judge[i] for i in order]
  arrays = pad_examples(examples, seq_len, int(tokenizer.pad_token_id))
  arrays["num_turns"] = arrays["turn_ids"].max(axis=1, initial=0).astype(np.int32)
  arrays["is_judge"] = np.asarray(is_judge, bool)
  return SftData(arrays=arrays, num_truncated=int(truncated), num_dropped=int(dropped))
