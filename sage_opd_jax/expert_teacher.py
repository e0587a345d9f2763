"""The expert teacher: a teacher built from the environment's expert, with its reliability as a knob.

A controlled study (configs/alfworld_control.py), not the paper's method: the teacher is not a
model but the env's shadow expert (`EnvSpec.expert`, which names its action a* at every state
the student reaches) turned into a distribution over the turn's admissible actions:

  nu(a) = 1 - eps on the peak action, eps / (n - 1) on each of the n - 1 others,

with eps = `eps_on` on turns where the student is still on the expert's path (every earlier
action was the expert's) and `eps_off` after it left it. The peak is a*, except that on an
off-path turn, with probability `eta`, it sits on one fixed wrong admissible action instead
(misdirection). Both the draw and the wrong action are a hash of (`seed`, task, turn, the
state's admissible actions, a*), so reruns, methods and seeds meet the same teacher, and the
turns misdirected at one eta are among those misdirected at any larger eta.

With `search="spread"` (our choice) a turn where the expert's `go to` is a step of its search for
something it has not seen (the env's `expert_search`: every receptacle its search could equally visit
next) spreads the 1 - eps evenly over those k go-tos and eps over the n - k others: the expert does not
know which receptacle holds the object, and the one its fixed order names is no better than the rest.
With `eps_over="verbs"` (our choice) eps goes evenly to the off-peak actions' verbs, then evenly to each
verb's actions, so every wrong verb gets the same mass: a take or put (one action) as much as `go to` (~30).

The token-level statistics that the loss reads (`teacher.STAT_KEYS`) follow exactly from nu
through the admissible-action trie: P(x | prefix) = nu(actions whose tokens continue prefix + x)
/ nu(actions whose tokens continue prefix); a forced token (one continuation) has probability 1.
With free thought the response starts with the expert's own thought up to the trigger: its
demonstrations' (`sft_data.expert_response(a, thought)`: `<think></think><action>` under the
word-level tokenizer, or with `thoughts="subgoal"` the subgoal they think at the student's state,
`<think>find mug</think><action>`). There nu is a law over the whole vocabulary (`ThoughtLaw`):
1 - 1e-3 on the expert's next token, the rest evenly over the others; the student's first token off
that format (a word the expert does not think) is one of those others, after which the expert
closes its thought (`format_token_stats`), and the action after the trigger is scored through the
trie all the same.

Host side (numpy), like the judge: it runs between the rollout and the update.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from sage_opd_jax import judge as judge_lib
from sage_opd_jax.config import EPS_OVER, SEARCH_BELIEFS
from sage_opd_jax import losses
from sage_opd_jax import prompts
from sage_opd_jax import rollout as rollout_lib
from sage_opd_jax import sampling
from sage_opd_jax import sft_data
from sage_opd_jax import teacher as teacher_lib

_log = logging.getLogger(__name__)

KIND = "expert"  # config.teacher.kind of this teacher ("model": a trained teacher).
# The probability of an action token outside the expert's support (one that eps = 0 ruled out): finite, so the
# loss stays finite, and far below any action's.
OUTSIDE_PROB = 1e-4
OUTSIDE_LOGPROB = math.log(OUTSIDE_PROB)
# At a free-thought position nu is a distribution over the whole vocabulary (`ThoughtLaw`): 1 - THOUGHT_OFF_MASS on
# the expert's next token, THOUGHT_OFF_MASS spread evenly over the other V - 1.
THOUGHT_OFF_MASS = 1e-3


@dataclasses.dataclass(frozen=True)
class ThoughtLaw:
  """nu at a free-thought position, over a vocabulary of `vocab_size` tokens: 1 - `off_mass` on its target token
  (the expert's next token), `off_mass` / (V - 1) on each other one.

  (our choice) A law that sums to 1 over the student's vocabulary, because the sampled reverse KL's minimiser
  at a position is the student's pi proportional to nu there: a floor of its own on every other token (1e-4
  each, say) would give them (V - 1) 1e-4 together, 12% of the mass at V = 1,344 and 94% at Qwen3's 151,936,
  which OPD would then teach the student to put on tokens the expert never writes.
  """

  vocab_size: int
  off_mass: float = THOUGHT_OFF_MASS

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f"ThoughtLaw.vocab_size={self.vocab_size!r}: a thought needs at least 2 tokens.")
    if not 0.0 < self.off_mass < 1.0:
      raise ValueError(f"ThoughtLaw.off_mass={self.off_mass!r}: must lie in (0, 1).")

  @property
  def target_logprob(self) -> float:
    return math.log1p(-self.off_mass)

  @property
  def other_logprob(self) -> float:
    return math.log(self.off_mass / (self.vocab_size - 1))

  @property
  def top1(self) -> float:
    return 1.0 - self.off_mass

  @property
  def entropy(self) -> float:
    return -(self.top1 * self.target_logprob + self.off_mass * self.other_logprob)


@dataclasses.dataclass(frozen=True)
class ExpertTeacherConfig:
  """The reliability knob (`config.teacher.expert`).

  Attributes:
    eps_on: mass off the peak on turns where the student is on the expert's path.
    eps_off: mass off the peak on turns after the student left it.
    eta: probability that an off-path turn's peak is a fixed wrong admissible action.
    seed: seeds the misdirection draws and the wrong actions.
    search: "peak" (nu peaks on a* everywhere) or "spread" (on a search step, 1 - eps spread evenly over the
      expert's equally good search candidates, `Turn.expert_search`).
    eps_over: "actions" (eps evenly over the other admissible actions) or "verbs" (evenly over their verbs,
      then evenly over each verb's actions).
  """

  eps_on: float = 0.05
  eps_off: float = 0.05
  eta: float = 0.0
  seed: int = 0
  search: str = "peak"
  eps_over: str = "actions"

  def __post_init__(self):
    for name in ("eps_on", "eps_off"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"ExpertTeacherConfig.{name}={getattr(self, name)!r}: must lie in [0, 1).")
    if not 0.0 <= self.eta <= 1.0:
      raise ValueError(f"ExpertTeacherConfig.eta={self.eta!r}: must lie in [0, 1].")
    if self.search not in SEARCH_BELIEFS:
      raise ValueError(f"ExpertTeacherConfig.search={self.search!r}: must be one of {SEARCH_BELIEFS}.")
    if self.eps_over not in EPS_OVER:
      raise ValueError(f"ExpertTeacherConfig.eps_over={self.eps_over!r}: must be one of {EPS_OVER}.")

  @classmethod
  def from_config(cls, expert: Mapping[str, Any]) -> ExpertTeacherConfig:
    return cls(eps_on=float(expert["eps_on"]), eps_off=float(expert["eps_off"]), eta=float(expert["eta"]),
               seed=int(expert["seed"]), search=str(expert["search"]), eps_over=str(expert["eps_over"]))


@dataclasses.dataclass(frozen=True)
class TurnBelief:
  """The expert teacher's distribution at one turn.

  actions: the admissible actions, de-duplicated in the env's order (the sampler's trie's);
  probs: float64 nu over them; peak: the action it prefers (None when the turn has no expert
  action: then nu is uniform); on_path: every earlier action was the expert's; misdirected:
  the peak is the fixed wrong action, not the expert's; search: on a spread search turn, the
  admissible actions that share the peak's mass (a* among them), else (); thought: what the expert
  thinks before its peak (`ExpertTeacher`'s `thoughts`; "" for none).
  """

  actions: tuple[str, ...]
  probs: np.ndarray
  peak: str | None
  expert_action: str | None
  on_path: bool
  misdirected: bool
  search: tuple[str, ...] = ()
  thought: str = ""

  def prefers(self, action: str) -> bool:
    """`action` is what the teacher aims at: its peak, or any action sharing the peak's mass on a search turn."""
    return self.peak is not None and any(judge_lib.same_action(action, a) for a in (self.peak, *self.search))


def verb(action: str | None) -> str:
  """An action's verb, its first word ("go" for "go to desk 1"); "" for None or a blank action."""
  words = action.split() if action else []
  return words[0] if words else ""


def _unit(*parts: Any) -> float:
  """A uniform draw in [0, 1) fixed by `parts` (SHA-256: stable across processes and Python runs)."""
  digest = hashlib.sha256(repr(parts).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def action_probs(num_actions: int, peak: int | Sequence[int] | None, eps: float,
                 groups: Sequence[Any] | None = None) -> np.ndarray:
  """nu over `num_actions` actions: 1 - eps spread evenly over `peak` (one index or several), eps over the
  rest: evenly, or with `groups` (a key per action, e.g. its verb) evenly over the rest's groups and then
  evenly within each; uniform if `peak` is None or covers every action."""
  if peak is None:
    return np.full(num_actions, 1.0 / num_actions)
  peaks = sorted({peak} if isinstance(peak, (int, np.integer)) else set(peak))
  if len(peaks) == num_actions:
    return np.full(num_actions, 1.0 / num_actions)
  rest = [i for i in range(num_actions) if i not in peaks]
  keys = [0] * num_actions if groups is None else list(groups)
  size = collections.Counter(keys[i] for i in rest)
  probs = np.zeros(num_actions)
  for i in rest:
    probs[i] = eps / len(size) / size[keys[i]]
  probs[peaks] = (1.0 - eps) / len(peaks)
  return probs


def episode_beliefs(task_id: str, turns: Sequence[Any], config: ExpertTeacherConfig) -> list[TurnBelief]:
  """The teacher's `TurnBelief` at each turn of one episode (turns carry action, admissible, expert_action)."""
  beliefs, on_path = [], True
  for t, turn in enumerate(turns):
    actions = tuple(dict.fromkeys(turn.admissible))
    expert = turn.expert_action
    star = None if expert is None else next(
        (i for i, a in enumerate(actions) if judge_lib.same_action(a, expert)), None)
    peak, misdirected = star, False
    if star is not None and not on_path and len(actions) > 1:
      state = (config.seed, task_id, t, sorted(actions), actions[star])
      if _unit("misdirect", *state) < config.eta:
        wrong = sorted(i for i in range(len(actions)) if i != star)
        peak, misdirected = wrong[int(_unit("wrong", *state) * len(wrong))], True
    eps = config.eps_on if on_path else config.eps_off
    peaks = [] if peak is None else [peak]
    if config.search == "spread" and peak is not None and not misdirected:
      peaks = sorted({peak} | {i for i, a in enumerate(actions)
                               if any(judge_lib.same_action(a, c) for c in turn.expert_search)})
    groups = [verb(a) for a in actions] if config.eps_over == "verbs" else None
    beliefs.append(TurnBelief(actions=actions, probs=action_probs(len(actions), peaks or None, eps, groups),
                              peak=None if peak is None else actions[peak], expert_action=expert,
                              on_path=on_path, misdirected=misdirected,
                              search=tuple(actions[i] for i in peaks if len(peaks) > 1)))
    on_path = on_path and expert is not None and turn.action is not None and judge_lib.same_action(turn.action, expert)
  return beliefs


def trie_conditionals(sequences: Sequence[Sequence[int]], probs: np.ndarray, tokens: Sequence[int]
                      ) -> list[dict[int, float]]:
  """Per token of `tokens`: P(. | earlier tokens) as {next id: probability} under the law of drawing sequence i
  with probability probs[i] (P(x | p) = mass of the sequences continuing p + x over the mass of those continuing
  p); {} once no sequence of positive mass continues the earlier tokens (left the support, or past an end)."""
  laws: list[dict[int, float]] = []
  alive = [i for i, seq in enumerate(sequences) if probs[i] > 0]
  for j, token in enumerate(tokens):
    children: dict[int, float] = {}
    for i in alive:
      if len(sequences[i]) > j:
        children[sequences[i][j]] = children.get(sequences[i][j], 0.0) + probs[i]
    total = sum(children.values())
    laws.append({x: m / total for x, m in children.items()} if total > 0 else {})
    alive = [i for i in alive if len(sequences[i]) > j and sequences[i][j] == token]
  return laws


def trie_token_stats(sequences: Sequence[Sequence[int]], probs: np.ndarray, tokens: Sequence[int]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per token of `tokens`: log P(token | earlier tokens), top-1 and entropy of P(. | earlier tokens)
  (`trie_conditionals`). A token outside the support (no sequence continues it, or only ones of zero
  mass) gets `OUTSIDE_LOGPROB`; from there on, and past the end of a complete sequence, no sequence is
  consistent, so every token gets `OUTSIDE_LOGPROB` with top-1 1 and entropy 0.
  """
  n = len(tokens)
  logp, top1, entropy = np.full(n, OUTSIDE_LOGPROB), np.ones(n), np.zeros(n)
  for j, (token, law) in enumerate(zip(tokens, trie_conditionals(sequences, probs, tokens))):
    if not law:
      break
    p = np.asarray(list(law.values()))
    top1[j] = p.max()
    entropy[j] = float(-(p * np.log(p)).sum())
    if token not in law:
      break
    logp[j] = max(math.log(law[token]), OUTSIDE_LOGPROB)
  return logp, top1, entropy


def format_token_stats(prefix: Sequence[int], close_at: int, tokens: Sequence[int], law: ThoughtLaw
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per token of `tokens` (a response's free part, through its trigger): log-prob, top-1 and entropy under
  the expert's format `prefix` (its thought, then the trigger), whose thought closes at `prefix[close_at]`.

  At every position nu is `law`: its target is the expert's next token. On the format that is the format's
  next token; the student's first token off it reads `law.other_logprob`: leaving the format is penalised.
  (our choice) From there on the expert closes its thought: the target is the closing token
  (`prefix[close_at]`, `</think>`, while the student has not passed it; else the format's next token,
  e.g. the trigger after words written past `</think>`). Once the student emits it the format is the target
  again (the rest of the close, then the trie after the trigger, scored as on the format). Why: with one
  floor on every token after the first word, nu is a constant over the rest of the thought, so reverse KL is
  lowest for a uniform thought and closing it costs log pi - log floor; a student trained so writes long
  near-uniform thoughts and never closes them. The expert itself would close its thought, and that is the
  target.
  """
  n = len(tokens)
  logp, top1, entropy = np.full(n, law.target_logprob), np.full(n, law.top1), np.full(n, law.entropy)
  matched, off_format = 0, False  # prefix[:matched] is the format the student has written so far.
  for j, token in enumerate(tokens):
    if off_format:
      close = max(matched, close_at)
      if close < len(prefix) and token == prefix[close]:
        matched, off_format = close + 1, False
      else:
        logp[j] = law.other_logprob
    elif matched < len(prefix) and token == prefix[matched]:
      matched += 1
    else:
      logp[j], off_format = law.other_logprob, True
  return logp, top1, entropy


def trie_support(sequences: Sequence[Sequence[int]], tokens: Sequence[int]) -> list[list[int]]:
  """Per token of `tokens`: the ids the trie of `sequences` allows there (what constrained decoding could
  emit after the earlier tokens), in first-seen order; [] once `tokens` left the trie or ran past its end."""
  support: list[list[int]] = []
  alive = list(range(len(sequences)))
  for j, token in enumerate(tokens):
    children = list(dict.fromkeys(sequences[i][j] for i in alive if len(sequences[i]) > j))
    support.append(children)
    alive = [i for i in alive if len(sequences[i]) > j and sequences[i][j] == token]
  return support


def support_array(supports: Sequence[Sequence[int]]) -> np.ndarray:
  """Per-token id lists -> [N, K] int32, -1 padded, K the next power of two of the widest (a few compiled shapes)."""
  width = max([len(ids) for ids in supports] + [1])
  out = np.full((len(supports), 1 << (width - 1).bit_length()), -1, np.int32)
  for n, ids in enumerate(supports):
    out[n, :len(ids)] = ids
  return out


class ExpertTeacher:
  """The env's expert as a teacher: `score` gives the `teacher.STAT_KEYS` a model teacher's scoring does.

  Args:
    config: the reliability knob.
    tokenizer: the shared tokenizer (the actions' token ids must be the sampler's).
    sampling_config: the rollout's decoding settings. With a `constraint_trigger` (free thought) the
      expert's response is its demonstrations' (`sft_data.expert_response` with its `thoughts`): the
      thought's tokens up to the trigger, then the trie's `head + a + </action>`; without one it
      is the trie's string alone (`<action>a</action>`).
    vocab_size: the teacher's V, the student's: what `neg_entropy` confidence normalises by, and what nu on a
      free-thought token spreads over (`ThoughtLaw`).
    enable_thinking: the chat template's thinking switch (`config.sampling.enable_thinking`).
    topk: `score` also gives nu over each token's decoding support (`teacher.TOPK_KEYS`), for the exact
      divergence (config.loss.estimator='full').
    thoughts: what the expert thinks before its action (`config.sft.thoughts`, the student's demos'):
      "none", or its demonstrations' subgoal at the student's state (`sft_data.expert_thoughts` over the
      student's actions so far, then the peak), so that its response is the demos' format. Needs free thought.
  """

  kind = KIND

  def __init__(self, config: ExpertTeacherConfig, tokenizer: Any, sampling_config: sampling.SamplingConfig,
               vocab_size: int, enable_thinking: bool | None = None, thoughts: str = "none", topk: bool = False):
    self.expert_config = config
    self.tokenizer = tokenizer
    self.vocab_size = int(vocab_size)
    self.thought_law = ThoughtLaw(self.vocab_size)  # nu at each free-thought position.
    self.thoughts = thoughts
    self.topk = topk
    self.layout = prompts.ChatLayout.from_tokenizer(tokenizer, enable_thinking)
    self.trigger = list(sampling_config.constraint_trigger)
    if thoughts != "none" and not self.trigger:
      raise ValueError(f"ExpertTeacher: thoughts={thoughts!r} needs free thought (a constraint trigger): the student "
                       "writes no thought under constrained decoding from its first token.")
    self.sampling_config = sampling_config
    self.head = rollout_lib.action_head(self.layout, sampling_config)  # As the rollout builds its trie.
    self._action_ids: dict[str, list[int]] = {}  # `action_tokens`' encodings, by action string.
    self._formats: dict[str, tuple[list[int], int]] = {}  # `response_format`'s, by thought.
    self.response_format("")  # Checks the layout once.

  def response_format(self, thought: str = "") -> tuple[list[int], int]:
    """(prefix, close_at): the forced tokens before the trie's string when the expert thinks `thought` (its
    thought, then the trigger; [] without free thought), and where the prefix closes the thought (its
    `</think>`, else its trigger)."""
    if thought not in self._formats:
      prefix, close_at = [], 0
      if self.trigger:
        suffix = f"{self.head}a{prompts.ACTION_CLOSE}"
        response = sft_data.expert_response("a", thought, self.layout)
        if not response.endswith(suffix):
          raise ValueError(f"ExpertTeacher: the expert's response {response!r} does not end with the trie's "
                           f"{suffix!r}.")
        prefix = _encode(self.tokenizer, response[: -len(suffix)])
        if prefix[-len(self.trigger):] != self.trigger:
          raise ValueError(f"ExpertTeacher: the expert's thought {response[: -len(suffix)]!r} does not end with the "
                           f"constraint trigger {self.trigger}.")
        think_close = _encode(self.tokenizer, prompts.THINK_CLOSE)
        closes = [i for i, token in enumerate(prefix) if [token] == think_close]
        close_at = closes[0] if closes else len(prefix) - len(self.trigger)
      self._formats[thought] = (prefix, close_at)
    prefix, close_at = self._formats[thought]
    return list(prefix), close_at

  def action_tokens(self, actions: Sequence[str]) -> list[list[int]]:
    """The token ids of each action's constrained string (what the sampler's trie holds).

    Encoded once per action string: `score` asks for every turn's admissible actions twice (its
    statistics and its support), and an env's actions recur across turns and episodes.
    """
    for a in actions:
      if a not in self._action_ids:
        self._action_ids[a] = _encode(self.tokenizer, f"{self.head}{a}{prompts.ACTION_CLOSE}")
    return [list(self._action_ids[a]) for a in actions]

  def beliefs(self, episodes: Sequence[Any]) -> list[list[TurnBelief]]:
    return [self._with_thoughts(e, episode_beliefs(e.task.task_id, e.turns, self.expert_config)) for e in episodes]

  def _with_thoughts(self, episode: Any, beliefs: list[TurnBelief]) -> list[TurnBelief]:
    """Each belief with the thought the expert's demonstration would think at that turn before its peak: the
    student's actions and their answers so far are the episode's history."""
    if self.thoughts == "none":
      return beliefs
    turns, out = episode.turns, []
    for t, belief in enumerate(beliefs):
      actions = [turn.action or "" for turn in turns[:t]] + [belief.peak or ""]
      observations = [turns[0].observation] + [turn.feedback for turn in turns[:t]]
      thought = sft_data.expert_thoughts(self.thoughts, episode.task.task_id, actions, observations)[t]
      out.append(dataclasses.replace(belief, thought=thought))
    return out

  def _split(self, response: Sequence[int]) -> int:
    """Where the constrained part of `response` starts: after the trigger (free thought), else at 0."""
    if not self.trigger:
      return 0
    k = len(self.trigger)
    ends = [i + k for i in range(len(response) - k + 1) if list(response[i:i + k]) == self.trigger]
    return ends[0] if ends else len(response)

  def turn_support(self, belief: TurnBelief, response: Sequence[int]) -> list[list[int]]:
    """Per response token, the ids constrained decoding allowed there (`sampling.generate`): none listed in
    the free thought (the whole vocabulary), the trigger alone where the thought budget forced it, the
    trie's children of the admissible actions after the trigger."""
    split = self._split(response)
    sequences = self.action_tokens(belief.actions)
    support: list[list[int]] = [[] for _ in range(split)]
    budget = self.sampling_config.max_thought_tokens
    if budget and split:
      # The sampler forces the trigger once the thought spent its budget, or when only the trigger and the
      # longest action still fit in max_new_tokens.
      forced_from = min(budget, self.sampling_config.max_new_tokens - len(self.trigger) - max(map(len, sequences)))
      start = max(split - len(self.trigger), forced_from)
      for j in range(start, split):
        support[j] = [response[j]]
    return support + trie_support(sequences, response[split:])

  def turn_stats(self, belief: TurnBelief, response: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-prob, top-1, entropy) of each response token: the free part against the expert's
    format (`format_token_stats`: off it, the expert closes its thought), the rest (after the
    trigger) through the action trie."""
    split = self._split(response)
    free = format_token_stats(*self.response_format(belief.thought), response[:split], self.thought_law)
    action = trie_token_stats(self.action_tokens(belief.actions), belief.probs, response[split:])
    return tuple(np.concatenate([f, a]) for f, a in zip(free, action))

  def turn_support_logprobs(self, belief: TurnBelief, support: Sequence[Sequence[int]], response: Sequence[int]
                            ) -> list[list[float]]:
    """Per response token, log nu of each id of its `turn_support` list given the earlier tokens: through the
    trie after the trigger (an id nu gives no mass, the floor), 0 for the trigger the thought budget forced."""
    split = self._split(response)
    laws = [{}] * split + trie_conditionals(self.action_tokens(belief.actions), belief.probs, response[split:])
    return [[0.0 if j < split else math.log(max(law.get(i, 0.0), OUTSIDE_PROB)) for i in ids]
            for j, (ids, law) in enumerate(zip(support, laws))]

  def score(self, episodes: Sequence[Any], arrays: Mapping[str, np.ndarray]) -> teacher_lib.Scores:
    """`teacher.STAT_KEYS` -> [B, S] float32 on the batch's response tokens (turn k's: turn_ids == k), else 0;
    and `student_support` [B, S, K] int32, each response token's `turn_support` (-1 padded; -1 elsewhere);
    with `topk`, also `teacher.TOPK_KEYS`: nu over those same ids (`turn_support_logprobs`), for the exact
    divergence (estimator='full', `losses.topk_divergence`): at each token with a choice, nu's conditional
    over the ids decoding allowed against the student's renormalised over them; none listed (the free
    thought): no divergence.

    (our choice) The support makes the loss read the student's log pi renormalised over the tokens
    constrained decoding allowed (`losses.token_logprobs`): nu lives on the admissible-action trie and the
    student's actions are drawn from its own renormalised policy there, so that is the policy the
    divergence log pi - log nu compares. Against the full-vocabulary log pi, a token the trie forces
    (nu = 1, pi_c = 1) has the advantage -log pi > 0 and a gradient that only raises the trie's mass.
    """
    turn_ids_BxS = np.asarray(arrays["turn_ids"])
    scores = {key: np.zeros(turn_ids_BxS.shape, np.float32) for key in teacher_lib.STAT_KEYS}
    supports = [[[] for _ in row] for row in turn_ids_BxS]
    lognus = [[[] for _ in row] for row in turn_ids_BxS]
    for b, (episode, beliefs) in enumerate(zip(episodes, self.beliefs(episodes))):
      for t, (turn, belief) in enumerate(zip(episode.turns, beliefs)):
        where = np.flatnonzero(turn_ids_BxS[b] == t + 1)
        if len(where) != len(turn.response_tokens):
          raise ValueError(f"ExpertTeacher.score: episodes[{b}] turn {t + 1} has {len(turn.response_tokens)} "
                           f"response tokens but turn_ids marks {len(where)} in row {b} of the batch.")
        for key, values in zip(teacher_lib.STAT_KEYS, self.turn_stats(belief, turn.response_tokens)):
          scores[key][b, where] = values
        support = self.turn_support(belief, turn.response_tokens)
        lognu = (self.turn_support_logprobs(belief, support, turn.response_tokens) if self.topk
                 else [[] for _ in support])
        for s, ids, values in zip(where, support, lognu):
          supports[b][s], lognus[b][s] = ids, values
    flat = support_array([ids for row in supports for ids in row])
    scores["student_support"] = flat.reshape(*turn_ids_BxS.shape, flat.shape[-1])
    if self.topk:
      values = np.zeros(flat.shape, np.float32)
      for n, row in enumerate(v for per_row in lognus for v in per_row):
        values[n, :len(row)] = row
      scores["teacher_topk_ids"] = scores["student_support"]
      scores["teacher_topk_logprobs"] = values.reshape(scores["student_support"].shape)
    return scores

  def metrics(self, episodes: Sequence[Any]) -> dict[str, float]:
    """`teacher/...`: that the teacher is the expert (controlled study), its knob, and where its peak sat."""
    beliefs = [b for per_episode in self.beliefs(episodes) for b in per_episode]
    count = max(len(beliefs), 1)
    c = self.expert_config
    return {"teacher/expert": 1.0, "teacher/eps_on": c.eps_on, "teacher/eps_off": c.eps_off, "teacher/eta": c.eta,
            "teacher/on_path_frac": sum(b.on_path for b in beliefs) / count,
            "teacher/misdirected_frac": sum(b.misdirected for b in beliefs) / count,
            "teacher/no_expert_frac": sum(b.peak is None for b in beliefs) / count}


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


@judge_lib._register_mode  # pylint: disable=protected-access
class ExpertBeliefJudge(judge_lib.JudgeMode):
  """The expert teacher's own judge: it sees the world the teacher does.

  A valid turn is Skip when the student played the teacher's preferred action, Weak when it
  played another admissible one; an invalid turn is Strong by rule (the env's feedback). Its
  errors are the teacher's: on a misdirected turn the expert's action is judged Weak and the
  wrong one Skip. `oracle` stays the upper bound (the expert's own action).
  """

  name = "expert_belief"
  needs_expert = True

  def read(self, episodes, num_turns, asked, batch, questions, rng):
    del asked, batch, questions, rng
    teacher = self._need("teacher", self.teacher)
    if getattr(teacher, "kind", None) != KIND:
      raise ValueError("judge: mode='expert_belief' reads the expert teacher's beliefs: set config.teacher.kind="
                       f"{KIND!r}.")
    labels = np.full((len(episodes), num_turns), losses.Label.STRONG, np.int32)
    for b, (episode, beliefs) in enumerate(zip(episodes, teacher.beliefs(episodes))):
      for t, (turn, belief) in enumerate(zip(episode.turns, beliefs)):
        if turn.action is not None and belief.peak is not None:
          labels[b, t] = losses.Label.SKIP if belief.prefers(turn.action) else losses.Label.WEAK
    return labels, None, 0
