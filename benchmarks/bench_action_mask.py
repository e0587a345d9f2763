"""Likelihood mode's `judge.action_token_mask` against a per-prefix decoding reference, on Qwen3-tokenized turns.

Usage (from the repo root; builds Qwen3's tokenizer offline once):
  python benchmarks/bench_action_mask.py --json action_mask.json
  python benchmarks/bench_action_mask.py --thought-repeats 22 44 --turns 1 8 --trials 7

Each row is an episode packed by `rollout.assemble_batch` (Qwen3's chat layout, thinking on) whose
`--turns` turns are the same response as a Qwen3 student writes it: a think block of
`--thought-repeats` copies of one sentence (characters of several bytes included), then
`<action>go to shelf 2</action><|im_end|>` (22 repeats: 655 tokens). Both functions label the same
batch; the reference finds each token's characters from the decode of every growing prefix (one
decode per token, n (n + 1) / 2 tokens decoded per turn), the library bisects for the two ends of
the command (O(log n) decodes). The masks must agree; it prints the decodes per turn, the median
CPU and wall times of each over `--trials` and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The reference is the tests' own (tests/test_judge.py), so this times what the tests pin the library against.
sys.path.insert(0, str(REPO / "tests"))

from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

from sage_opd_jax import judge  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import prompts  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import rollout  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax import tokenization  # pylint: disable=g-import-not-at-top,wrong-import-position
from sage_opd_jax.envs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_judge import CountingDecodes, action_token_mask_reference  # pylint: disable=wrong-import-position

SENTENCE = "The mug is not on the desk 1, so I check the shelf 2 — then the café's countertop 3 ☕."
TASK = "Your task is to: put a clean mug in coffeemachine."


def qwen3_batch(tokenizer, thought_repeats: int, num_turns: int) -> rollout.RolloutBatch:
  """One row: an episode of `num_turns` identical long-thought turns, packed as the rollout packs it."""
  layout = prompts.ChatLayout.from_tokenizer(tokenizer, enable_thinking=True)
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  response = prompts.response_text(layout, "go to shelf 2", " ".join([SENTENCE] * thought_repeats))
  ids = encode(response + "<|im_end|>")
  episode = rollout.Episode(task=base.Task("alfworld", "train", "bench", "pick_clean_then_place_in_recep"),
                            task_text=TASK)
  episode.prompt_tokens = encode(prompts.episode_start_text(layout, TASK, "You are in a room."))
  for _ in range(num_turns):
    episode.turns.append(rollout.Turn(
        observation="o", admissible=[], response=response, response_tokens=ids, response_end="<|im_end|>",
        response_logprobs=np.zeros(len(ids), np.float32), action="go to shelf 2",
        next_tokens=encode(prompts.next_turn_text(layout, "Nothing happens.", None, "<|im_end|>"))))
  return rollout.assemble_batch([episode], max_turns=num_turns, pad_id=tokenizer.pad_token_id)


def median_times(fn, trials: int) -> tuple[float, float]:
  """Median (wall, this process's CPU) seconds of `trials` calls. On a loaded machine a call of a few
  milliseconds can wait a whole scheduler slice (tens of ms) in wall time; its CPU time does not."""
  walls, cpus = [], []
  for _ in range(trials):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return float(np.median(walls)), float(np.median(cpus))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--thought-repeats", type=int, nargs="+", default=[22],
                      help="copies of the sentence in each think block (22: a 655-token turn)")
  parser.add_argument("--turns", type=int, nargs="+", default=[1], help="turns per row")
  parser.add_argument("--trials", type=int, default=5)
  parser.add_argument("--tokenizer-dir", default="", help="where Qwen3's tokenizer is built (default: a temp dir)")
  parser.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = parser.parse_args()
  tokenizer_dir = args.tokenizer_dir or tempfile.mkdtemp(prefix="qwen3_tokenizer_")
  tokenizer = AutoTokenizer.from_pretrained(tokenization.build_qwen3_tokenizer(tokenizer_dir))
  print("| tokens a turn | turns | decodes a turn: library / reference | library ms: CPU (wall) | "
        "reference ms: CPU (wall) | speed-up (CPU) |")
  print("|---:|---:|---:|---:|---:|---:|")
  rows = []
  for repeats in args.thought_repeats:
    for num_turns in args.turns:
      batch = qwen3_batch(tokenizer, repeats, num_turns)
      counting = CountingDecodes(tokenizer)
      mask = judge.action_token_mask(batch.tokens, batch.turn_ids, counting)
      expected = action_token_mask_reference(batch.tokens, batch.turn_ids, tokenizer)
      if not np.array_equal(mask, expected):
        raise AssertionError(f"action_token_mask differs from the reference at {np.argwhere(mask != expected)}.")
      picked = tokenizer.decode(batch.tokens[0][mask[0] & (batch.turn_ids[0] == 1)].tolist())
      if picked.strip() != "go to shelf 2":
        raise AssertionError(f"The mask spells {picked!r}, not the action.")
      turn_tokens = int(np.sum(batch.turn_ids[0] == 1))
      ours_wall, ours = median_times(  # pylint: disable=cell-var-from-loop
          lambda: judge.action_token_mask(batch.tokens, batch.turn_ids, tokenizer), args.trials)
      ref_wall, ref = median_times(  # pylint: disable=cell-var-from-loop
          lambda: action_token_mask_reference(batch.tokens, batch.turn_ids, tokenizer), args.trials)
      row = dict(turn_tokens=turn_tokens, turns=num_turns, decodes=counting.calls // num_turns,
                 reference_decodes=turn_tokens + 1, library_cpu_ms=ours * 1e3, library_wall_ms=ours_wall * 1e3,
                 reference_cpu_ms=ref * 1e3, reference_wall_ms=ref_wall * 1e3, speedup_cpu=ref / ours)
      rows.append(row)
      print(f"| {turn_tokens} | {num_turns} | {row['decodes']} / {row['reference_decodes']} | {ours * 1e3:.1f} "
            f"({ours_wall * 1e3:.1f}) | {ref * 1e3:.0f} ({ref_wall * 1e3:.0f}) | {ref / ours:.0f}x |", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
  main()
