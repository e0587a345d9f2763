"""The ALFWorld word-level tokenizer: coverage of real engine text, tags, chat template, loading."""

import json
import pathlib

import pytest
from conftest import real_alfworld_data
from transformers import AutoTokenizer

from sage_opd_jax import prompts, tokenization

FIXTURE_DATA = pathlib.Path(__file__).parent / "fixtures" / "alfworld"


@pytest.fixture(scope="module")
def data_dir():
  return real_alfworld_data()


@pytest.fixture(scope="module")
def tok_dir(data_dir, tmp_path_factory):
  # Every game file of every split: ~7 s on one core.
  return tokenization.build_alfworld_tokenizer(data_dir, tmp_path_factory.mktemp("tok") / "alfworld")


@pytest.fixture(scope="module")
def tok(tok_dir):
  return AutoTokenizer.from_pretrained(tok_dir)


def _play(files, max_games=2):
  """Real engine text: observations and admissible commands of the walkthrough and a few probes."""
  import textworld
  import textworld.gym
  from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

  infos_req = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
  env_id = textworld.gym.register_games(
      [str(f) for f in files[:max_games]], infos_req, batch_size=1, asynchronous=False, max_episode_steps=50,
      wrappers=[AlfredDemangler(shuffle=False), AlfredInfos],
  )
  env = textworld.gym.make(env_id)
  texts = []
  try:
    for _ in files[:max_games]:
      obs, infos = env.reset()
      texts.append(obs[0])
      walkthrough = json.loads(pathlib.Path(infos["extra.gamefile"][0]).read_text())["walkthrough"]
      for command in ["inventory", "look", "help", "xyzzy", *walkthrough]:
        texts.extend(infos["admissible_commands"][0])
        obs, _, _, infos = env.step([command])
        texts.append(obs[0])
  finally:
    env.close()
  return texts


def _assert_round_trip_without_unknowns(tok, text):
  ids = tok.encode(text, add_special_tokens=False)
  unknown = [t for t, i in zip(tok.convert_ids_to_tokens(ids), ids) if i == tok.unk_token_id]
  assert not unknown, (text, unknown)
  assert tok.decode(ids) == text


def test_real_engine_text_round_trips_without_unknowns(tok, data_dir):
  # One unseen and one seen game, each of a task type with a walkthrough of a few steps.
  files = [
      sorted((data_dir / "json_2.1.1" / split).glob(f"{task}-*/*/game.tw-pddl"))[0]
      for split, task in [("valid_unseen", "pick_cool_then_place_in_recep"), ("valid_seen", "look_at_obj_in_light")]
  ]
  texts = _play(files)
  assert any("Welcome to TextWorld" in t for t in texts) and any("Available commands" in t for t in texts)
  for text in texts:
    _assert_round_trip_without_unknowns(tok, text)


def test_every_valid_unseen_name_is_one_token(tok, data_dir):
  # Parsed here independently of the module: "<Type>_bar_<coords>... - object|receptacle"
  # lines, named as AlfredDemangler names them (lower-cased type, "basin" kept).
  names = set()
  for f in (data_dir / "json_2.1.1" / "valid_unseen").glob("*/*/game.tw-pddl"):
    for line in json.loads(f.read_text())["pddl_problem"].splitlines():
      parts = line.split()
      if len(parts) == 3 and parts[1] == "-" and parts[2] in ("object", "receptacle") and "_bar_" in parts[0]:
        pddl_id = parts[0].lower()
        names.add(pddl_id.split("_bar_")[0] + ("basin" if "basin" in pddl_id else ""))
  assert len(names) > 50 and "sinkbasin" in names
  for name in sorted(names):
    for text in (name, f"go to {name} 1"):
      _assert_round_trip_without_unknowns(tok, text)
    assert len(tok.encode(" " + name, add_special_tokens=False)) == 1, name


def test_tags_are_single_tokens_and_survive_decoding(tok):
  response = "<think>The mug is on the desk.</think><action>take mug 1 from desk 1</action>"
  ids = tok.encode(response, add_special_tokens=False)
  pieces = tok.convert_ids_to_tokens(ids)
  for tag in tokenization.TAG_TOKENS:
    assert pieces.count(tag) == 1, pieces
  assert tok.decode(ids, skip_special_tokens=True) == response
  assert prompts.parse_action(tok.decode(ids)) == "take mug 1 from desk 1"
  for label in prompts.LABEL_NAMES:
    assert len(tok.encode(label, add_special_tokens=False)) == 1


def test_special_tokens_and_numbers(tok):
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
  assert tok.pad_token_id != tok.eos_token_id
  ids = tok.encode("<|im_start|>user\nYou arrive at shelf 12.<|im_end|>", add_special_tokens=False)
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
  # Digits are pieces of their own, so any number is spelled without unknowns.
  _assert_round_trip_without_unknowns(tok, "cabinet 1234567890 and 0.")


def test_chat_template_and_multi_turn_tokens_concatenate(tok):
  messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "You see a mug 1."}]
  rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == ("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nYou see a mug 1.<|im_end|>\n"
                      "<|im_start|>assistant\n")
  # The sampler tokenizes each appended piece on its own; that must equal tokenizing the whole.
  layout = prompts.ChatLayout.from_tokenizer(tok)
  segments = prompts.episode_segments(
      layout, "Your task is to: put a mug in cabinet.", ["You are in a room.", "You arrive at desk 1."],
      ["<think>go</think><action>go to desk 1</action>", "<think>take</think><action>take mug 1 from desk 1</action>"],
  )
  pieces = [tok.encode(text, add_special_tokens=False) for text, _ in segments]
  joined = "".join(text for text, _ in segments)
  assert sum(pieces, []) == tok.encode(joined, add_special_tokens=False)
  _assert_round_trip_without_unknowns(tok, joined)


def test_prompt_words_are_known(tok):
  history = [("You arrive at desk 1.", "take mug 1 from desk 1"), ("Nothing happens.", None)]
  texts = [
      prompts.render_acting_prompt(tok, "Your task is to: put a mug in cabinet.", history, "You see a mug 1.",
                                   ["look", "inventory"], k=2),
      prompts.render_judge_prompt(tok, "Your task is to: put a mug in cabinet.", history, "You see a mug 1.",
                                  "<think>go</think><action>look</action>", "Nothing happens.", ["look"], k=2),
  ]
  for text in texts:
    _assert_round_trip_without_unknowns(tok, text)


def test_cache_reuse_and_extra_texts(tmp_path):
  # The hand-written fixture games: no data set needed.
  out = tmp_path / "tok"
  path = tokenization.build_alfworld_tokenizer(FIXTURE_DATA, out)
  first = json.loads((out / "sage_manifest.json").read_text())
  assert first["game_files"] == len(tokenization.game_files(FIXTURE_DATA))
  marker = out / "marker"
  marker.write_text("x")
  # Same inputs: the directory is reused untouched.
  assert tokenization.build_alfworld_tokenizer(FIXTURE_DATA, out) == path and marker.exists()
  # New words: rebuilt, and they are known afterwards.
  tokenization.build_alfworld_tokenizer(FIXTURE_DATA, out, extra_texts=["Zyzzogeton ponders"])
  assert not marker.exists()
  tok = AutoTokenizer.from_pretrained(path)
  _assert_round_trip_without_unknowns(tok, "The zyzzogeton ponders.")
  assert tok.unk_token_id in tok.encode("quokka", add_special_tokens=False)


def test_missing_data_dir_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="alfworld-download"):
    tokenization.build_alfworld_tokenizer(tmp_path / "nowhere", tmp_path / "tok")


def test_corpus_tokenizer_covers_its_texts_and_is_cached_by_their_set(tmp_path):
  out = tmp_path / "corpus"
  texts = ["This room is called the kitchen. In it, you see: \n\ta giant tortoise", "focus on baby baby brown bear"]
  path = tokenization.build_corpus_tokenizer(texts, out, source="test corpus")
  manifest = json.loads((out / "sage_manifest.json").read_text())
  assert manifest["source"] == "test corpus" and manifest["texts"] == 2
  tok = AutoTokenizer.from_pretrained(path)
  for text in [*texts, "Kitchen tortoise, Brown bear.", *tokenization.prompt_texts()]:
    _assert_round_trip_without_unknowns(tok, text)
  assert tok.unk_token_id in tok.encode("quokka", add_special_tokens=False)
  assert len(tok) == manifest["vocab_size"]
  marker = out / "marker"
  marker.write_text("x")
  # The same set of texts, in another order and with a duplicate: reused untouched.
  tokenization.build_corpus_tokenizer([texts[1], texts[0], texts[1]], out, source="test corpus")
  assert marker.exists()
  tokenization.build_corpus_tokenizer([*texts, "a quokka"], out, source="test corpus")
  assert not marker.exists()
  _assert_round_trip_without_unknowns(AutoTokenizer.from_pretrained(path), "The quokka.")
  with pytest.raises(ValueError, match="texts is empty"):
    tokenization.build_corpus_tokenizer([], tmp_path / "empty", source="nothing")
