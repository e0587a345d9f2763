"""Builds the ALFWorld word-level tokenizer and measures its build time and token counts.

Usage:
  export ALFWORLD_DATA="$(../shared/alfworld/unpack)"
  python benchmarks/bench_tokenizer.py --games 10 --out /tmp/bench_tok

Token counts come from the walkthroughs of the first `--games` valid_seen games played
in the real engine, with responses written as `<think></think><action>a</action>`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import time

from transformers import AutoTokenizer

from sage_opd_jax import prompts, tokenization


def _episodes(files):
  import textworld
  import textworld.gym
  from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

  req = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
  env = textworld.gym.make(textworld.gym.register_games(
      [str(f) for f in files], req, batch_size=1, asynchronous=False, max_episode_steps=50,
      wrappers=[AlfredDemangler(shuffle=False), AlfredInfos]))
  for _ in files:
    obs, infos = env.reset()
    walkthrough = json.loads(pathlib.Path(infos["extra.gamefile"][0]).read_text())["walkthrough"]
    observations, admissible = [obs[0]], [infos["admissible_commands"][0]]
    for action in walkthrough[:-1]:
      obs, _, _, infos = env.step([action])
      observations.append(obs[0])
      admissible.append(infos["admissible_commands"][0])
    yield observations, walkthrough, admissible
  env.close()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--games", type=int, default=10)
  parser.add_argument("--out", default="/tmp/bench_tok")
  args = parser.parse_args()
  data = pathlib.Path(os.environ["ALFWORLD_DATA"])
  shutil.rmtree(args.out, ignore_errors=True)
  start = time.perf_counter()
  path = tokenization.build_alfworld_tokenizer(data, args.out)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  tokenization.build_alfworld_tokenizer(data, args.out)
  cached = time.perf_counter() - start
  tok = AutoTokenizer.from_pretrained(path)
  n_files = len(tokenization.game_files(data))
  print(f"build over {n_files} game files: cold {cold:.2f} s, cached {cached:.2f} s, vocab {len(tok)}")

  def count(text):
    return len(tok.encode(text, add_special_tokens=False))

  layout = prompts.ChatLayout.from_tokenizer(tok)
  files = sorted((data / "json_2.1.1" / "valid_seen").glob("*/*/game.tw-pddl"))[:args.games]
  obs_n, act_n, step_n, chat_n, chat_adm_n, unknown = [], [], [], [], [], 0
  for observations, actions, admissible in _episodes(files):
    task = observations[0].rsplit("\n\n", 1)[-1]
    responses = [f"<think></think><action>{a}</action>" for a in actions]
    obs_n += [count(o) for o in observations]
    act_n += [count(a) for a in actions]
    history = []
    for o, a, adm in zip(observations, actions, admissible):
      step_n.append(count(prompts.render_acting_prompt(tok, task, history, o, adm, k=2)))
      history.append((o, a))
    for adm, out in ((None, chat_n), (admissible, chat_adm_n)):
      text = "".join(t for t, _ in prompts.episode_segments(layout, task, observations, responses, adm))
      out.append(count(text))
      unknown += tok.encode(text, add_special_tokens=False).count(tok.unk_token_id)
  mean = statistics.mean
  print(f"{len(chat_n)} valid_seen walkthroughs, {len(act_n)} turns; unknown tokens: {unknown}")
  print(f"tokens per observation: mean {mean(obs_n):.1f}; per action: mean {mean(act_n):.1f}")
  print(f"step-wise prompt (k=2, admissible listed): mean {mean(step_n):.0f} tokens per turn")
  print(f"multi-turn transcript: mean {mean(chat_n):.0f} tokens per episode without admissible actions, "
        f"{mean(chat_adm_n):.0f} with them")


if __name__ == "__main__":
  main()
