"""The turn-level judge (E5 and the judge prompt of docs/method.md): one Skip/Weak/Strong label per turn.

After the environment has answered every turn of a rollout batch, each turn is labelled:

* a turn whose action was unparseable or invalid is Strong without asking the teacher (and
  costs no teacher call);
* every other turn is labelled by `config.judge.mode`:
  - `prompt` (default, the paper's): the teacher reads the judge prompt of `prompts.py`, with the
    env's feedback in it, and answers greedily; all turns of all episodes go through the sampler
    together. `prompts.parse_judge_reply` reads the answer tolerantly; a reply without a clear
    label (or still thinking) gets `prompts.UNANSWERED_LABEL`, Strong, and is counted
    (`judge/unanswered_frac`).
  - `transcript`: section 5's question asked as a continuation of the scored transcript, right
    after the judged response, in a user message that shows the turn's feedback
    (`prompts.transcript_judge_text`): the transcript stands in for the prompt's task, history
    and response lines. All of an episode's questions are packed after its transcript in one
    row (`pack_questions`) and ride in the teacher's scoring forward
    (`teacher.score_tokens(questions=)`), mostly in its rows' padding, so the transcript is read
    once rather than once per turn. The greedy answer token gives the label, so this judge
    cannot think (`enable_thinking` must be off). The teacher must be trained on this layout
    (`sft_data.judge_prompt_segments`) or able to answer it. Under a history window the teacher
    judges what the student saw: a turn past the window is asked in its own segment of the
    packed row (`rollout.RolloutBatch`), after P, its windowed context and its response, never
    after history the student had already dropped.
  - `likelihood`: the teacher's mean log-prob of the student's action tokens (from the scoring
    forward of `teacher.py`) against two thresholds: above the first Skip, above the second
    Weak, else Strong. Cheap, and usable with tiny teachers.
  - `oracle`: the env expert's labels (equal to the expert's action -> Skip, valid but
    different -> Weak, invalid -> Strong). Analysis only: it is not verifier-free, so it says so
    in its metrics (`judge/oracle_mode`) and in the log.

Labels come back as `labels [B, T] int32` in the loss's layout: column k - 1 is turn k, the turn
whose tokens carry `turn_ids == k`. Columns past an episode's last turn are Strong padding; those
turns have no tokens, so they never weigh anything.

**Thinking** (`config.judge.enable_thinking`, a teacher with Qwen3's chat template). Off (the
default), every question ends with the template's reply opening for a turn without thought,
Qwen3's empty think block `<think>\n\n</think>\n\n`, so the label is the reply's first token
and `max_new_tokens` can stay a few tokens. On (`prompt` mode only), the teacher thinks first
and the label is read after its `</think>`: `max_new_tokens` must then hold a thought
(>= `config.JUDGE_THINKING_MIN_TOKENS`), and a reply whose think block never closes within it
has no label (`prompts.UNCLOSED_THINK`, counted in `judge/unclosed_think_frac`).

Host side (numpy and Python objects): the judge runs between the rollout and the update.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import math
from typing import Any, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sage_opd_jax import config as config_lib
from sage_opd_jax import losses
from sage_opd_jax import prompts
from sage_opd_jax import rollout
from sage_opd_jax import sampling
from sage_opd_jax import sft_data

_log = logging.getLogger(__name__)


class JudgedTurn(Protocol):
  """What the judge reads of a turn (the rollout's `Turn` provides it)."""

  observation: str  # o_t, what the student saw before acting.
  response: str  # y_t, the raw generated text.
  action: str | None  # The parsed action, or None if unparseable.
  feedback: str  # o_{t+1}, the env's answer.
  admissible: Sequence[str]  # Admissible actions at turn t.
  valid: bool  # Parseable and admissible.
  expert_action: str | None  # The env expert's action at this state, if known.
  response_end: str  # The end-of-turn text the response kept ("" if none; the transcript judge).


class JudgedEpisode(Protocol):
  task_text: str
  turns: Sequence[JudgedTurn]


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """The judge's settings; `from_config(config.judge)` reads the run config.

  Attributes:
    mode: a registered judge mode (`JudgeMode`): prompt, transcript, likelihood or oracle.
    history_turns: past (observation, action) pairs shown in the judge prompt.
    show_admissible: list turn t's admissible actions in the prompt (as docs/method.md's does); without
      the list a real ALFWorld question is ~27% shorter, and the judge's cost is its prefill.
    max_new_tokens: tokens the teacher may answer with (`prompt` mode), its thought included
      when `enable_thinking`.
    enable_thinking: let the teacher think before its label (Qwen3's thinking mode; `prompt`
      mode only). Off, every question ends with the template's empty think block.
    likelihood_thresholds: (skip_above, weak_above) mean action log-probs (`likelihood` mode).
    batch_size: the most judge prompts per sampler call, a cap on the judge's KV-cache memory
      at scale; None leaves the calls uncapped.
    length_bucketing: send the prompts in calls of similar length (`length_groups`), which pads
      a fraction of what one call over all of them does; False keeps the input order (one call
      when `batch_size` is None), the reference the bucketed path is measured against. Both
      give the same greedy answers.
  """

  mode: str = "prompt"
  history_turns: int = 2
  show_admissible: bool = True
  max_new_tokens: int = 4
  enable_thinking: bool = False
  likelihood_thresholds: tuple[float, float] = (-0.5, -2.0)
  batch_size: int | None = None
  length_bucketing: bool = True

  def __post_init__(self):
    if self.mode not in _JUDGE_MODES:
      raise ValueError(f"JudgeConfig.mode={self.mode!r}: must be one of {tuple(_JUDGE_MODES)}.")
    if self.history_turns < 0:
      raise ValueError(f"JudgeConfig.history_turns={self.history_turns}: must be >= 0.")
    if self.max_new_tokens < 1:
      raise ValueError(f"JudgeConfig.max_new_tokens={self.max_new_tokens}: must be >= 1.")
    if self.enable_thinking:
      if self.mode not in config_lib.JUDGE_THINKING_MODES:
        raise ValueError(f"JudgeConfig.enable_thinking=True: mode={self.mode!r} does not sample an answer, so it "
                         f"cannot think; the modes that do: {config_lib.JUDGE_THINKING_MODES}.")
      if self.max_new_tokens < config_lib.JUDGE_THINKING_MIN_TOKENS:
        raise ValueError(f"JudgeConfig.max_new_tokens={self.max_new_tokens} with enable_thinking=True: a thought and "
                         f"its label need >= {config_lib.JUDGE_THINKING_MIN_TOKENS} tokens.")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"JudgeConfig.batch_size={self.batch_size}: must be >= 1.")
    skip_above, weak_above = self.likelihood_thresholds
    if not skip_above > weak_above:
      raise ValueError(
          f"JudgeConfig.likelihood_thresholds={self.likelihood_thresholds}: the Skip threshold must "
          "exceed the Weak threshold.")
    object.__setattr__(self, "likelihood_thresholds", (float(skip_above), float(weak_above)))

  @classmethod
  def from_config(cls, judge: Mapping[str, Any], batch_size: int | None = None) -> "JudgeConfig":
    """From the run config's `judge` section (`config.judge`)."""
    return cls(
        mode=judge["mode"],
        history_turns=int(judge["history_turns"]),
        show_admissible=bool(judge["show_admissible"]),
        max_new_tokens=int(judge["max_new_tokens"]),
        enable_thinking=bool(judge["enable_thinking"]),
        likelihood_thresholds=tuple(judge["likelihood_thresholds"]),
        batch_size=batch_size,
        length_bucketing=bool(judge["length_bucketing"]),
    )


@dataclasses.dataclass
class JudgeResult:
  """The labels of a batch and how they were obtained.

  Attributes:
    labels: [B, T] int32 `losses.Label` codes; Strong past each episode.
    asked: [B, T] bool, the turns whose label came from the judge mode (valid turns); the rest
      are invalid turns (Strong by rule) or padding.
    answers: per episode, per turn, the teacher's raw answer in `prompt` mode, else None.
    num_prompts: judge prompts sent to the teacher.
    statuses: per episode, per turn, how its answer was read (`prompts.JudgeReply.status`:
      "answered", or why the label is the fallback) in the modes that ask the teacher, else None.
  """

  labels: np.ndarray
  asked: np.ndarray
  answers: list[list[str | None]]
  num_prompts: int = 0
  statuses: list[list[str | None]] | None = None


# ------------------------------------------------------------------------------------------
# Turn bookkeeping.


def _check_turns(episodes: Sequence[JudgedEpisode], num_turns: int) -> None:
  for b, episode in enumerate(episodes):
    if len(episode.turns) > num_turns:
      raise ValueError(f"episodes[{b}] has {len(episode.turns)} turns, more than num_turns={num_turns}.")


def _real_turns(episodes: Sequence[JudgedEpisode], num_turns: int) -> np.ndarray:
  """[B, T] bool: the turns that exist."""
  real = np.zeros((len(episodes), num_turns), bool)
  for b, episode in enumerate(episodes):
    real[b, : len(episode.turns)] = True
  return real


def _valid_turns(episodes: Sequence[JudgedEpisode], num_turns: int) -> np.ndarray:
  """[B, T] bool: turns with a parseable, admissible action (the ones a judge is asked about)."""
  valid = np.zeros((len(episodes), num_turns), bool)
  for b, episode in enumerate(episodes):
    for t, turn in enumerate(episode.turns):
      valid[b, t] = bool(turn.valid) and turn.action is not None
  return valid


def same_action(a: str, b: str) -> bool:
  """Env commands compare case- and whitespace-insensitively ("Go to  Desk 1" == "go to desk 1")."""
  return " ".join(a.lower().split()) == " ".join(b.lower().split())


# ------------------------------------------------------------------------------------------
# Oracle labels (docs/method.md): the env expert's verdict, for analysis only.


def oracle_labels(episodes: Sequence[JudgedEpisode], num_turns: int) -> tuple[np.ndarray, np.ndarray]:
  """The env expert's labels of every turn, where it can give them.

  Returns:
    labels: [B, T] int32: Strong for invalid turns, Skip where the action equals the expert's,
      Weak where it is valid but different; Strong where there is no oracle label.
    known: [B, T] bool: the turns that have an oracle label (invalid turns always do; valid
      ones when the turn carries `expert_action`).
  """
  _check_turns(episodes, num_turns)
  labels = np.full((len(episodes), num_turns), losses.Label.STRONG, np.int32)
  known = np.zeros((len(episodes), num_turns), bool)
  valid = _valid_turns(episodes, num_turns)
  for b, episode in enumerate(episodes):
    for t, turn in enumerate(episode.turns):
      if not valid[b, t]:
        known[b, t] = True
      elif getattr(turn, "expert_action", None) is not None:
        known[b, t] = True
        same = same_action(turn.action, turn.expert_action)
        labels[b, t] = losses.Label.SKIP if same else losses.Label.WEAK
  return labels, known


# ------------------------------------------------------------------------------------------
# Prompt mode.


def judge_prompt_texts(
    episodes: Sequence[JudgedEpisode], tokenizer: Any, history_turns: int, asked: np.ndarray,
    show_admissible: bool = True, enable_thinking: bool = False,
) -> list[tuple[int, int, str]]:
  """(b, t, rendered judge prompt) for every asked turn, in row-major order (docs/method.md's prompt)."""
  out = []
  for b, episode in enumerate(episodes):
    history: list[tuple[str, str | None]] = []
    for t, turn in enumerate(episode.turns):
      if asked[b, t]:
        text = prompts.render_judge_prompt(
            tokenizer, episode.task_text, history, turn.observation, turn.response, turn.feedback,
            list(turn.admissible) if show_admissible else [], history_turns, enable_thinking)
        out.append((b, t, text))
      history.append((turn.observation, turn.action))
  return out


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
  """Token ids that end the judge's answer: those that end an acting turn (`rollout.end_of_turn_ids`:
  EOS, Qwen's `<|im_end|>` and `<|endoftext|>`) and the chat template's end-of-turn token."""
  ids = set(rollout.end_of_turn_ids(tokenizer))
  end_of_turn = prompts.ChatLayout.from_tokenizer(tokenizer).after_assistant.split("\n", 1)[0]
  if end_of_turn:
    end_ids = tokenizer.encode(end_of_turn, add_special_tokens=False)
    if len(end_ids) == 1:
      ids.add(int(end_ids[0]))
  return tuple(sorted(ids))


def _pad_id(tokenizer: Any) -> int:
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither pad_token_id nor eos_token_id.")


# What one more sampler call costs beyond its prefill, in prompt-token positions of prefill
# work: its decode steps over the whole cache, the host round trip, and one more compiled shape
# per new (rows, width) pair. Between 64 and 1024 the judge's time on the benchmark's prompts
# (22 prompts of 234-881 tokens, 27m teacher, 2 CPU cores) moved within the box's noise; the
# larger value makes fewer calls and so fewer shapes to compile.
_CALL_OVERHEAD_POSITIONS = 1024


def _row_bucket(rows: int, min_rows: int) -> int:
  """The batch a sampler call of `rows` prompts runs at (`EpisodeCache` pads to a power of 2)."""
  return max(1 << (rows - 1).bit_length(), min_rows)


def length_groups(
    lengths: Sequence[int],
    *,
    max_rows: int | None = None,
    min_rows: int = 1,
    min_chunk: int = 16,
    call_overhead: int = _CALL_OVERHEAD_POSITIONS,
) -> list[list[int]]:
  """Splits prompts into sampler calls of similar length, so that little prefill is padding.

  One call pads every prompt to its longest (to a `sampling.bucket_length` width) and its rows
  to a power of two, so one call over prompts of 230 to 880 tokens pre-fills 32 x 1024
  positions for 12k real tokens. The prompts are sorted by length and cut into contiguous runs
  that minimise the padded positions plus `call_overhead` per call (dynamic programming over
  the cut points). Runs of the sorted order lose nothing: any split can be rearranged into
  runs with the same call sizes and no wider calls. Shapes stay in the sampler's buckets, so
  a run compiles a bounded set of them.

  Args:
    lengths: each prompt's token count.
    max_rows: the most prompts per call (None: no cap).
    min_rows: the smallest batch a call runs at (`min_batch` of the sampler's cache).
    min_chunk: the sampler cache's smallest chunk-width bucket.
    call_overhead: the cost of one more call, in prefill positions.

  Returns:
    Per call, the indices into `lengths` of its prompts, shortest first; the calls cover
    every index once, in order of their longest prompt.
  """
  if max_rows is not None and max_rows < 1:
    raise ValueError(f"length_groups: max_rows={max_rows}: must be >= 1 (or None for no cap).")
  if any(n < 1 for n in lengths):
    raise ValueError(f"length_groups: lengths must be >= 1, got {min(lengths)}.")
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  cap = max_rows or len(order)
  # best[j]: the least cost of the j shortest prompts; start[j]: where its last call begins.
  best = [0.0] + [math.inf] * len(order)
  start = [0] * (len(order) + 1)
  for j in range(1, len(order) + 1):
    width = sampling.bucket_length(lengths[order[j - 1]], min_chunk)
    for i in range(max(0, j - cap), j):
      cost = best[i] + _row_bucket(j - i, min_rows) * width + call_overhead
      if cost < best[j]:
        best[j], start[j] = cost, i
  groups, j = [], len(order)
  while j > 0:
    groups.append(order[start[j]:j])
    j = start[j]
  return groups[::-1]


def _check_thinking(tokenizer: Any, enable_thinking: bool) -> None:
  """A thinking judge's label is read after `</think>`, which must be a token of its own."""
  if enable_thinking:
    try:
      prompts.check_thinking(tokenizer, True)
    except ValueError as e:
      raise ValueError(f"judge.{e}") from e


def decode_reply(tokenizer: Any, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
  """The text of a sampled reply up to its first stop token, special tokens kept.

  Keeping special tokens keeps the think tags, whichever way a tokenizer flags them (Qwen3's
  `<think>` is not special, the word-level tokenizer's tags are plain added tokens): the label
  parser reads them (`prompts.parse_judge_reply`) rather than a text that may have lost them.
  """
  ids = list(ids)
  ends = [j for j, i in enumerate(ids) if i in stop_ids]
  return tokenizer.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=False)


def ask_teacher(
    teacher: nnx.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    rng: jax.Array,
    *,
    max_new_tokens: int,
    batch_size: int | None = None,
    length_bucketing: bool = True,
    sampler_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
  """The teacher's greedy replies to the prompts `prompt_ids` (`decode_reply`).

  The prompts come as token ids so that each caller encodes them exactly as the teacher was
  trained on them (`sft_data.judge_prompt_ids`). With `length_bucketing` they go to the sampler
  in calls of similar length (`length_groups`); without it, in input order, `batch_size` at a
  time (all at once when None). A row's greedy answer does not depend on the other rows of
  its call (up to the float rounding of differently shaped matmuls), so both give the same
  answers; bucketing only pads less. `sampler_kwargs` go to `sampling.sample`'s
  cache (e.g. `batch_sharding` and `min_batch` for a teacher on a Mesh).
  """
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"ask_teacher: batch_size={batch_size}: must be >= 1 (or None for one call).")
  if not prompt_ids:
    return []
  stop_ids = _stop_ids(tokenizer)
  config = sampling.SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=stop_ids, pad_id=_pad_id(tokenizer))
  sampler_kwargs = dict(sampler_kwargs or {})
  ids = [list(x) for x in prompt_ids]
  if length_bucketing:
    groups = length_groups([len(x) for x in ids], max_rows=batch_size,
                           min_rows=sampler_kwargs.get("min_batch", 1),
                           min_chunk=sampler_kwargs.get("min_chunk", 16))
  else:
    # `sampling.sample` buckets the batch (powers of two) and the prompt length, so the
    # remainder call compiles at most a handful of extra shapes.
    step = batch_size or len(ids)
    groups = [list(range(s, min(s + step, len(ids)))) for s in range(0, len(ids), step)]
  answers: list[str | None] = [None] * len(ids)
  for call, group in enumerate(groups):
    out = sampling.sample(teacher, [ids[i] for i in group], jax.random.fold_in(rng, call), config,
                          **sampler_kwargs)
    for row, i in enumerate(group):
      answers[i] = decode_reply(tokenizer, out.tokens[row, : out.lengths[row]].tolist(), stop_ids)
  return answers


# ------------------------------------------------------------------------------------------
# Transcript mode.


def label_token_ids(tokenizer: Any) -> np.ndarray:
  """[3] int32: the token each label word starts with, in `prompts.LABEL_NAMES` order.

  The transcript judge reads its answer from one next-token distribution, so the three first
  tokens must differ.
  """
  ids = [tokenizer.encode(name, add_special_tokens=False)[:1] for name in prompts.LABEL_NAMES]
  if any(not i for i in ids) or len({i[0] for i in ids}) != len(ids):
    raise ValueError(
        f"judge.mode='transcript' reads the label from the answer's first token, but tokenizer "
        f"{type(tokenizer).__name__} starts {prompts.LABEL_NAMES} with the tokens {ids}: they must be distinct.")
  return np.asarray([i[0] for i in ids], np.int32)


@dataclasses.dataclass(frozen=True)
class PackedQuestions:
  """A batch's transcript-judge questions, packed after their episode's transcript.

  Row b holds episode b's transcript, then one question per asked turn
  (`transcript_questions`). Each question sits at the positions that follow the transcript
  tokens it reads, as if it were the transcript's only continuation: `positions` restart for
  every question, and a question's tokens read only the transcript before their `reach` and
  the earlier tokens of their own question (`models.packed_allowed`). The teacher's scoring
  forward then answers every question of the batch as it scores the transcripts
  (`teacher.score_tokens(questions=)`): the transcripts are read once, not once per turn,
  and the questions fill the rows' padding first.

  Attributes:
    tokens, positions: [B, W] int32, W >= the batch's S; the first S columns of `tokens`
      are the batch's tokens wherever it has real ones.
    segments: [B, W] int32: 0 on the transcript and on padding, r + 1 on the row's r-th question.
    reach: [B, W] int32: how many transcript tokens a token may read.
    mask: [B, W] int32, 1 on real tokens.
    answer_at: [B, R] int32: each question's last position, whose next token is the answer
      (0 past the row's questions).
    turns: per question, (b, t, r): episode b, its turn index t, column r of `answer_at`.
  """

  tokens: np.ndarray
  positions: np.ndarray
  segments: np.ndarray
  reach: np.ndarray
  mask: np.ndarray
  answer_at: np.ndarray
  turns: list[tuple[int, int, int]]

  def arrays(self) -> dict[str, np.ndarray]:
    """What `teacher.score_tokens(questions=)` reads."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "turns"}


def pack_questions(tokens_BxS: np.ndarray, attention_mask_BxS: np.ndarray,
                   questions: Sequence[tuple[int, int, int, Sequence[int]]], pad_id: int,
                   packing: Mapping[str, np.ndarray] | None = None) -> PackedQuestions:
  """Packs (b, t, reach, question token ids) after each episode's transcript (`PackedQuestions`).

  A question reads the first `reach` tokens of its row's transcript. The width is the batch's
  S, or a `sampling.bucket_length` when the questions overflow it, and R a power of two, so a
  run compiles a handful of shapes.

  With the batch's `packing` (`rollout.RolloutBatch`'s positions, segments and reach), its first
  S columns keep it, and a question whose last read token lies in a turn's own segment (a turn
  past the history window) joins that segment: it reads what the student saw at that turn (P,
  the windowed context, the response), at the positions that follow it.
  """
  tokens_BxS = np.asarray(tokens_BxS)
  lengths = np.asarray(attention_mask_BxS).astype(bool).sum(axis=1)
  rows: list[list[tuple[int, int, list[int]]]] = [[] for _ in range(tokens_BxS.shape[0])]
  for b, t, end, ids in questions:
    if not 0 < end <= lengths[b]:
      raise ValueError(f"pack_questions: the question about episode {b}, turn index {t} reads {end} tokens of a "
                       f"{lengths[b]}-token transcript.")
    if not len(ids):
      raise ValueError(f"pack_questions: the question about episode {b}, turn index {t} is empty.")
    rows[b].append((t, int(end), list(ids)))
  needed = max(int(n) + sum(len(ids) for _, _, ids in row) for n, row in zip(lengths, rows))
  width = max(tokens_BxS.shape[1], sampling.bucket_length(needed))
  num_answers = 1 << max(max(len(row) for row in rows) - 1, 0).bit_length()
  shape = (tokens_BxS.shape[0], width)
  tokens, positions = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32)
  segments, reach, mask = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  answer_at = np.zeros((shape[0], num_answers), np.int32)
  turns = []
  for b, row in enumerate(rows):
    n = int(lengths[b])
    tokens[b, :n], positions[b, :n], reach[b, :n], mask[b, :n] = tokens_BxS[b, :n], np.arange(n), n, 1
    first_free = 1
    if packing is not None:
      positions[b, :n], segments[b, :n] = packing["positions"][b, :n], packing["segments"][b, :n]
      reach[b, :n] = np.where(segments[b, :n] == 0, n, packing["reach"][b, :n])
      first_free = int(segments[b, :n].max(initial=0)) + 1
    for r, (t, end, ids) in enumerate(row):
      span = slice(n, n + len(ids))
      tokens[b, span], positions[b, span] = ids, positions[b, end - 1] + 1 + np.arange(len(ids))
      if segments[b, end - 1]:  # In a turn's segment: read it, and what it reads of the row's start.
        segments[b, span], reach[b, span] = segments[b, end - 1], reach[b, end - 1]
      else:
        segments[b, span], reach[b, span] = first_free + r, end
      mask[b, span] = 1
      n += len(ids)
      answer_at[b, r] = n - 1
      turns.append((b, t, r))
  return PackedQuestions(tokens, positions, segments, reach, mask, answer_at, turns)


def transcript_questions(episodes: Sequence[JudgedEpisode], turn_ids_BxS: np.ndarray, tokenizer: Any,
                         asked: np.ndarray, show_admissible: bool = True) -> list[tuple[int, int, int, str]]:
  """(b, t, reach, question text) for every asked turn, in row-major order.

  Turn t's question (`prompts.transcript_judge_text`) reads the transcript through the turn's
  response tokens (`reach`) and goes on from there: the rest of the assistant message (a
  response that kept its end-of-turn token, `Turn.response_end`, is not closed twice), the
  user message with the turn's feedback and section 5's lines, and the reply's opening. The
  feedback is encoded with the question, in one string, although the transcript holds it for
  every turn but the last: that is how SFT and the held-out accuracy encode the question
  (`sft_data.judge_prompt_segments`), and BPE merges the feedback's last characters with the
  question's first newline (Qwen's `' 1.\n'` is one token fewer than `' 1.'` then `'\n'`). It
  also keeps a question about a turn past a history window in that turn's segment of a packed
  batch (`pack_questions`): it reads what the student saw when it acted, never the next
  turn's context, where the window has moved on.
  """
  layout = prompts.ChatLayout.from_tokenizer(tokenizer)
  turn_ids_BxS = np.asarray(turn_ids_BxS)
  out = []
  for b, t in zip(*np.nonzero(asked)):
    turn = episodes[b].turns[t]
    ends = np.flatnonzero(turn_ids_BxS[b] == t + 1)
    if not len(ends):
      raise ValueError(f"transcript_questions: episode {b} has no response tokens for turn index {t} "
                       f"(turn id {t + 1}).")
    admissible = list(turn.admissible) if show_admissible else []
    text = prompts.transcript_judge_text(layout, turn.feedback, admissible, turn.response_end)
    out.append((int(b), int(t), int(ends[-1]) + 1, text))
  return out


def prepare_transcript_judge(
    episodes: Sequence[JudgedEpisode], num_turns: int, config: JudgeConfig, tokenizer: Any,
    tokens_BxS: np.ndarray, attention_mask_BxS: np.ndarray, turn_ids_BxS: np.ndarray,
    packing: Mapping[str, np.ndarray] | None = None,
) -> PackedQuestions:
  """The questions of a batch's judged turns (`mode='transcript'`), packed for the teacher's scoring.

  `packing`: the batch's positions, segments and reach (`rollout.RolloutBatch`), if it packs
  turns past a history window.
  """
  _check_turns(episodes, num_turns)
  texts = transcript_questions(episodes, turn_ids_BxS, tokenizer, _valid_turns(episodes, num_turns),
                               config.show_admissible)
  encoded = [(b, t, reach, tokenizer.encode(text, add_special_tokens=False)) for b, t, reach, text in texts]
  return pack_questions(tokens_BxS, attention_mask_BxS, encoded, _pad_id(tokenizer), packing)


def transcript_answers(questions: PackedQuestions, answer_logits_BxRxV: Any, tokenizer: Any
                       ) -> list[tuple[int, int, prompts.JudgeReply, str]]:
  """(b, t, reply, answer) per question, from its next-token logits (`teacher.score_tokens`).

  The label is the one whose first token is the greedy answer; any other answer has no label
  (`prompts.NO_LABEL`), as an unclear prompted answer has none.
  """
  label_ids = list(label_token_ids(tokenizer))
  top_BxR = np.argmax(np.asarray(answer_logits_BxRxV), axis=-1)
  out = []
  for b, t, r in questions.turns:
    token = int(top_BxR[b, r])
    reply = (prompts.JudgeReply(losses.Label(label_ids.index(token)), "answered") if token in label_ids
             else prompts.JudgeReply(prompts.UNANSWERED_LABEL, prompts.NO_LABEL))
    out.append((b, t, reply, tokenizer.decode([token], skip_special_tokens=False)))
  return out


# ------------------------------------------------------------------------------------------
# Likelihood mode.


def action_token_mask(tokens_BxS: np.ndarray, turn_ids_BxS: np.ndarray, tokenizer: Any) -> np.ndarray:
  """[B, S] bool: the response tokens that spell each turn's action command.

  A token counts when its decoded characters overlap the command between the last
  `<action>` tag and its closing tag (think text, tags and end-of-turn tokens do not count).
  Special tokens decode to nothing, so that the end-of-turn token after an unclosed action is
  not read as part of it. Character offsets come from decoding prefixes, which is exact for any
  tokenizer whose decode of a prefix is a prefix of the decode (byte-level BPE, word-level). The
  prefix lengths then grow with the prefix, so the tokens that overlap the command are one
  contiguous run, found by bisecting for its two ends: O(log n) decodes per turn, not one per
  token (12 for a 654-token Qwen3 turn, against 655; `benchmarks/bench_action_mask.py` times both).
  """
  tokens_BxS, turn_ids_BxS = np.asarray(tokens_BxS), np.asarray(turn_ids_BxS)
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
      # ends(j): the characters of the first j + 1 tokens; token j spans [ends(j - 1), ends(j)).
      # Cached: the command is short, so both bisections mostly probe the same prefixes.
      ends = functools.cache(lambda j: len(tokenizer.decode(ids[: j + 1], skip_special_tokens=True)))
      first = bisect.bisect_right(range(len(ids)), span[0], key=ends)  # The first token ending past the start.
      last = bisect.bisect_left(range(len(ids)), span[1], key=ends)  # The first token reaching the end.
      mask[b, positions[first : last + 1]] = True
  return mask


def likelihood_labels(
    teacher_logprobs_BxS: Any,
    action_mask_BxS: np.ndarray,
    turn_ids_BxS: np.ndarray,
    num_turns: int,
    thresholds: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
  """Labels from the teacher's mean log-prob of each turn's action tokens.

  Returns:
    labels: [B, T] int32: Skip if the mean > thresholds[0], Weak if > thresholds[1], else
      Strong; Strong for turns without action tokens.
    mean_logprob: [B, T] float32 (0 for turns without action tokens).
  """
  action_turn_ids = jnp.where(jnp.asarray(action_mask_BxS), jnp.asarray(turn_ids_BxS), 0)
  mean_BxT = np.asarray(losses.turn_mean(jnp.asarray(teacher_logprobs_BxS), action_turn_ids, num_turns))
  has_action = np.asarray(losses.turn_lengths(action_turn_ids, num_turns)) > 0
  skip_above, weak_above = thresholds
  labels = np.where(mean_BxT > skip_above, losses.Label.SKIP,
                    np.where(mean_BxT > weak_above, losses.Label.WEAK, losses.Label.STRONG))
  labels = np.where(has_action, labels, losses.Label.STRONG).astype(np.int32)
  return labels, mean_BxT.astype(np.float32)


# ------------------------------------------------------------------------------------------
# The judge modes: one interface, two steps.


class JudgeMode:
  """A judge mode (`config.judge.mode`): every mode takes the same two steps.

  `prepare` runs before the teacher scores the batch and returns the questions that ride in
  that forward (`teacher.score_batch(questions=)`), or None; `read` labels the asked turns from
  the episodes, the scored batch and the answers to those questions. `label` is both around
  them: the asked turns are the valid ones, every other turn is Strong by rule.

  The scored batch (`batch`) holds what the mode reads of `teacher.score_batch`'s output and the
  rollout's arrays: tokens, attention_mask, turn_ids, teacher_logprobs, answer_logits.
  """

  name = ""
  # Whether the turn is read inside the scored transcript (else as text, with its history).
  reads_transcript = True
  # Whether the teacher answers a question at the end of the transcript, so that its judge
  # examples (`sft_data`) take that layout rather than the judge prompt's.
  asks_in_transcript = False
  # Whether the labels need the env expert's action at every turn (the rollout shadows it).
  needs_expert = False

  def __init__(self, config: JudgeConfig, *, teacher: nnx.Module | None = None, tokenizer: Any = None,
               sampler_kwargs: Mapping[str, Any] | None = None):
    self.config = config
    self.teacher = teacher
    self.tokenizer = tokenizer
    self.sampler_kwargs = sampler_kwargs

  def prepare(self, episodes: Sequence[JudgedEpisode], num_turns: int, batch: Mapping[str, Any]
              ) -> PackedQuestions | None:
    del episodes, num_turns, batch
    return None

  def read(self, episodes: Sequence[JudgedEpisode], num_turns: int, asked: np.ndarray, batch: Mapping[str, Any],
           questions: PackedQuestions | None, rng: jax.Array | None
           ) -> tuple[np.ndarray, list[tuple[int, int, str, str]] | None, int]:
    """-> (labels [B, T], read where `asked`; per answered turn (b, t, the teacher's answer, its
    `prompts.JudgeReply.status`), or None; prompts sent)."""
    raise NotImplementedError

  def label(self, episodes: Sequence[JudgedEpisode], num_turns: int, batch: Mapping[str, Any] | None = None,
            questions: PackedQuestions | None = None, rng: jax.Array | None = None) -> JudgeResult:
    """Labels every turn of a rollout batch: `read` where asked, Strong elsewhere."""
    _check_turns(episodes, num_turns)
    asked = _valid_turns(episodes, num_turns)
    labels, replies, num_prompts = self.read(episodes, num_turns, asked, batch or {}, questions, rng)
    answers: list[list[str | None]] = [[None] * len(e.turns) for e in episodes]
    statuses: list[list[str | None]] = [[None] * len(e.turns) for e in episodes]
    for b, t, answer, status in replies or ():
      answers[b][t], statuses[b][t] = answer, status
    fallbacks = [status for _, _, _, status in replies or () if status != "answered"]
    if fallbacks:
      _log.warning("judge: %d of %d replies had no label and are %s (%d still thinking at max_new_tokens=%d); "
                   "see judge/unanswered_frac.", len(fallbacks), len(replies), prompts.UNANSWERED_LABEL.word,
                   fallbacks.count(prompts.UNCLOSED_THINK), self.config.max_new_tokens)
    return JudgeResult(labels=np.where(asked, labels, losses.Label.STRONG).astype(np.int32), asked=asked,
                       answers=answers, num_prompts=num_prompts, statuses=statuses)

  def _need(self, name: str, value: Any, where: str = "") -> Any:
    if value is None:
      raise ValueError(f"judge: mode={self.name!r} needs `{name}`{where}.")
    return value


_JUDGE_MODES: dict[str, type[JudgeMode]] = {}


def _register_mode(mode: type[JudgeMode]) -> type[JudgeMode]:
  _JUDGE_MODES[mode.name] = mode
  return mode


def judge_mode(name: str) -> type[JudgeMode]:
  """The judge mode class registered as `name` (its declarations, before a judge is built)."""
  if name not in _JUDGE_MODES:
    raise ValueError(f"judge mode {name!r}: must be one of {tuple(_JUDGE_MODES)}.")
  return _JUDGE_MODES[name]


def make_judge(config: JudgeConfig, *, teacher: nnx.Module | None = None, tokenizer: Any = None,
               sampler_kwargs: Mapping[str, Any] | None = None) -> JudgeMode:
  """The judge of `config.mode`."""
  return judge_mode(config.mode)(config, teacher=teacher, tokenizer=tokenizer, sampler_kwargs=sampler_kwargs)


@_register_mode
class PromptJudge(JudgeMode):
  """The paper's judge: the teacher answers the judge prompt of each asked turn greedily."""

  name = "prompt"
  reads_transcript = False

  def __init__(self, config, **kwargs):
    super().__init__(config, **kwargs)
    if self.tokenizer is not None:
      _check_thinking(self.tokenizer, config.enable_thinking)

  def read(self, episodes, num_turns, asked, batch, questions, rng):
    del batch, questions
    for what, value in (("teacher", self.teacher), ("tokenizer", self.tokenizer), ("rng", rng)):
      self._need(what, value)
    config = self.config
    requests = judge_prompt_texts(episodes, self.tokenizer, config.history_turns, asked, config.show_admissible,
                                  config.enable_thinking)
    # Each prompt is one piece, encoded as the SFT data encodes it (`sft_data.judge_segments`).
    ids = [self.tokenizer.encode(text, add_special_tokens=False) for _, _, text in requests]
    replies = ask_teacher(self.teacher, self.tokenizer, ids, rng,
                          max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                          length_bucketing=config.length_bucketing, sampler_kwargs=self.sampler_kwargs)
    labels = np.full((len(episodes), num_turns), losses.Label.STRONG, np.int32)
    read = []
    for (b, t, _), reply in zip(requests, replies):
      label, status = prompts.parse_judge_reply(reply)
      labels[b, t] = label
      read.append((b, t, reply, status))
    return labels, read, len(requests)


@_register_mode
class TranscriptJudge(JudgeMode):
  """Section 5's question as a continuation of the scored transcript, answered in the teacher's scoring forward."""

  name = "transcript"
  asks_in_transcript = True

  def prepare(self, episodes, num_turns, batch):
    packing = {k: batch[k] for k in ("positions", "segments", "reach")} if "segments" in batch else None
    return prepare_transcript_judge(episodes, num_turns, self.config, self._need("tokenizer", self.tokenizer),
                                    batch["tokens"], batch["attention_mask"], batch["turn_ids"], packing)

  def read(self, episodes, num_turns, asked, batch, questions, rng):
    del asked, rng
    where = " (from `prepare` and `teacher.score_tokens(questions=)`)"
    self._need("questions", questions, where)
    self._need("answer_logits_BxRxV", batch.get("answer_logits"), where)
    self._need("tokenizer", self.tokenizer, where)
    replies = transcript_answers(questions, batch["answer_logits"], self.tokenizer)
    labels = np.full((len(episodes), num_turns), losses.Label.STRONG, np.int32)
    for b, t, reply, _ in replies:
      labels[b, t] = reply.label
    return labels, [(b, t, answer, reply.status) for b, t, reply, answer in replies], len(replies)


@_register_mode
class LikelihoodJudge(JudgeMode):
  """The teacher's mean log-prob of each turn's action tokens, against two thresholds."""

  name = "likelihood"

  def read(self, episodes, num_turns, asked, batch, questions, rng):
    del episodes, asked, questions, rng
    names = (("tokens_BxS", "tokens"), ("turn_ids_BxS", "turn_ids"), ("teacher_logprobs_BxS", "teacher_logprobs"))
    for name, key in names:
      self._need(name, batch.get(key))
    mask = action_token_mask(batch["tokens"], batch["turn_ids"], self._need("tokenizer", self.tokenizer))
    labels, _ = likelihood_labels(batch["teacher_logprobs"], mask, batch["turn_ids"], num_turns,
                                  self.config.likelihood_thresholds)
    return labels, None, 0


@_register_mode
class OracleJudge(JudgeMode):
  """The env expert's labels: analysis only, not SAGE-OPD's verifier-free judge."""

  name = "oracle"
  needs_expert = True

  def read(self, episodes, num_turns, asked, batch, questions, rng):
    del batch, questions, rng
    _log.warning("judge.mode='oracle': labels come from the environment's expert. This is for "
                 "analysis only; it is not SAGE-OPD's verifier-free judge.")
    oracle, known = oracle_labels(episodes, num_turns)
    missing = np.argwhere(asked & ~known)
    if len(missing):
      b, t = missing[0]
      raise ValueError(
          f"judge.mode='oracle' needs expert_action on every valid turn; episodes[{b}].turns[{t}] has none.")
    return oracle, None, 0


def judge_batch(
    episodes: Sequence[JudgedEpisode],
    num_turns: int,
    config: JudgeConfig,
    *,
    teacher: nnx.Module | None = None,
    tokenizer: Any = None,
    rng: jax.Array | None = None,
    tokens_BxS: np.ndarray | None = None,
    turn_ids_BxS: np.ndarray | None = None,
    teacher_logprobs_BxS: Any = None,
    questions: PackedQuestions | None = None,
    answer_logits_BxRxV: Any = None,
    sampler_kwargs: Mapping[str, Any] | None = None,
) -> JudgeResult:
  """Labels every turn of a rollout batch with `config.mode`'s judge (`make_judge(...).label`).

  Args:
    episodes: the rollout's host-side episodes, row b of the batch is episodes[b].
    num_turns: T, the width of the batch's per-turn arrays.
    config: the judge settings.
    teacher, tokenizer, rng: the teacher model, the shared tokenizer and a key (`prompt` mode).
    tokens_BxS, turn_ids_BxS, teacher_logprobs_BxS: the batch's tokens, turn ids and the
      teacher's token log-probs from `teacher.score_tokens` (`likelihood` mode; it also needs
      the tokenizer to find the action tokens).
    questions, answer_logits_BxRxV: `prepare_transcript_judge`'s questions and the teacher's
      `answer_logits` from scoring the batch with them (`transcript` mode, with the tokenizer).
    sampler_kwargs: passed to `ask_teacher` (`prompt` mode).

  Returns:
    A `JudgeResult`; invalid turns are Strong and never reach the teacher.
  """
  batch = {k: v for k, v in dict(tokens=tokens_BxS, turn_ids=turn_ids_BxS, teacher_logprobs=teacher_logprobs_BxS,
                                 answer_logits=answer_logits_BxRxV).items() if v is not None}
  judge = make_judge(config, teacher=teacher, tokenizer=tokenizer, sampler_kwargs=sampler_kwargs)
  return judge.label(episodes, num_turns, batch, questions, rng)


# ------------------------------------------------------------------------------------------
# Metrics and held-out evaluation.


def judge_metrics(
    result: JudgeResult,
    episodes: Sequence[JudgedEpisode],
    mode: str,
    confidence_BxT: Any = None,
) -> dict[str, float]:
  """Scalar judge metrics of one batch (keys `judge/...`).

  - label mix over the real turns (`skip_frac`, `weak_frac`, `strong_frac`);
  - `asked_frac` (turns sent to the judge mode) and `num_prompts` (teacher calls);
  - `unanswered_frac`: the asked turns whose reply held no label and got the fallback
    (`prompts.UNANSWERED_LABEL`), and `unclosed_think_frac`, those of them still thinking when
    the reply's budget ended (`prompts.UNCLOSED_THINK`); 0 in the modes that ask nothing;
  - agreement with the env expert's oracle labels where the turns have them: `oracle_accuracy`
    over the judged (valid) turns, the judge's own accuracy, and `oracle_accuracy_all` over
    every turn with an oracle label (invalid turns agree by rule); both only when some judged
    turn has an expert action, with `oracle_count` the judged turns that do;
  - `confidence_<label>`: the mean turn confidence c_t by label, when `confidence_BxT` is given;
  - `oracle_mode`: 1 when the labels ARE the oracle (analysis only), else 0.
  """
  num_turns = result.labels.shape[1]
  real = _real_turns(episodes, num_turns)
  labels = result.labels
  metrics: dict[str, float] = {"judge/oracle_mode": float(mode == "oracle")}
  total = max(int(real.sum()), 1)
  for code, name in enumerate(prompts.LABEL_NAMES):
    metrics[f"judge/{name.lower()}_frac"] = float(np.sum(real & (labels == code)) / total)
  metrics["judge/asked_frac"] = float(np.sum(result.asked & real) / total)
  metrics["judge/num_prompts"] = float(result.num_prompts)
  statuses = [s for row in (result.statuses or ()) for s in row if s is not None]
  asked = max(int(np.sum(result.asked & real)), 1)
  metrics["judge/unanswered_frac"] = sum(s != "answered" for s in statuses) / asked
  metrics["judge/unclosed_think_frac"] = sum(s == prompts.UNCLOSED_THINK for s in statuses) / asked

  oracle, known = oracle_labels(episodes, num_turns)
  judged_known = known & result.asked
  metrics["judge/oracle_count"] = float(judged_known.sum())
  # Without any expert action only the invalid turns have oracle labels, and those agree by
  # rule: no accuracy is reported then, rather than a vacuous 1.0.
  if judged_known.any():
    metrics["judge/oracle_accuracy"] = float(np.mean(labels[judged_known] == oracle[judged_known]))
    all_known = known & real
    metrics["judge/oracle_accuracy_all"] = float(np.mean(labels[all_known] == oracle[all_known]))

  if confidence_BxT is not None:
    confidence = np.asarray(confidence_BxT, np.float64)
    if confidence.shape != labels.shape:
      raise ValueError(f"judge_metrics: confidence_BxT has shape {confidence.shape}; expected {labels.shape}.")
    for code, name in enumerate(prompts.LABEL_NAMES):
      hit = real & (labels == code)
      if hit.any():
        metrics[f"judge/confidence_{name.lower()}"] = float(confidence[hit].mean())
  return metrics


def judge_accuracy(
    teacher: nnx.Module,
    tokenizer: Any,
    examples: Sequence[sft_data.JudgeExampleLike],
    rng: jax.Array,
    *,
    history_turns: int,
    show_admissible: bool = True,
    transcript: bool = False,
    max_new_tokens: int = 4,
    enable_thinking: bool = False,
    acting_thinking: bool | None = None,
    batch_size: int | None = None,
    sampler_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
  """The judge's accuracy against labelled judge examples (e.g. of held-out games).

  The questions are the token ids the SFT data trains (`sft_data.judge_prompt_ids`;
  `transcript` for the transcript judge, whose examples keep every past turn), and the
  teacher answers them greedily, thinking first with `enable_thinking`; `acting_thinking`
  (config.sampling.enable_thinking) renders the transcripts as the student acts.
  Returns `judge_eval/accuracy`, the per-label recall `judge_eval/recall_<label>` (for labels
  present), the predicted label mix `judge_eval/pred_<label>_frac`, `judge_eval/unanswered_frac`
  (replies with no label, given `prompts.UNANSWERED_LABEL`) and `judge_eval/count`.
  """
  if not examples:
    raise ValueError("judge_accuracy: `examples` is empty.")
  _check_thinking(tokenizer, enable_thinking)
  ids = [sft_data.judge_prompt_ids(tokenizer, ex, history_turns, show_admissible, transcript, enable_thinking,
                                   acting_thinking) for ex in examples]
  replies = [prompts.parse_judge_reply(r) for r in ask_teacher(
      teacher, tokenizer, ids, rng, max_new_tokens=max_new_tokens, batch_size=batch_size,
      sampler_kwargs=sampler_kwargs)]
  predicted = np.asarray([reply.label for reply in replies], np.int32)
  truth = np.asarray([ex.label for ex in examples], np.int32)
  metrics = {"judge_eval/accuracy": float(np.mean(predicted == truth)), "judge_eval/count": float(len(truth)),
             "judge_eval/unanswered_frac": float(np.mean([reply.status != "answered" for reply in replies]))}
  for code, name in enumerate(prompts.LABEL_NAMES):
    if (truth == code).any():
      metrics[f"judge_eval/recall_{name.lower()}"] = float(np.mean(predicted[truth == code] == code))
    metrics[f"judge_eval/pred_{name.lower()}_frac"] = float(np.mean(predicted == code))
  return metrics
