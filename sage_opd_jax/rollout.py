"""Multi-turn rollouts: B lockstep episodes in env worker processes -> one `RolloutBatch`.

Host loop (the imperative shell around `sampling.EpisodeCache`, the jitted sampler):

* **Lockstep.** Every live episode of a group takes its turn t in one `generate` call. An
  episode that ends (won, lost, env failure, turn limit, context budget) passes None from then
  on: the `EpisodeCache` releases its row and compacts the live rows into a smaller batch, so
  finished episodes stop costing decode compute.
* **Overlap of env and model time: a two-group pipeline.** The B episodes are split into
  `pipeline_groups` (default 2) contiguous groups, each with its own `EpisodeCache`. While
  group A generates, group B's env steps run in the pool's worker processes, and the other way
  round:

      main:     gen A(t) | gen B(t) | gen A(t+1) | gen B(t+1) | ...
      workers:           | env A(t) | env B(t)   | env A(t+1) | ...

  A group's responses all come back from one `generate` call at once, so "submit each row's
  step as soon as its response is ready" gains nothing over a whole-group submit; two groups
  are the simplest split that hides the env time behind the other group's generation, at the
  cost of two half-size decode calls per turn instead of one. `pipeline_groups=1` is the
  sequential baseline. `RolloutStats` reports the model, env-wait and wall times;
  `benchmarks/bench_rollout.py` measures the overlap.
* **Envs.** The engine owns an `EnvPool` of `num_workers` processes; episode e lives in worker
  e % num_workers (`envs.multi_env` hosts several envs per worker when B > num_workers), and a
  lockstep round sends one batched call per worker. A crashed or hung worker fails only the
  episodes it hosts; an env exception only its own episode (`Episode.error`).

**What the student saw is what is trained.** The chat layout is `prompts`' multi-turn one:
P = `episode_start_text(task, o_1)`, then per turn t the sampled response y_t and
n_t = `next_turn_text(o_{t+1})`. Everything is concatenated at the token level (generated ids
are never re-tokenised). With history window k, turn t's context is
`P + (y_i + n_i for the last k turns before t)`; P (task and o_1) always stays. While
t - 1 <= k (or k is None) that is the transcript's prefix, and the batch row continues the
transcript `P + y_1 + n_1 + ... + y_t`; a later turn (`truncated[b, t]`) gets its own segment
of the row, its windowed context after P then y_t, at positions that restart after P and
attending to P and itself only (`assemble_batch`; `models.packed_allowed`). The loss
(`update.student_logits`), the teacher's scores and the transcript judge all read that row, so
every response token is trained, scored and judged in the context it was sampled under, and
its log pi_theta at the sampler's weights equals `behaviour_logprobs`.

*The cost, measured* (`benchmarks/bench_context.py`). On 18 valid_unseen games won by the expert
(3 per task type, 283 turns) with Qwen3's tokenizer and thinking on, P is 399 tokens (max 425) and
n_t, an observation with its admissible actions, 213 (90th percentile 261, max 467). A turn then
adds y + n to the row on the full history but k(y + n) + y as its own segment: at k = 3, a 50-turn
episode is 36.7k tokens on the full history against 127.4k packed with responses at the 512-token
cap, and 17.5k against 55.2k at 128-token responses (3.2-3.5x). Within `max_context_tokens` =
4,096 (which reserves `max_new_tokens` = 512 for the next response) an episode gets 5 turns on the
full history and 4 packed at the cap, 9.7 and 5.2 at 128 tokens; within 40,960, all 50 on the full
history and 17.4 packed at the cap (37.2 at 128 tokens). Packing also re-encodes each
turn's whole window (the window moves, so the KV cache keeps only P), where the full history
prefills only n_t. So the paper config acts on the full history (every context a transcript
prefix: nothing is packed) with a budget that holds its 50 turns; a window trades those
tokens for a shorter acting context, and stays exact. `context_cut_rate` (rollout and eval
metrics) reports the share of episodes the budget ended.

**The `opd_two_rollout` hook** (docs/method.md's table): `intervene(states)` is called once per
group per turn, after the student generated and before the env steps, with one `TurnState` per
live episode. It returns `{episode index: replacement response}` (text, or token ids of the
student's tokenizer). A replaced response is what the env acts on and what the transcript
holds; its tokens get behaviour log-prob 0 (the student did not sample them: recompute
pi_old if needed) and the turn is flagged `intervened[b, t]`. The next turn's context holds the
replaced tokens: the `EpisodeCache` re-encodes that row from the first differing token.

**Determinism.** Episode e's turn-t key is `fold_in(fold_in(rng, episode_ids[e]), t)`, and the
sampler draws each row from its own key; env results are gathered per group before its next
generate, so the same key and tasks (and deterministic envs) give an identical batch, whatever
order the workers answer in, however the episodes are grouped, and however a global batch is
split over processes (each plays its share with the global indices as `episode_ids`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import tqdm
from flax import nnx

from sage_opd_jax import prompts
from sage_opd_jax import sampling
from sage_opd_jax.envs import base
from sage_opd_jax.envs import multi_env
from sage_opd_jax.envs import pool as pool_lib


# ----------------------------------------------------------------------------------------------
# Host-side records.


@dataclasses.dataclass
class Turn:
  """One student turn, host side.

  Attributes:
    observation: o_t, the env's text the student saw before acting.
    admissible: the admissible actions at o_t.
    response: the generated (or intervened) response text, decoded from `response_tokens`.
    response_tokens: its token ids, as they appear in the transcript.
    response_end: the end-of-turn text the response kept (the text of its final stop token,
      which the sampler keeps), else "". The rest of the assistant message continues it, in
      `next_tokens` and in the transcript judge's question after the last turn.
    response_logprobs: [len(response_tokens)] float32 behaviour log-probs (0 if intervened).
    action: the parsed action, or None when unparseable.
    feedback: o_{t+1}, the env's answer ("" if the env failed).
    valid: parseable and accepted by the env as admissible.
    repeated: parseable and equal to the previous turn's action.
    won: the episode was won by this turn.
    done: the episode ended after this turn.
    intervened: the response was replaced by the `intervene` hook.
    truncated: the context dropped earlier turns (history window k < t - 1).
    window_tokens: when `truncated`, the context's tokens after P (the kept turns' response and
      next tokens, or for k = 0 the empty assistant message and o_t): the turn's own segment of
      the batch row holds them before its response (`assemble_batch`). Empty otherwise.
    expert_action: the shadow expert's action at o_t (`RolloutConfig.expert`), else None.
    expert_search: the actions the expert's search could equally have named at o_t, expert_action among
      them (`multi_env`'s `expert_search`); () when it was no search step or no expert runs.
    next_tokens: the tokens of n_t (rest of the assistant message, user(o_{t+1}), generation
      prompt), which follow `response_tokens` in the transcript unless this is the last turn.
  """

  observation: str
  admissible: list[str]
  response: str = ""
  response_tokens: list[int] = dataclasses.field(default_factory=list)
  response_end: str = ""
  response_logprobs: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.float32))
  action: str | None = None
  feedback: str = ""
  valid: bool = False
  repeated: bool = False
  won: bool = False
  done: bool = False
  intervened: bool = False
  truncated: bool = False
  expert_action: str | None = None
  expert_search: tuple[str, ...] = ()
  next_tokens: list[int] = dataclasses.field(default_factory=list)
  window_tokens: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Episode:
  """One episode, host side: its task, turns and the transcript's first piece.

  Attributes:
    task: the env task.
    task_text: the task as the env states it ("Your task is to: ...").
    turns: the student's turns in order.
    prompt_tokens: P, the tokens of the first prompt (system, user(task + o_1), gen prompt).
    won: the episode was won.
    error: why the episode failed (env crash, timeout or exception), else None.
    budget_ended: it ended because another turn could outgrow `max_context_tokens` (its packed
      row or its context).
    finished: no more turns will be played (set by the engine while it runs).
  """

  task: base.Task
  task_text: str = ""
  turns: list[Turn] = dataclasses.field(default_factory=list)
  prompt_tokens: list[int] = dataclasses.field(default_factory=list)
  won: bool = False
  error: str | None = None
  budget_ended: bool = False
  finished: bool = False


@dataclasses.dataclass(frozen=True)
class TurnState:
  """What the `intervene` hook sees of a live episode's current turn (read-only)."""

  episode: int  # Row b of the batch.
  turn: int  # t, from 1.
  task: base.Task
  task_text: str
  history: tuple[Turn, ...]  # Turns 1..t-1.
  observation: str  # o_t.
  admissible: tuple[str, ...]
  response: str  # The student's y_t.
  action: str | None  # Parsed from it.
  context: tuple[int, ...] = ()  # The token ids y_t was sampled from (a replacement continues them).
  response_tokens: tuple[int, ...] = ()  # y_t's token ids.
  response_end: str = ""  # The end-of-turn text y_t kept (`Turn.response_end`).
  expert_action: str | None = None  # The shadow expert's action at o_t, if one runs.


Intervene = Callable[[Sequence[TurnState]], Mapping[int, "str | Sequence[int]"]]


@dataclasses.dataclass
class RolloutStats:
  """Where the wall time of one rollout went (seconds).

  model_s: inside `EpisodeCache.generate` (compiles included, results fetched to the host).
  env_wait_s: the main thread blocked waiting for env results (env time NOT hidden).
  env_busy_s: the workers' own time on resets and steps, summed over workers.
  wall_s: the whole rollout. generate_calls: decode calls; turns: student turns taken.
  """

  model_s: float = 0.0
  env_wait_s: float = 0.0
  env_busy_s: float = 0.0
  wall_s: float = 0.0
  generate_calls: int = 0
  turns: int = 0


@dataclasses.dataclass
class RolloutBatch:
  """The rollout contract: padded host arrays plus the host-side episodes.

  Row b is episode b, packed so that every response token is read in the context it was
  sampled under (`assemble_batch`): first the shared transcript prefix P + y_1 + n_1 + ... +
  y_m over the turns whose context was the transcript's prefix, then one segment per later
  (`truncated`) turn t: its windowed context after P, then y_t.

  Token-level `[B, S]` (entry s describes token s): `tokens` int32 (pad id after the end),
  `attention_mask` int32, `turn_ids` int32 (k >= 1 on turn k's response tokens, else 0),
  `behaviour_logprobs` float32 (log pi_old of token s given the context the sampler used; 0
  off response tokens and on intervened turns), and the packing: `positions` int32 (RoPE
  positions; a segment's restart after P), `segments` int32 (0 on the shared prefix and
  padding, t on turn t's own segment) and `reach` int32 (the row-start tokens a token may read
  outside its own segment: S on segment 0, len(P) on a turn's segment), which
  `models.packed_allowed` turns into the attention mask. Per turn `[B, T]`, column t-1 is
  turn t, T = the turn limit: `response_lengths` int32, `valid`, `repeated`, `intervened`,
  `truncated` bool. Per episode `[B]`: `num_turns` int32, `won` bool, `failed` bool (an env
  error; the reason is in `episodes[b].error`).
  """

  tokens: np.ndarray
  attention_mask: np.ndarray
  turn_ids: np.ndarray
  behaviour_logprobs: np.ndarray
  positions: np.ndarray
  segments: np.ndarray
  reach: np.ndarray
  response_lengths: np.ndarray
  valid: np.ndarray
  repeated: np.ndarray
  intervened: np.ndarray
  truncated: np.ndarray
  num_turns: np.ndarray
  won: np.ndarray
  failed: np.ndarray
  episodes: list[Episode]
  stats: RolloutStats = dataclasses.field(default_factory=RolloutStats)

  def arrays(self) -> dict[str, np.ndarray]:
    """The numpy arrays by name (what the teacher, the loss and the update consume)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)}


def _row_pieces(episode: Episode, b: int) -> list[tuple[int, list[int], int, np.ndarray | None]]:
  """Episode b's row as (segment, token ids, turn id, log-probs or None) pieces, in order.

  Segment 0 is the transcript while each turn's context was its prefix; a `truncated` turn t
  gets segment t: its `window_tokens`, then its response.
  """
  pieces: list[tuple[int, list[int], int, np.ndarray | None]] = [(0, list(episode.prompt_tokens), 0, None)]
  shared = True
  for t, turn in enumerate(episode.turns, start=1):
    if len(turn.response_logprobs) != len(turn.response_tokens):
      raise ValueError(f"episodes[{b}].turns[{t - 1}]: {len(turn.response_logprobs)} log-probs for "
                       f"{len(turn.response_tokens)} response tokens.")
    if turn.truncated:
      if not turn.window_tokens:
        raise ValueError(f"episodes[{b}].turns[{t - 1}] is truncated but has no window_tokens: its response "
                         "would be read after P alone, not in the context it was sampled under.")
      shared = False
      pieces += [(t, list(turn.window_tokens), 0, None), (t, list(turn.response_tokens), t, turn.response_logprobs)]
      continue
    if not shared:
      raise ValueError(f"episodes[{b}].turns[{t - 1}] is not truncated but an earlier turn is: a history window "
                       "only ever drops more turns.")
    if t > 1:
      pieces.append((0, list(episode.turns[t - 2].next_tokens), 0, None))
    pieces.append((0, list(turn.response_tokens), t, turn.response_logprobs))
  return pieces


def row_length(episode: Episode) -> int:
  """The tokens of the episode's packed row (`assemble_batch`): what the teacher and the loss score."""
  return sum(len(ids) for _, ids, _, _ in _row_pieces(episode, 0))


def assemble_batch(episodes: Sequence[Episode], max_turns: int, pad_id: int,
                   seq_len: int | None = None) -> RolloutBatch:
  """Packs the episodes into the `RolloutBatch` arrays, each token in its sampling context (pure host code).

  Row b holds P, then per turn t: if its context was the transcript's prefix (no turn dropped
  yet), n_{t-1} (t > 1) and y_t, continuing the transcript; else its own segment, holding its
  `window_tokens` (context-only) and y_t, at positions that restart after P and reading only P
  and itself. Without a history window every turn continues the transcript, and the row is
  `P + y_1 + n_1 + ... + y_T` with `positions` = arange, one segment.

  Args:
    episodes: row b is episodes[b].
    max_turns: T, the per-turn arrays' width.
    pad_id: fills `tokens` past each row's end.
    seq_len: S; None picks `sampling.bucket_length` of the longest row (a handful of shapes per
      run for the jitted consumers).

  Returns:
    The batch, with `episodes` as given and empty stats.
  """
  num = len(episodes)
  rows = []
  for b, episode in enumerate(episodes):
    if len(episode.turns) > max_turns:
      raise ValueError(f"episodes[{b}] has {len(episode.turns)} turns, more than max_turns={max_turns}.")
    row = _row_pieces(episode, b)
    if not episode.turns and seq_len is not None:
      # The budget ended it before its first turn (a first prompt longer than the budget): nothing
      # of its row is trained, scored for the loss or judged, so the prompt's first seq_len tokens stand in.
      row = [(0, row[0][1][:seq_len], 0, None)]
    rows.append(row)
  longest = max([sum(len(ids) for _, ids, _, _ in row) for row in rows] + [1])
  if seq_len is None:
    seq_len = sampling.bucket_length(longest)
  elif longest > seq_len:
    raise ValueError(f"seq_len={seq_len} is shorter than the longest row ({longest} tokens).")

  tokens = np.full((num, seq_len), pad_id, np.int32)
  attention_mask = np.zeros((num, seq_len), np.int32)
  turn_ids = np.zeros((num, seq_len), np.int32)
  logprobs = np.zeros((num, seq_len), np.float32)
  positions = np.tile(np.arange(seq_len, dtype=np.int32), (num, 1))
  segments = np.zeros((num, seq_len), np.int32)
  reach = np.full((num, seq_len), seq_len, np.int32)
  per_turn = {name: np.zeros((num, max_turns), bool)
              for name in ("valid", "repeated", "intervened", "truncated")}
  response_lengths = np.zeros((num, max_turns), np.int32)
  for b, row in enumerate(rows):
    prompt = len(episodes[b].prompt_tokens)
    s = 0
    for segment, ids, turn_id, lps in row:
      span = slice(s, s + len(ids))
      tokens[b, span], attention_mask[b, span], turn_ids[b, span] = ids, 1, turn_id
      if lps is not None:
        logprobs[b, span] = lps
      if segment:
        # A turn's segment follows P wherever it sits in the row: its positions continue P's.
        start = prompt if segments[b, s - 1] != segment else positions[b, s - 1] + 1
        positions[b, span] = start + np.arange(len(ids))
        segments[b, span], reach[b, span] = segment, prompt
      s += len(ids)
    for t, turn in enumerate(episodes[b].turns):
      response_lengths[b, t] = len(turn.response_tokens)
      for name, array in per_turn.items():
        array[b, t] = getattr(turn, name)
  return RolloutBatch(
      tokens=tokens, attention_mask=attention_mask, turn_ids=turn_ids,
      behaviour_logprobs=logprobs, positions=positions, segments=segments, reach=reach,
      response_lengths=response_lengths, **per_turn,
      num_turns=np.asarray([len(e.turns) for e in episodes], np.int32).reshape(num),
      won=np.asarray([e.won for e in episodes], bool).reshape(num),
      failed=np.asarray([e.error is not None for e in episodes], bool).reshape(num),
      episodes=list(episodes))


# ----------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How episodes are played (from config.env / config.sampling).

  Attributes:
    max_turns: the turn limit T (config.env.max_turns).
    history_turns: k, past turns kept in the context (config.env.history_turns); None keeps
      the whole history. 0 keeps only P and the current observation.
    constrained: restrict each action to the env's admissible ones (config.sampling.constrained)
      through the sampler's token trie: the allowed strings are `<action>a</action>` (decoding
      constrained from the first token) or, when the sampling config has a
      `constraint_trigger`, the rest after it: `a</action>` after an `<action>` token, Qwen3's
      `\n\n<action>a</action>` after `</think>` (`action_head`).
    show_admissible: list the admissible actions with each observation in the prompt.
    pipeline_groups: groups of the env/model pipeline; 1 is fully sequential.
    max_context_tokens: an episode whose packed row (`row_length`: its transcript, plus a
      segment per turn past the window) or context plus one more response could exceed this
      ends before that turn (`Episode.budget_ended`; a loss like the turn limit, not a
      failure), so every row fits a static `seq_len` of this size; None uses the model's
      max_position_embeddings.
    system_prompt: the chat's system message.
    enable_thinking: passed to the chat template (`prompts.ChatLayout`; config.sampling.
      enable_thinking); None leaves the template's default. Fixed when the engine is built.
    min_cache_len: the smallest KV-cache length bucket.
    min_chunk_len: the smallest prefill chunk width bucket (`sampling.EpisodeCache`'s `min_chunk`).
    min_trie_shape: the smallest constraint trie shape (`sampling.EpisodeCache`'s).
    progress: show a tqdm bar (episodes finished).
    expert: optional "module:Class" of a shadow expert run beside each env in its worker
      (e.g. "sage_opd_jax.envs.alfworld_expert:ImitableExpert", which needs the env built
      with facts=True); it fills `Turn.expert_action` for oracle labels (analysis only).
  """

  max_turns: int
  history_turns: int | None = None
  constrained: bool = False
  show_admissible: bool = True
  pipeline_groups: int = 2
  max_context_tokens: int | None = None
  system_prompt: str = prompts.DEFAULT_SYSTEM_PROMPT
  enable_thinking: bool | None = None
  min_cache_len: int = 256
  min_chunk_len: int = 16
  min_trie_shape: tuple[int, int] = (1, 1)
  progress: bool = True
  expert: str | None = None

  def __post_init__(self):
    if self.max_turns < 1:
      raise ValueError(f"RolloutConfig.max_turns must be >= 1, got {self.max_turns}")
    if self.history_turns is not None and self.history_turns < 0:
      raise ValueError(f"RolloutConfig.history_turns must be >= 0 or None, got {self.history_turns}")
    if self.pipeline_groups < 1:
      raise ValueError(f"RolloutConfig.pipeline_groups must be >= 1, got {self.pipeline_groups}")


def default_sampling_config(tokenizer: Any, max_new_tokens: int, temperature: float = 1.0,
                            top_k: int = 0, top_p: float = 1.0, free_thought: bool = False,
                            max_thought_tokens: int = 0, enable_thinking: bool | None = None,
                            mask_unused_ids: bool = False) -> sampling.SamplingConfig:
  """Decoding settings for acting: stop at any end-of-turn token or right after `</action>`.

  Every end-of-turn token the tokenizer has ends a turn (`end_of_turn_ids`: Qwen3 ends with
  `<|im_end|>` or `<|endoftext|>`). `</action>` stops however the tokenizer spells it at the end
  of a turn: as its own tokens, or with its first token merged with the text before and its
  last with the text after (`action_close_pattern`); `prompts.parse_action` reads the first
  complete action, so text after it never counts.

  Args:
    free_thought: constrained decoding (`RolloutConfig.constrained`) starts after the thought,
      at a trigger the tokenizer spells as one token: `<action>` when it is one (the word-level
      tokenizer), else `</think>` (Qwen3, whose `<action>` merges with the text around it:
      `" <action>"` is `[366, 1311, 29]`); the allowed strings then start with what follows the
      trigger (`action_head`). A model that never emits the trigger plays no action. With
      `enable_thinking=False` there is no thought: constrained decoding starts at the first
      token. False constrains from the first token to `<action>a</action>`.
    max_thought_tokens: with `free_thought`, the thought budget: a constrained response still
      thinking after this many tokens (or with only room left for the trigger and its longest
      admissible action) is forced through the trigger into an admissible action; 0: no budget.
    enable_thinking: the chat template's thinking switch (`prompts.ChatLayout`).
    mask_unused_ids: never sample ids past the tokenizer's (`SamplingConfig.vocab_limit`).
  """
  if tokenizer.eos_token_id is None:
    raise ValueError("tokenizer has no eos_token_id; the sampler needs one to stop a turn.")
  trigger: tuple[int, ...] = ()
  if free_thought and enable_thinking is not False:
    for tag in (prompts.ACTION_OPEN, prompts.THINK_CLOSE):
      if prompts.has_single_token(tokenizer, tag):
        trigger = tuple(_encode(tokenizer, tag))
        break
    else:
      raise ValueError(f"free_thought needs a tokenizer that spells {prompts.ACTION_OPEN} or {prompts.THINK_CLOSE} as "
                       "one token: a trigger of several tokens misfires when BPE merges them with their neighbours.")
  close = tuple(_encode(tokenizer, prompts.ACTION_CLOSE))
  return sampling.SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      eos_ids=end_of_turn_ids(tokenizer), stop_sequences=(close,),
      stop_patterns=(action_close_pattern(tokenizer),) if len(close) > 1 else (),
      constraint_trigger=trigger, max_thought_tokens=max_thought_tokens if trigger else 0,
      vocab_limit=len(tokenizer) if mask_unused_ids else 0,
      pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0))


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
  """The tokenizer's EOS id, then the ids of Qwen's end-of-turn tokens it has (`prompts.END_OF_TURN_TOKENS`)."""
  ids = [int(tokenizer.eos_token_id)]
  for token in prompts.END_OF_TURN_TOKENS:
    if prompts.has_single_token(tokenizer, token):
      ids.append(int(_encode(tokenizer, token)[0]))
  return tuple(dict.fromkeys(ids))


def action_close_pattern(tokenizer: Any) -> tuple[tuple[int, ...], ...]:
  """Per position, the tokens that spell `</action>` at the end of a turn under BPE merges.

  Its first token may also be any token that ends with that token's text (Qwen: `.</` after a
  period), its last any token that starts with its text (`>\n` before a newline).
  """
  close = _encode(tokenizer, prompts.ACTION_CLOSE)
  vocab = tokenizer.get_vocab()
  pieces = tokenizer.convert_ids_to_tokens(close)
  first = [i for t, i in vocab.items() if t.endswith(pieces[0])]
  last = [i for t, i in vocab.items() if t.startswith(pieces[-1])]
  return (tuple(first), *((t,) for t in close[1:-1]), tuple(last))


def action_head(layout: prompts.ChatLayout, sampler: sampling.SamplingConfig) -> str:
  """The text an allowed action string starts with under `sampler`'s constraint trigger.

  No trigger: `<action>`; the `<action>` trigger: nothing; the `</think>` trigger: the rest of
  the layout's think close (Qwen3: "\n\n"), then `<action>`.
  """
  if not sampler.constraint_trigger:
    return prompts.ACTION_OPEN
  trigger = _decode(layout.tokenizer, sampler.constraint_trigger)
  if trigger == prompts.ACTION_OPEN:
    return ""
  if trigger == prompts.THINK_CLOSE:
    return layout.think_close.split(prompts.THINK_CLOSE, 1)[-1] + prompts.ACTION_OPEN
  raise ValueError(f"constraint_trigger {trigger!r} is neither {prompts.ACTION_OPEN} nor {prompts.THINK_CLOSE}.")


def episode_keys(rng: jax.Array, episode_ids: Sequence[int], turn: int) -> np.ndarray:
  """[E, 2] uint32: each episode's key of turn `turn`, `fold_in(fold_in(rng, id), turn)`."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, i), turn))(
      np.asarray(episode_ids, np.uint32))
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.key_data(keys)
  return np.asarray(keys)


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
  return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------
# Env requests: one batched call per worker and lockstep round.


class _EnvDispatcher:
  """Routes episode resets/steps to the pool; episode e lives in worker e % W."""

  def __init__(self, pool: pool_lib.EnvPool, env_name: str, env_kwargs: Mapping[str, Any],
               run_id: int, expert: str | None = None):
    self._pool = pool
    self._expert = expert
    self._env_name = env_name
    self._env_kwargs = dict(env_kwargs)
    self._run_id = run_id
    self._queue: list[list[list[tuple[int, str, Any]]]] = [[] for _ in range(pool.num_workers)]
    self._inflight: dict[int, list[int]] = {}
    self._results: dict[int, base.StepResult] = {}
    self.busy_s = 0.0
    self.wait_s = 0.0

  def request(self, items: Sequence[tuple[int, str, Any]]) -> None:
    """Queues (episode, op, arg) requests: one call per worker, after its earlier calls."""
    workers = self._pool.num_workers
    for w in range(workers):
      mine = [item for item in items if item[0] % workers == w]
      if mine:
        self._queue[w].append(mine)
    self._pump()

  def _pump(self) -> None:
    workers = self._pool.num_workers
    for w in range(workers):
      if w in self._inflight or not self._queue[w]:
        continue
      items = self._queue[w].pop(0)
      requests = [(e // workers, (self._run_id, e), op, arg) for e, op, arg in items]
      timeout = None if self._pool.timeout_s is None else self._pool.timeout_s * len(items)
      self._pool.submit(w, "call", (multi_env.run_requests, dict(
          env_name=self._env_name, env_kwargs=self._env_kwargs, requests=requests,
          expert=self._expert)),
                        timeout_s=timeout)
      self._inflight[w] = [e for e, _, _ in items]

  def wait(self, episodes: Sequence[int]) -> dict[int, base.StepResult]:
    """Blocks until every episode in `episodes` has its result; returns them."""
    start = time.perf_counter()
    while not all(e in self._results for e in episodes):
      if not self._inflight:
        raise RuntimeError(f"episodes {sorted(set(episodes) - set(self._results))} wait for env "
                           "results but nothing is in flight (an episode was never submitted).")
      for w, value in self._pool.poll(wait_s=None):
        owners = self._inflight.pop(w)
        if isinstance(value, pool_lib.WorkerError):
          for e in owners:
            self._results[e] = pool_lib.failed_step(f"{value.kind}: {value.message}")
        else:
          results, busy = value
          self.busy_s += busy
          for e, result in zip(owners, results):
            self._results[e] = result
      self._pump()
    self.wait_s += time.perf_counter() - start
    return {e: self._results.pop(e) for e in episodes}


# ----------------------------------------------------------------------------------------------
# The engine.


class RolloutEngine:
  """Plays B episodes of an env with a model, in lockstep, into a `RolloutBatch`.

  Owns the env worker pool (build it once per run, close it at the end):

    with RolloutEngine(tokenizer, RolloutConfig(max_turns=30, history_turns=2),
                       default_sampling_config(tokenizer, 64), env_name="alfworld",
                       env_kwargs={"data_dir": d}, num_workers=2, timeout_s=60) as engine:
      batch = engine.run(model, tasks, jax.random.key(0))
  """

  def __init__(
      self,
      tokenizer: Any,
      config: RolloutConfig,
      sampling_config: sampling.SamplingConfig,
      *,
      env_name: str,
      env_kwargs: Mapping[str, Any] | None = None,
      num_workers: int = 1,
      timeout_s: float | None = None,
      imports: Sequence[str] = (),
      cache_kwargs: Mapping[str, Any] | None = None,
  ):
    """Starts the env workers.

    Args:
      tokenizer: the student's tokenizer (a chat template, `encode`/`decode`, eos and pad ids).
      config: the rollout settings.
      sampling_config: decoding settings (see `default_sampling_config`).
      env_name: registered env name (`envs.make`).
      env_kwargs: the env's constructor arguments (picklable).
      num_workers: env worker processes (config.env.num_workers); may be fewer than B.
      timeout_s: hard limit of one env reset/step (config.env.step_timeout_s).
      imports: modules each worker imports first (an env registered outside `envs`).
      cache_kwargs: extra `sampling.EpisodeCache` arguments (min_batch, batch_sharding, ...); its
        length, chunk and trie-shape buckets are `config`'s (min_cache_len, min_chunk_len, min_trie_shape).
    """
    bucketed = sorted({"min_len", "min_chunk", "min_trie_shape"} & set(cache_kwargs or {}))
    if bucketed:
      raise ValueError(f"RolloutEngine: cache_kwargs {bucketed} are set by the RolloutConfig "
                       "(min_cache_len, min_chunk_len, min_trie_shape), not here.")
    self.tokenizer = tokenizer
    self.config = config
    self.sampling_config = sampling_config
    self.layout = prompts.ChatLayout.from_tokenizer(tokenizer, config.enable_thinking)
    self._env_name = env_name
    self._env_kwargs = dict(env_kwargs or {})
    self._cache_kwargs = dict(cache_kwargs or {})
    self._runs = itertools.count()
    self._pad_id = sampling_config.pad_id
    self.pool = pool_lib.EnvPool(env_name, self._env_kwargs, num_workers=num_workers,
                                 timeout_s=timeout_s, imports=imports)

  @property
  def env_name(self) -> str:
    return self._env_name

  @property
  def env_kwargs(self) -> dict[str, Any]:
    """The env constructor arguments every hosted env is built with (a copy)."""
    return dict(self._env_kwargs)

  def close(self) -> None:
    self.pool.close()

  def __enter__(self) -> RolloutEngine:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # --- prompt pieces --------------------------------------------------------------------------

  def _next_tokens(self, cfg: RolloutConfig, observation: str, admissible: Sequence[str],
                   response_end: str) -> list[int]:
    text = prompts.next_turn_text(self.layout, observation,
                                  list(admissible) if cfg.show_admissible else None,
                                  response_end=response_end)
    return _encode(self.tokenizer, text)

  def _cache_args(self, cfg: RolloutConfig) -> dict[str, Any]:
    """`sampling.EpisodeCache`'s arguments: `cfg`'s shape buckets and the engine's `cache_kwargs`."""
    return dict(min_len=cfg.min_cache_len, min_chunk=cfg.min_chunk_len, min_trie_shape=cfg.min_trie_shape,
                **self._cache_kwargs)

  def _action(self, sampler: sampling.SamplingConfig, response_tokens: Sequence[int]) -> str | None:
    """The response's command, read without its final end-of-turn token: a model that stops right after
    `<action>go to desk 1` would otherwise play "go to desk 1<|im_end|>", and one that stops right after
    `<action>` would play the token's text."""
    ids = list(response_tokens)
    if ids and ids[-1] in sampler.eos_ids:
      ids = ids[:-1]
    return prompts.parse_action(_decode(self.tokenizer, ids))

  def _response_end(self, sampler: sampling.SamplingConfig, response_tokens: Sequence[int]
                    ) -> str:
    """The end-of-turn text the response already holds (its final EOS token), else "".

    An end token that is not how the template ends an assistant message (Qwen's `<|endoftext|>`)
    stays in the response, and the template's own end follows it.
    """
    if response_tokens and response_tokens[-1] in sampler.eos_ids:
      text = _decode(self.tokenizer, response_tokens[-1:])
      if self.layout.after_assistant.startswith(text):
        return text
    return ""

  def _context(self, cfg: RolloutConfig, episode: Episode, observation: str,
               admissible: Sequence[str]) -> tuple[list[int], bool]:
    """Turn t's context tokens under the history window, and whether it dropped turns."""
    k = cfg.history_turns
    past = episode.turns
    if k is None or len(past) <= k:
      kept, truncated = past, False
    else:
      kept, truncated = past[len(past) - k:] if k else [], True
    context = list(episode.prompt_tokens)
    for turn in kept:
      context += turn.response_tokens + turn.next_tokens
    if truncated and not kept:  # k = 0: P, an empty assistant message, then o_t.
      context += self._next_tokens(cfg, observation, admissible, response_end="")
    return context, truncated

  def _allowed(self, sampler: sampling.SamplingConfig, admissible: Sequence[str]
               ) -> list[list[int]] | None:
    if not admissible:
      return None
    head = action_head(self.layout, sampler)
    return [_encode(self.tokenizer, f"{head}{a}{prompts.ACTION_CLOSE}")
            for a in dict.fromkeys(admissible)]

  def respond(self, model: nnx.Module, states: Sequence[TurnState], rng: jax.Array,
              sampling_config: sampling.SamplingConfig | None = None) -> list[list[int]]:
    """`model`'s response tokens at live turns, from the contexts the student's were sampled from.

    Decoded as the engine decodes the student (`sampling_config`, default the engine's, and
    constrained to each state's admissible actions when `config.constrained`), so that an
    `intervene` hook's replacement, or any other model's answer at the same state, is comparable.
    """
    sampler = sampling_config or self.sampling_config
    allowed = [self._allowed(sampler, s.admissible) for s in states] if self.config.constrained else None
    # The rollout's buckets, so that a replacement decode compiles the shapes a rollout does.
    out = sampling.sample(model, [list(s.context) for s in states], rng, sampler, allowed=allowed,
                          **self._cache_args(self.config))
    return [out.tokens[i, : out.lengths[i]].tolist() for i in range(len(states))]

  # --- the loop -------------------------------------------------------------------------------

  def run(
      self,
      model: nnx.Module,
      tasks: Sequence[base.Task],
      rng: jax.Array,
      *,
      intervene: Intervene | None = None,
      seq_len: int | None = None,
      config: RolloutConfig | None = None,
      sampling_config: sampling.SamplingConfig | None = None,
      episode_ids: Sequence[int] | None = None,
  ) -> RolloutBatch:
    """Plays one episode per task with `model` and returns the batch.

    Args:
      model: the student `models.Transformer` (read only).
      tasks: B tasks; row b of the batch plays tasks[b].
      rng: a `jax.random` key; the same key and tasks give the same batch.
      intervene: optional `opd_two_rollout` hook (see the module docstring).
      seq_len: pad the batch to this S (default: a bucket of the longest transcript).
      config: overrides the engine's rollout settings for this call (e.g. eval's turn limit).
      sampling_config: overrides its decoding settings (e.g. greedy eval); same pad id.
      episode_ids: the episodes' indices in the global batch, which key their random draws
        (default 0..B-1): a process playing its share of a batch passes the global ones.

    Returns:
      The `RolloutBatch`, with timings in `stats`.
    """
    start = time.perf_counter()
    num = len(tasks)
    if num < 1:
      raise ValueError("tasks is empty; a rollout needs >= 1 task.")
    cfg = config or self.config
    sampler = sampling_config or self.sampling_config
    episode_ids = list(range(num)) if episode_ids is None else [int(i) for i in episode_ids]
    if len(episode_ids) != num:
      raise ValueError(f"episode_ids has {len(episode_ids)} entries for {num} tasks.")
    if sampler.pad_id != self._pad_id:
      raise ValueError(f"sampling_config.pad_id={sampler.pad_id} differs from the engine's {self._pad_id}.")
    budget = cfg.max_context_tokens or model.config.max_position_embeddings
    groups = min(cfg.pipeline_groups, num)
    members = [[e for e in range(num) if e * groups // num == g] for g in range(groups)]
    caches = [sampling.EpisodeCache(model, len(m), **self._cache_args(cfg)) for m in members]
    episodes = [Episode(task=task) for task in tasks]
    # e -> (o_t, admissible, expert action, its search's alternatives) of a live episode.
    current: dict[int, tuple[str, list[str], str | None, tuple[str, ...]]] = {}
    stats = RolloutStats()
    dispatcher = _EnvDispatcher(self.pool, self._env_name, self._env_kwargs, next(self._runs),
                                expert=cfg.expert)
    bar = tqdm.tqdm(total=num, desc="rollout", unit="ep", disable=not cfg.progress, leave=False)

    def finish(e: int, error: str | None = None) -> None:
      episodes[e].finished = True
      if error is not None and episodes[e].error is None:
        episodes[e].error = error
      bar.update(1)

    def live_state(result: base.StepResult, admissible: list[str]
                   ) -> tuple[str, list[str], str | None, tuple[str, ...]]:
      """A live episode's entry of `current`: o_t, its admissible actions, the expert's action and search."""
      return (result.observation, admissible, result.info.extra.get("expert_action"),
              tuple(result.info.extra.get("expert_search", ())))

    def absorb(e: int, result: base.StepResult) -> None:
      episode = episodes[e]
      if not episode.turns:  # A reset.
        if result.done:
          finish(e, result.info.error or "the reset ended the episode")
          return
        episode.task_text = result.info.task
        admissible = list(result.info.admissible_actions)
        episode.prompt_tokens = _encode(self.tokenizer, prompts.episode_start_text(
            self.layout, episode.task_text, result.observation,
            admissible if cfg.show_admissible else None, cfg.system_prompt))
        current[e] = live_state(result, admissible)
        return
      turn = episode.turns[-1]
      turn.feedback = result.observation
      turn.valid = turn.action is not None and bool(result.info.valid) and result.info.error is None
      turn.won = bool(result.info.won)
      episode.won = episode.won or turn.won
      turn.done = bool(result.done) or len(episode.turns) >= cfg.max_turns
      if turn.done:
        current.pop(e, None)
        finish(e, result.info.error)
        return
      admissible = list(result.info.admissible_actions)
      turn.next_tokens = self._next_tokens(cfg, result.observation, admissible, turn.response_end)
      current[e] = live_state(result, admissible)

    for g in range(groups):
      dispatcher.request([(e, "reset", tasks[e]) for e in members[g]])
    pending = [list(m) for m in members]
    turn_of = [0] * groups
    while any(pending):
      for g in range(groups):
        if not pending[g]:
          continue
        for e, result in sorted(dispatcher.wait(pending[g]).items()):
          absorb(e, result)
        pending[g] = []
        contexts: list[list[int] | None] = [None] * len(members[g])
        allowed: list[Any] = [None] * len(members[g])
        truncated: dict[int, bool] = {}
        for i, e in enumerate(members[g]):
          if episodes[e].finished:
            continue
          observation, admissible = current[e][:2]
          context, truncated[e] = self._context(cfg, episodes[e], observation, admissible)
          # The packed row before this turn's response: a turn in the window continues the
          # transcript (n_{t-1}); one past it adds its own segment (its context after P).
          row = row_length(episodes[e]) + (len(context) - len(episodes[e].prompt_tokens) if truncated[e]
                                           else len(episodes[e].turns[-1].next_tokens) if episodes[e].turns else 0)
          if max(len(context), row) + sampler.max_new_tokens + 1 > budget:
            current.pop(e)
            episodes[e].budget_ended = True
            if episodes[e].turns:
              episodes[e].turns[-1].done = True
            finish(e)
            continue
          contexts[i] = context
          if cfg.constrained:
            allowed[i] = self._allowed(sampler, admissible)
        live = [e for i, e in enumerate(members[g]) if contexts[i] is not None]
        if not live:
          continue
        turn_of[g] += 1
        keys = episode_keys(rng, [episode_ids[e] for e in members[g]], turn_of[g])
        tick = time.perf_counter()
        out = caches[g].generate(contexts, keys, sampler,
                                 allowed=allowed if cfg.constrained else None)
        stats.model_s += time.perf_counter() - tick
        stats.generate_calls += 1

        new_turns: dict[int, Turn] = {}
        for i, e in enumerate(members[g]):
          if contexts[i] is None:
            continue
          n = int(out.lengths[i])
          ids = out.tokens[i, :n].tolist()
          observation, admissible, expert_action, expert_search = current[e]
          text = _decode(self.tokenizer, ids)
          new_turns[e] = Turn(observation=observation, admissible=admissible, response=text,
                              expert_action=expert_action, expert_search=expert_search,
                              response_tokens=ids, response_end=self._response_end(sampler, ids),
                              response_logprobs=np.asarray(out.logprobs[i, :n], np.float32),
                              action=self._action(sampler, ids), truncated=truncated[e],
                              window_tokens=contexts[i][len(episodes[e].prompt_tokens):] if truncated[e] else [])
        if intervene is not None:
          self._apply_intervention(intervene, sampler, episodes, new_turns, {
              e: contexts[i] for i, e in enumerate(members[g]) if contexts[i] is not None})
        for e in live:
          turn = new_turns[e]
          previous = episodes[e].turns[-1] if episodes[e].turns else None
          turn.repeated = (turn.action is not None and previous is not None
                           and previous.action == turn.action)
          episodes[e].turns.append(turn)
          stats.turns += 1
        dispatcher.request([(e, "step", new_turns[e].action) for e in live])
        pending[g] = live
        bar.set_postfix(turn=max(turn_of), live=len(current), won=sum(ep.won for ep in episodes))
    bar.close()

    batch = assemble_batch(episodes, cfg.max_turns, self._pad_id, seq_len=seq_len)
    stats.env_wait_s, stats.env_busy_s = dispatcher.wait_s, dispatcher.busy_s
    stats.wall_s = time.perf_counter() - start
    batch.stats = stats
    return batch

  def _apply_intervention(self, intervene: Intervene, sampler: sampling.SamplingConfig,
                          episodes: Sequence[Episode], new_turns: dict[int, Turn],
                          contexts: Mapping[int, Sequence[int]]) -> None:
    states = [TurnState(episode=e, turn=len(episodes[e].turns) + 1, task=episodes[e].task,
                        task_text=episodes[e].task_text, history=tuple(episodes[e].turns),
                        observation=turn.observation, admissible=tuple(turn.admissible),
                        response=turn.response, action=turn.action, context=tuple(contexts[e]),
                        response_tokens=tuple(turn.response_tokens), response_end=turn.response_end,
                        expert_action=turn.expert_action)
              for e, turn in sorted(new_turns.items())]
    for e, replacement in dict(intervene(states)).items():
      if e not in new_turns:
        raise ValueError(f"intervene returned episode {e}, which is not live this turn "
                         f"(live: {sorted(new_turns)}).")
      ids = (_encode(self.tokenizer, replacement) if isinstance(replacement, str)
             else [int(t) for t in replacement])
      if not ids:
        raise ValueError(f"intervene returned an empty response for episode {e}.")
      turn = new_turns[e]
      turn.response_tokens = ids
      turn.response_end = self._response_end(sampler, ids)
      turn.response_logprobs = np.zeros((len(ids),), np.float32)
      turn.response = _decode(self.tokenizer, ids)
      turn.action = self._action(sampler, ids)
      turn.intervened = True
