"""Context lengths of the paper config's ALFWorld episodes, counted with Qwen3's tokenizer on expert games.

Usage (from the repo root; needs ALFWorld's data, ALFWORLD_DATA; builds Qwen3's tokenizer offline once):
  python benchmarks/bench_context.py --json context.json
  python benchmarks/bench_context.py --games-per-type 1 --responses 512 --window 3 --budgets 4096 40960

The expert (`alfworld_expert.run_episode`) plays `--games-per-type` games of each task type of
`--split`; every turn is rendered as the paper config's rollout renders it (`prompts` with Qwen3's
chat template, thinking on, admissible actions shown), and encoded as the rollout encodes it:
  * P, the first prompt (system, user(task + o_1), generation prompt): `prompts.episode_start_text`;
  * n_t, what follows a response to start the next turn (the rest of the assistant message, the
    observation with its admissible actions, the generation prompt): `prompts.next_turn_text`.
A `--turns`-turn episode of each game is then built with responses of R tokens and the game's n_t
in order (cycled past its last turn), and packed as `rollout.assemble_batch` packs it: on the whole
history (every turn a prefix of the transcript), and under a `--window`-turn history window (each
turn past the window its own segment: its windowed context after P, then its response;
`sampling.windowed_context`). It prints the packed row's length (`rollout.row_length`, mean over
games) and how many turns fit each budget as the rollout's budget check counts them (a turn starts
only while max(its context, the row) + R + 1 stays within the budget, with R at the sampler's cap).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import alfworld_paper  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import prompts  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import rollout  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import tokenization  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax.envs import alfworld_expert  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax.envs import base  # pylint: disable=g-import-not-at-top,wrong-import-position

_RESPONSE_ID = 15  # Any ordinary token: only the responses' lengths matter here.


def expert_games(config, split: str, per_type: int, max_steps: int) -> list[alfworld_expert.Episode]:
  """`per_type` won expert episodes of each task type of `split`, in the env's (seeded) task order."""
  env = base.make("alfworld", **dict(train.env_kwargs(config), **base.spec("alfworld").expert_kwargs))
  games: list[alfworld_expert.Episode] = []
  taken: dict[str, int] = {}
  try:
    for task in env.tasks(split):
      if taken.get(task.task_type, 0) >= per_type:
        continue
      episode = alfworld_expert.run_episode(env, task, max_steps=max_steps, seed=0)
      if episode.won:
        games.append(episode)
        taken[task.task_type] = taken.get(task.task_type, 0) + 1
  finally:
    env.close()
  return games


def encoded_turns(tokenizer, layout: prompts.ChatLayout, game: alfworld_expert.Episode, response_end: str,
                  system_prompt: str) -> tuple[list[int], list[list[int]]]:
  """(P, [n_1, ..., n_{T-1}]) of an expert game as the rollout encodes them (n_t follows response t)."""
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  prompt = encode(prompts.episode_start_text(layout, game.task_text, game.observations[0],
                                             game.admissible_actions[0], system_prompt))
  nexts = [encode(prompts.next_turn_text(layout, game.observations[t], game.admissible_actions[t],
                                         response_end=response_end))
           for t in range(1, len(game.actions))]
  return prompt, nexts


def synthetic_episode(task: base.Task, prompt: list[int], nexts: list[list[int]], num_turns: int,
                      response: list[int], window: int | None) -> rollout.Episode:
  """A `num_turns`-turn episode of `response`s and the game's n_t (cycled), windowed as the rollout does."""
  episode = rollout.Episode(task=task, prompt_tokens=list(prompt))
  past: list[list[int]] = []  # y_i + n_i of every earlier turn.
  for t in range(num_turns):
    truncated = window is not None and len(past) > window
    context = sampling.windowed_context(prompt, past, window) if truncated else []
    next_ids = list(nexts[t % len(nexts)]) if t < num_turns - 1 else []
    episode.turns.append(rollout.Turn(
        observation="", admissible=[], response_tokens=list(response),
        response_logprobs=np.zeros(len(response), np.float32), truncated=truncated,
        window_tokens=context[len(prompt):], next_tokens=next_ids))
    past.append(list(response) + next_ids)
  return episode


def turns_within(episode: rollout.Episode, budget: int, max_new_tokens: int) -> int:
  """Turns the rollout plays before its budget check ends the episode (`RolloutEngine.run`'s rule)."""
  for t in range(len(episode.turns)):
    played = rollout.Episode(task=episode.task, prompt_tokens=episode.prompt_tokens, turns=episode.turns[:t])
    turn = episode.turns[t]
    if turn.truncated:
      context = len(episode.prompt_tokens) + len(turn.window_tokens)
      row = rollout.row_length(played) + len(turn.window_tokens)
    else:
      context = rollout.row_length(played) + (len(played.turns[-1].next_tokens) if played.turns else 0)
      row = context
    if max(context, row) + max_new_tokens + 1 > budget:
      return t
  return len(episode.turns)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--split", default="valid_unseen")
  parser.add_argument("--games-per-type", type=int, default=3, help="won expert games per task type (6 types)")
  parser.add_argument("--turns", type=int, default=0, help="turns per episode (0: the paper config's env.max_turns)")
  parser.add_argument("--window", type=int, default=3, help="the history window to compare with the whole history")
  parser.add_argument("--responses", type=int, nargs="+", default=[512, 128],
                      help="response lengths in tokens (the first should be the sampler's cap)")
  parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 40960], help="context budgets in tokens")
  parser.add_argument("--tokenizer-dir", default="", help="where Qwen3's tokenizer is built (default: a temp dir)")
  parser.add_argument("--json", default="", help="also write the figures to this JSON file")
  args = parser.parse_args()

  config = alfworld_paper.get_config("0.6b")
  num_turns = args.turns or config.env.max_turns
  cap = config.sampling.max_new_tokens
  tokenizer_dir = args.tokenizer_dir or tempfile.mkdtemp(prefix="qwen3_tokenizer_")
  tokenizer = AutoTokenizer.from_pretrained(tokenization.build_qwen3_tokenizer(tokenizer_dir))
  layout = prompts.ChatLayout.from_tokenizer(tokenizer, config.sampling.enable_thinking)
  # A response ends with its end-of-turn token, which the sampler keeps (`RolloutEngine._response_end`).
  response_end = tokenizer.decode(rollout.end_of_turn_ids(tokenizer)[:1])
  if not layout.after_assistant.startswith(response_end):
    raise ValueError(f"The chat template ends an assistant message with {layout.after_assistant!r}, "
                     f"not the end-of-turn token {response_end!r}.")
  system_prompt = rollout.RolloutConfig(max_turns=num_turns).system_prompt

  games = expert_games(config, args.split, args.games_per_type, max_steps=config.demos.max_turns)
  encoded = [encoded_turns(tokenizer, layout, g, response_end, system_prompt) for g in games]
  prompt_lens = np.array([len(p) for p, _ in encoded])
  next_lens = np.array([len(n) for _, ns in encoded for n in ns])
  figures = {
      "split": args.split, "games": len(games), "turns_played": int(sum(len(g.actions) for g in games)),
      "prompt_tokens": {"mean": float(prompt_lens.mean()), "max": int(prompt_lens.max())},
      "next_turn_tokens": {"mean": float(next_lens.mean()), "p90": float(np.percentile(next_lens, 90)),
                           "max": int(next_lens.max())},
      "episodes": [],
  }
  print(f"{len(games)} won expert games of {args.split} ({figures['turns_played']} turns), Qwen3 tokenizer, "
        f"thinking {'on' if config.sampling.enable_thinking else 'off'}")
  print(f"P (first prompt): mean {prompt_lens.mean():.0f}, max {prompt_lens.max()} tokens")
  print(f"n_t (observation + admissible actions + chat tokens): mean {next_lens.mean():.0f}, "
        f"p90 {np.percentile(next_lens, 90):.0f}, max {next_lens.max()} tokens")
  print()
  print(f"| response tokens | history | {num_turns}-turn row tokens (mean over games) | "
        + " | ".join(f"turns within {b:,}" for b in args.budgets) + " |")
  print("|---:|---|---:|" + "---:|" * len(args.budgets))
  for length in args.responses:
    for name, window in (("whole", None), (f"window {args.window}, packed", args.window)):
      episodes = [synthetic_episode(g.task, p, ns, num_turns, [_RESPONSE_ID] * length, window)
                  for g, (p, ns) in zip(games, encoded)]
      rows = np.array([rollout.row_length(e) for e in episodes])
      fit = {b: float(np.mean([turns_within(e, b, cap) for e in episodes])) for b in args.budgets}
      figures["episodes"].append({"response_tokens": length, "history": name, "row_tokens": float(rows.mean()),
                                  "turns_within": fit})
      print(f"| {length} | {name} | {rows.mean():,.0f} | " + " | ".join(f"{fit[b]:.1f}" for b in args.budgets)
            + " |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
  main()
