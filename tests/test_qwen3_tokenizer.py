"""Qwen3's real tokenizer, built offline: ids against Qwen3's published ones and an independent tiktoken
encoder, and the chat template against Qwen3's literal format."""

import json
import pathlib
import unicodedata

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from sage_opd_jax import prompts, tokenization

FIXTURE_DATA = pathlib.Path(__file__).parent / "fixtures" / "alfworld"

# Written out here from Qwen3's tokenizer_config.json, independently of the module's table.
QWEN3_ADDED = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
    "<think>": 151667, "</think>": 151668,
}
QWEN3_SPECIAL = {t for t, i in QWEN3_ADDED.items() if i <= 151656}  # special: true in Qwen3's config.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

ALFWORLD_TEXTS = [
    "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, you see a "
    "cabinet 4, a cabinet 3, a coffeemachine 1, a countertop 2, a drawer 12, a fridge 1, a sinkbasin 1, and a "
    "stoveburner 4.\n\nYour task is to: put a clean mug in coffeemachine.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2, a butterknife 1, and a mug 1.",
    "The fridge 1 is closed.", "You open the fridge 1. The fridge 1 is open. In it, you see nothing.",
    "You pick up the mug 1 from the countertop 1.", "You clean the mug 1 using the sinkbasin 1.",
    "Nothing happens.", "You won!", "go to countertop 1", "take mug 1 from countertop 1",
    "clean mug 1 with sinkbasin 1", "move mug 1 to coffeemachine 1", "examine desklamp 1", "use desklamp 1",
    "heat potato 1 with microwave 1", "cool apple 2 with fridge 1", "slice bread 1 with knife 1", "inventory",
    "look", "You are carrying: a mug 1.",
]
OTHER_TEXTS = [
    "Hello world", "I'M sure you'll see it's THEIR'S, we've, they'd", "3.14159 and 1234567890, 1st 22nd",
    "a  b   c\n\n\nd \n e\t\tf\r\ng   \n", "    indented\n\tcode()  ", "你好，世界！这是一个测试。",
    "naïve café résumé — “quotes” ‘single’ … ½ ²", "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧", "e\u0301 (decomposed é), A\u030a",
    "def f(x):\n    return x ** 2  # square\n", '{"key": [1, 2, {"a": null}]}', "", " ", "\n", "!!!???...,,,",
    "<think>\nI need a mug first.\n</think>\n\n<action>go to countertop 1</action>",
    "<|im_start|>user\nObservation: You arrive at desk 1.<|im_end|>\n<|im_start|>assistant\n",
    "</action>\n<action> 1.<action>x</action><|endoftext|>", "<tool_call>\n{}\n</tool_call><|fim_pad|>",
]


@pytest.fixture(scope="module")
def reference():
  """Qwen3's encoder built independently: tiktoken's own BPE over the same ranks, Qwen2's pattern."""
  return tiktoken.Encoding("qwen3", pat_str=QWEN2_PATTERN, mergeable_ranks=load_tiktoken_bpe(
      str(tokenization.qwen3_ranks_file())), special_tokens=QWEN3_ADDED)


def _corpus():
  texts = [*ALFWORLD_TEXTS, *OTHER_TEXTS, *tokenization.prompt_texts()]
  for f in tokenization.game_files(FIXTURE_DATA):
    names, templates = tokenization.game_texts(json.loads(f.read_text()))
    texts += sorted(names) + sorted(templates)
  return texts


def test_published_ids(qwen3_tokenizer):
  tok = qwen3_tokenizer
  assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
  assert tok.encode("<|im_start|>user", add_special_tokens=False) == [151644, 872]
  for token, i in QWEN3_ADDED.items():
    assert tok.convert_tokens_to_ids(token) == i, token
    assert tok.encode(token, add_special_tokens=False) == [i], token
    assert tok.decode([i], skip_special_tokens=True) == ("" if token in QWEN3_SPECIAL else token), token
  assert len(tok) == 151669 and len(tok) <= tokenization.QWEN3_VOCAB_SIZE
  assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)


def test_agrees_with_independent_tiktoken_encoder(qwen3_tokenizer, reference):
  corpus = _corpus()
  assert len(corpus) > 100
  for text in corpus:
    # Qwen's tokenizer NFC-normalises first; tiktoken does not.
    expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    ids = qwen3_tokenizer.encode(text, add_special_tokens=False)
    assert ids == expected, text
    assert qwen3_tokenizer.decode(ids) == reference.decode(expected), text


def test_chat_template_renders_qwen3_format(qwen3_tokenizer):
  def render(messages, **kwargs):
    return qwen3_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

  system, user = {"role": "system", "content": "S"}, {"role": "user", "content": "U1"}
  assert render([system, user], add_generation_prompt=True) == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n")
  assert render([system, user], add_generation_prompt=True, enable_thinking=True) == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n")
  assert render([user], add_generation_prompt=True, enable_thinking=False) == (
      "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
  # Before the last user message an assistant loses its think block; after it, the block is kept
  # in Qwen3's normalised form (and an assistant turn without one, last, gets an empty one).
  conversation = [
      system, user, {"role": "assistant", "content": "<think>a</think><action>x</action>"},
      {"role": "user", "content": "U2"}, {"role": "assistant", "content": "<think>\nb\n</think>\n\n<action>y</action>"},
  ]
  assert render(conversation) == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n<action>x</action>"
      "<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n<think>\nb\n</think>\n\n"
      "<action>y</action><|im_end|>\n")
  assert render([user, {"role": "assistant", "content": "<think>c</think>z"}]) == (
      "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n<think>\nc\n</think>\n\nz<|im_end|>\n")
  assert render([user, {"role": "assistant", "content": "z"}]) == (
      "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nz<|im_end|>\n")
  layout = prompts.ChatLayout.from_tokenizer(qwen3_tokenizer)
  assert (layout.after_assistant, layout.user_close) == (
      "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")


def test_cache_reuse(qwen3_tokenizer_dir):
  out = pathlib.Path(qwen3_tokenizer_dir)
  marker = out / "marker"
  marker.write_text("x")
  assert tokenization.build_qwen3_tokenizer(out) == str(out) and marker.exists()
  manifest = json.loads((out / "sage_manifest.json").read_text())
  assert manifest["vocab_size"] == 151669
  (out / "sage_manifest.json").write_text(json.dumps(dict(manifest, fingerprint="stale")))
  tokenization.build_qwen3_tokenizer(out)
  assert not marker.exists() and json.loads((out / "sage_manifest.json").read_text()) == dict(
      manifest, build_seconds=json.loads((out / "sage_manifest.json").read_text())["build_seconds"])
