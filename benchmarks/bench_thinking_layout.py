"""What keeping earlier think blocks in the acting history costs, counted with Qwen3's tokenizer.

Usage (from the repo root; builds Qwen3's tokenizer offline into --tokenizer-dir once, ~10 s):
  python benchmarks/bench_thinking_layout.py --thought-tokens 0 64 256 --budget 4096

An episode of ALFWorld-like turns (the observations below, cycled; one action each, a thought
of exactly --thought-tokens tokens) is rendered two ways, each turn's context as token ids:
  * ours (`prompts` multi-turn layout): every turn only appends, earlier responses keep their
    think blocks, so a turn encodes only its new observation (the KV cache holds the rest);
  * Qwen3's template: earlier assistant messages lose their think blocks, so a turn's context
    is no prefix of the previous context + response: the shared prefix ends where the previous
    response began, and its thought-free version is encoded again with the new observation.
Per thought length it prints the tokens a turn encodes (median over turns 2..T), the context
length at turn T, and how many turns fit before context + one response exceed --budget.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from transformers import AutoTokenizer

from sage_opd_jax import prompts, tokenization
from sage_opd_jax.sampling import _common_prefix  # pylint: disable=protected-access

TASK = "Your task is to: put a clean mug in coffeemachine."
OBSERVATIONS = (
    "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, you see a "
    "cabinet 4, a cabinet 3, a cabinet 2, a cabinet 1, a coffeemachine 1, a countertop 2, a countertop 1, a drawer 3, "
    "a drawer 2, a drawer 1, a fridge 1, a garbagecan 1, a microwave 1, a sinkbasin 1, a stoveburner 4, and a "
    "toaster 1.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2, a butterknife 1, a mug 1, and a peppershaker 3.",
    "You pick up the mug 1 from the countertop 1.",
    "You arrive at sinkbasin 1. On the sinkbasin 1, you see a spatula 2.",
    "You clean the mug 1 using the sinkbasin 1.",
    "Nothing happens.",
)
ACTIONS = ("go to countertop 1", "take mug 1 from countertop 1", "go to sinkbasin 1", "clean mug 1 with sinkbasin 1",
           "go to coffeemachine 1", "look")
FILLER = "I should look for a mug on the countertops first, then clean it in the sinkbasin. "


def thought(tok, n: int) -> str:
  ids = tok.encode(FILLER * (n // 8 + 1), add_special_tokens=False)[:n]
  return tok.decode(ids).strip()


def contexts(tok, turns: int, think: str, qwen3: bool) -> tuple[list[list[int]], int]:
  """Each turn's context ids under one rendering, and a response's length in tokens."""
  response = f"<think>\n{think}\n</think>\n\n<action>{{}}</action>"
  observations = [OBSERVATIONS[t % len(OBSERVATIONS)] for t in range(turns)]
  out = []
  for t in range(turns):
    responses = [response.format(ACTIONS[i % len(ACTIONS)]) for i in range(t)]
    messages = prompts.episode_messages(TASK, observations[: t + 1], responses)
    template = None if qwen3 else prompts.CHATML_TEMPLATE
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
    out.append(tok.encode(text, add_special_tokens=False))
  return out, len(tok.encode(response.format(ACTIONS[0]), add_special_tokens=False)) + 1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--thought-tokens", type=int, nargs="+", default=[0, 64, 256, 500])
  parser.add_argument("--turns", type=int, default=12)
  parser.add_argument("--budget", type=int, default=4096)
  parser.add_argument("--tokenizer-dir", default=None)
  args = parser.parse_args()
  tok = AutoTokenizer.from_pretrained(tokenization.build_qwen3_tokenizer(
      args.tokenizer_dir or tempfile.mkdtemp(prefix="qwen3_tok_")))
  print(f"{'thought':>8} {'layout':>7} {'encoded/turn':>13} {'context@T':>10} {'turns in budget':>16}")
  for n in args.thought_tokens:
    think = thought(tok, n)
    for name, qwen3 in (("ours", False), ("qwen3", True)):
      ctx, response_len = contexts(tok, args.turns, think, qwen3)
      # What the KV cache holds after turn t-1: its context plus its sampled response (with the end token).
      encoded = []
      for t in range(1, args.turns):
        held = ctx[t - 1] + tok.encode(f"<think>\n{think}\n</think>\n\n<action>{ACTIONS[(t - 1) % len(ACTIONS)]}"
                                       "</action><|im_end|>", add_special_tokens=False)
        encoded.append(len(ctx[t]) - _common_prefix(held, ctx[t]))
      fit = sum(len(c) + response_len <= args.budget for c in ctx)
      fit_text = f"{fit}" if fit < args.turns else f">= {args.turns}"
      print(f"{n:>8} {name:>7} {int(np.median(encoded)):>13} {len(ctx[-1]):>10} {fit_text:>16}")


if __name__ == "__main__":
  main()
