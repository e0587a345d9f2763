"""Acting with Qwen3's real tokenizer: the chat layout under thinking mode, stops, the free-thought
trigger, and the unused ids past the tokenizer.

A tiny random Qwen3-shaped model over Qwen3's 151,936-row vocabulary plays the hand-written ALFWorld
fixture games; responses are forced through the rollout's `intervene` hook where the test needs
known text.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sage_opd_jax import models, prompts, rollout, sampling, sft_data, teacher, tokenization
from sage_opd_jax.envs.alfworld import AlfworldEnv

FIXTURE_DATA = pathlib.Path(__file__).resolve().parent / "fixtures" / "alfworld"
WALKTHROUGH_A = ("go to diningtable 1", "take apple 1 from diningtable 1", "go to countertop 1")
THINK, END_THINK, IM_END, EOT = 151667, 151668, 151645, 151643
UNUSED = 151900  # An embedding row past the tokenizer's 151,669 tokens.


@pytest.fixture(scope="module")
def model():
  config = models.ModelConfig.from_dict(dict(
      arch="qwen3", vocab_size=tokenization.QWEN3_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_layers=1,
      num_heads=2, num_kv_heads=1, head_dim=8, tie_embeddings=False))
  return models.Transformer(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def env_kwargs(tmp_path_factory):
  return dict(data_dir=str(FIXTURE_DATA), cache_dir=str(tmp_path_factory.mktemp("grounding")))


@pytest.fixture(scope="module")
def task(env_kwargs):
  env = AlfworldEnv(**env_kwargs)
  by_trial = {t.meta["trial"]: t for t in env.tasks("valid_seen") + env.tasks("train")}
  env.close()
  return by_trial["trial_fixture_a"]


def _engine(tok, env_kwargs, enable_thinking, **sampling_kwargs):
  config = rollout.RolloutConfig(max_turns=3, progress=False, min_cache_len=2048, min_chunk_len=512,
                                 enable_thinking=enable_thinking,
                                 constrained=sampling_kwargs.pop("constrained", False))
  return rollout.RolloutEngine(
      tok, config, rollout.default_sampling_config(tok, 24, enable_thinking=enable_thinking, **sampling_kwargs),
      env_name="alfworld", env_kwargs=env_kwargs, num_workers=1, timeout_s=60.0)


def _forced(responses):
  return lambda states: {s.episode: responses[s.turn - 1] for s in states}


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_three_turn_episode_is_the_chat_template_rendering(qwen3_tokenizer, model, env_kwargs, task,
                                                           enable_thinking):
  tok = qwen3_tokenizer
  thoughts = ["The apple is on the dining table.", "Take it.", "Now the countertop."]
  answers = [f"<action>{a}</action>" for a in WALKTHROUGH_A]
  # Turn 2 stops at Qwen's other end of turn, turn 3 at <|im_end|> (kept, as a sampled stop token is).
  ends = ["", "<|endoftext|>", "<|im_end|>"]
  bodies = [(f"<think>\n{th}\n</think>\n\n" if enable_thinking else "") + a for th, a in zip(thoughts, answers)]
  with _engine(tok, env_kwargs, enable_thinking) as engine:
    batch = engine.run(model, [task], jax.random.key(0), intervene=_forced([b + e for b, e in zip(bodies, ends)]))
  (episode,) = batch.episodes
  assert batch.num_turns[0] == 3 and episode.error is None
  assert [t.action for t in episode.turns] == list(WALKTHROUGH_A)
  assert [t.response_end for t in episode.turns] == ["", "", "<|im_end|>"]  # <|endoftext|> is not the template's.

  # The conversation as generated: thinking off, the generation prompt's empty think block opens each answer.
  generated = [b if enable_thinking else "<think>\n\n</think>\n\n" + b for b in bodies]
  generated[1] += "<|endoftext|>"  # Kept in the transcript, before the template's own end.
  messages = prompts.episode_messages(episode.task_text, [t.observation for t in episode.turns], generated,
                                      [t.admissible for t in episode.turns])
  # Our layout: every message as it was generated (prefix-stable), i.e. the plain ChatML rendering.
  layout_text = tok.apply_chat_template(messages, tokenize=False, chat_template=prompts.CHATML_TEMPLATE)
  ids = batch.tokens[0, : int(batch.attention_mask[0].sum())].tolist()
  assert ids == tok.encode(layout_text.removesuffix("\n"), add_special_tokens=False)
  # Qwen3's own rendering differs only in dropping the think blocks of the turns before the last.
  qwen3_text = tok.apply_chat_template(messages, tokenize=False)
  assert qwen3_text == layout_text.replace("<think>\n\n</think>\n\n", "", 2) if not enable_thinking else (
      qwen3_text == layout_text.replace(f"<think>\n{thoughts[0]}\n</think>\n\n", "").replace(
          f"<think>\n{thoughts[1]}\n</think>\n\n", ""))
  # Turn 1's context is Qwen3's prompt exactly.
  first = prompts.render_chat(tok, messages[:2], add_generation_prompt=True, enable_thinking=enable_thinking)
  assert ids[: len(episode.prompt_tokens)] == tok.encode(first, add_special_tokens=False) == episode.prompt_tokens

  # Each turn's tokens are its response, think block included; the prompt's empty think block is context.
  for t in range(3):
    response = batch.tokens[0][batch.turn_ids[0] == t + 1].tolist()
    assert response == episode.turns[t].response_tokens
    assert (THINK in response) == enable_thinking and (END_THINK in response) == enable_thinking
  real = batch.attention_mask[0] == 1  # (Qwen3's pad id is <|endoftext|> too.)
  assert batch.turn_ids[0][(batch.tokens[0] == EOT) & real].tolist() == [2]  # The other end is turn 2's token.
  prompt_thinks = (batch.tokens[0] == THINK) & (batch.turn_ids[0] == 0) & real
  instructions = prompts.first_user_content("", "").count("<think>")  # The first user message names the tag.
  assert prompt_thinks.sum() == instructions + (0 if enable_thinking else 3)

  # SFT trains the same layout: an expert response in Qwen3's format, thinking off without one.
  layout = prompts.ChatLayout.from_tokenizer(tok, enable_thinking)
  assert sft_data.expert_response(WALKTHROUGH_A[0], thoughts[0], layout) == bodies[0]


def test_sft_response_format(qwen3_tokenizer):
  assert sft_data.expert_response("look", "t", prompts.ChatLayout.from_tokenizer(qwen3_tokenizer)) == (
      "<think>\nt\n</think>\n\n<action>look</action>")
  assert sft_data.expert_response("look", "t") == "<think>t</think><action>look</action>"


def test_stops_at_every_end_of_turn_and_at_a_merged_action_close(qwen3_tokenizer, model):
  tok = qwen3_tokenizer
  config = rollout.default_sampling_config(tok, 24)
  assert config.eos_ids == (IM_END, EOT)
  # `</action>\n` is `</`, `action`, `>\n`: the exact stop sequence never sees it; the pattern does.
  text = "<action>look</action>\n<action>inventory</action>"
  forced = tok.encode(text, add_special_tokens=False)
  end = next(i + 3 for i in range(len(forced)) if forced[i:i + 3] == [522, 1311, 397])
  prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
  out = sampling.sample(model, [prompt], jax.random.key(0), config, allowed=[[forced]], min_chunk=16)
  response = out.tokens[0, : out.lengths[0]].tolist()
  assert response == forced[:end] and out.stopped[0]
  assert prompts.parse_action(tok.decode(forced)) == "look"  # Even unstopped, the later action never wins.
  # A row that ends at <|endoftext|> stops there.
  out = sampling.sample(model, [prompt], jax.random.key(0), config, allowed=[[forced[:3] + [EOT] + forced[3:]]],
                        min_chunk=16)
  assert out.tokens[0, : out.lengths[0]].tolist() == forced[:3] + [EOT]


def test_free_thought_triggers_on_think_close(qwen3_tokenizer, model, env_kwargs, task):
  tok = qwen3_tokenizer
  # `<action>` merges with what precedes it, so it cannot be the trigger; `</think>` is one token.
  assert tok.encode(" <action>", add_special_tokens=False) == [366, 1311, 29]
  config = rollout.default_sampling_config(tok, 24, free_thought=True, max_thought_tokens=6)
  assert config.constraint_trigger == (END_THINK,)
  assert rollout.default_sampling_config(tok, 24, free_thought=True, enable_thinking=False).constraint_trigger == ()
  with _engine(tok, env_kwargs, True, free_thought=True, max_thought_tokens=6, constrained=True) as engine:
    batch = engine.run(model, [task], jax.random.key(1))
  (episode,) = batch.episodes
  assert batch.valid[0, : batch.num_turns[0]].all()
  for turn in episode.turns:
    # The untrained model never thinks its way to `</think>`: the budget forces it, then Qwen3's answer format.
    assert turn.response_tokens.index(END_THINK) <= 6
    assert turn.response.endswith(f"</think>\n\n<action>{turn.action}</action>") and turn.action in turn.admissible


def test_unused_ids_are_never_sampled_nor_in_the_teachers_top_k(qwen3_tokenizer, model):
  tok = qwen3_tokenizer
  prompt = tok.encode("<|im_start|>user\nlook<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
  greedy = rollout.default_sampling_config(tok, 1, temperature=0.0)
  top = int(sampling.sample(model, [prompt], jax.random.key(0), greedy).tokens[0, 0])
  # An unused row that out-scores the greedy token wherever that one's logit is positive.
  graphdef, state = nnx.split(model)
  biased = nnx.merge(graphdef, state)
  biased.lm_head[...] = biased.lm_head[...].at[:, UNUSED].set(100.0 * biased.lm_head[:, top])
  assert int(sampling.sample(biased, [prompt], jax.random.key(0), greedy).tokens[0, 0]) == UNUSED
  masked = rollout.default_sampling_config(tok, 1, temperature=0.0, mask_unused_ids=True)
  assert masked.vocab_limit == len(tok) == 151669
  assert int(sampling.sample(biased, [prompt], jax.random.key(0), masked).tokens[0, 0]) == top
  tokens = jnp.asarray([prompt + [top]], jnp.int32)
  mask = jnp.ones_like(tokens)
  for limit, has_unused in ((0, True), (len(tok), False)):
    scores = teacher.score_batch(biased, tokens, mask, chunk_size=8, top_k=4, vocab_limit=limit)
    assert bool(np.any(np.asarray(scores["teacher_topk_ids"]) == UNUSED)) == has_unused


def _tokenizer_without_think_tags():
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(tok_models.WordLevel({"<unk>": 0, "<|im_end|>": 1, "<": 2, "think": 3, ">": 4}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
  hf.chat_template = prompts.CHATML_TEMPLATE
  return hf


def test_bad_thinking_and_tokenizer_inputs_are_named(qwen3_tokenizer, tmp_path):
  from configs import base
  from sage_opd_jax import config as config_lib, train

  config = base.get_config()
  config.tokenizer_dir = str(tmp_path)
  plain = _tokenizer_without_think_tags()
  with pytest.raises(config_lib.ConfigError, match=r"config\.sampling\.enable_thinking=True needs a tokenizer with a <think>"):
    train.check_vocabularies(config, plain, ())
  with pytest.raises(ValueError, match="needs a tokenizer with a <think>"):
    prompts.ChatLayout.from_tokenizer(plain, True)
  # Qwen3's template reads the switch; a template that ignores it would leave the model thinking.
  prompts.ChatLayout.from_tokenizer(qwen3_tokenizer, False)
  chatml = _tokenizer_without_think_tags()
  chatml.add_tokens(["<think>", "</think>"])
  with pytest.raises(ValueError, match="ignores enable_thinking"):
    prompts.ChatLayout.from_tokenizer(chatml, False)
  with pytest.raises(config_lib.ConfigError, match="max_thought_tokens.*enable_thinking=False"):
    config_lib.validate(_with(base.get_config(), **{
        "sampling.enable_thinking": False, "sampling.max_thought_tokens": 4, "sampling.constrained": True,
        "sampling.free_thought": True}))
  # A checkpoint folder with weights' config but no tokenizer, given as the tokenizer.
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(config_lib.ConfigError, match=r"config\.tokenizer_dir=.* holds no tokenizer"):
    train.shared_tokenizer(config, "distill")


def _with(config, **overrides):
  config.update_from_flattened_dict(overrides)
  return config
