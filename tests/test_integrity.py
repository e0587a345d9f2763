"""Nothing garbage in, nothing garbage out: run provenance, shared vocabularies, finite weights, corrupt HF files."""

import json
import pathlib
import shutil
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from sage_opd_jax import config as config_lib
from sage_opd_jax import models
from sage_opd_jax import pipeline
from sage_opd_jax import provenance
from sage_opd_jax import tokenization
from sage_opd_jax import train
from sage_opd_jax import update as update_lib
from sage_opd_jax import writers
from sage_opd_jax.models import sharding

FIXTURE_DATA = pathlib.Path(__file__).resolve().parent / "fixtures" / "alfworld"
TINY = base.tiny_model(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=16, max_position_embeddings=128, scan_unroll=1)


def _tiny_model(**changes):
  return sharding.create_model(models.ModelConfig.from_dict({**TINY.to_dict(), **changes}), None, 0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return tokenization.build_alfworld_tokenizer(FIXTURE_DATA, tmp_path_factory.mktemp("tokenizer"))


def _config(tokenizer_dir, **overrides):
  config = base.get_config()
  config.tokenizer_dir = str(tokenizer_dir)
  vocab = -(-len(models.load_tokenizer(tokenizer_dir)) // 64) * 64
  config.student.model = base.tiny_model(**{**TINY.to_dict(), "vocab_size": vocab})
  config.teacher.model = base.tiny_model(**{**TINY.to_dict(), "vocab_size": vocab})
  config.env.data_dir = str(FIXTURE_DATA)
  config.update_from_flattened_dict(overrides)
  return config_lib.validate(config)


# ----------------------------------------------------------------------------- provenance


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_file_written_whole_replaces_the_old_and_gets_the_mode_open_gives(tmp_path, umask):
  """`files.write_atomically` in a fresh process under `umask`: the file holds the new text or bytes, no temporary
  file is left, and its mode is the one a plain open() gives there (a shared workdir's reports stay readable
  to its group under umask 022, and private under 077)."""
  script = (f"import os, pathlib; os.umask({umask}); from sage_opd_jax import files; "
            f"d = pathlib.Path({str(tmp_path)!r}); open(d / 'plain', 'w').close(); "
            "files.write_atomically(d / 'report.md', 'old'); files.write_atomically(d / 'report.md', 'new'); "
            "files.write_atomically(d / 'plot.png', b'\\x89PNG')")
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=pathlib.Path(__file__).parents[1])
  assert (tmp_path / "report.md").read_text() == "new" and (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
  assert sorted(f.name for f in tmp_path.iterdir()) == ["plain", "plot.png", "report.md"]
  modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()}
  assert modes["report.md"] == modes["plot.png"] == modes["plain"] == 0o666 & ~umask, modes


def test_resume_with_another_method_is_refused_with_the_diff(tokenizer_dir, tmp_path):
  provenance.check(_config(tokenizer_dir, method="sage_opd"), tmp_path)
  changed = _config(tokenizer_dir, **{"method": "opd", "optim.learning_rate": 1e-2})
  with pytest.raises(config_lib.ConfigError) as error:
    train.train(changed, tmp_path)  # Refused before anything is built: no checkpoint, no log.
  message = str(error.value)
  assert "method: 'sage_opd' -> 'opd'" in message and "optim.learning_rate: 0.0003 -> 0.01" in message
  assert "--config.allow_changed=method,optim.learning_rate" in message and "new workdir" in message
  assert sorted(p.name for p in tmp_path.iterdir()) == [provenance.RECORD]
  # Named, the changes are accepted and recorded.
  provenance.check(_config(tokenizer_dir, **{"method": "opd", "optim.learning_rate": 1e-2,
                                             "allow_changed": "method,optim"}), tmp_path)
  assert json.loads((tmp_path / provenance.RECORD).read_text())["config"]["method"] == "opd"


def test_extending_a_run_or_its_logging_needs_no_flag(tokenizer_dir, tmp_path):
  provenance.check(_config(tokenizer_dir), tmp_path)
  provenance.check(_config(tokenizer_dir, **{"train.num_steps": 40, "train.log_every": 5, "env.num_workers": 1,
                                             "sampling.min_cache_len": 2048, "sampling.min_trie_shape": (64, 8)}),
                   tmp_path)
  recorded = json.loads((tmp_path / provenance.RECORD).read_text())["config"]
  assert recorded["train.num_steps"] == 40 and recorded["env.num_workers"] == 1
  assert recorded["sampling.min_cache_len"] == 2048 and recorded["sampling.min_trie_shape"] == [64, 8]


def test_a_moved_workdir_still_matches_its_own_paths(tokenizer_dir, tmp_path):
  run = tmp_path / "run" / "stage"
  provenance.check(_config(tokenizer_dir, **{"sft.demos_dir": str(tmp_path / "run" / "demos")}), run)
  shutil.move(tmp_path / "run", tmp_path / "moved")
  moved = tmp_path / "moved" / "stage"
  provenance.check(_config(tokenizer_dir, **{"sft.demos_dir": str(tmp_path / "moved" / "demos")}), moved)
  with pytest.raises(config_lib.ConfigError, match="sft.demos_dir"):  # A path outside the moved folder differs.
    provenance.check(_config(tokenizer_dir, **{"sft.demos_dir": str(tmp_path / "other")}), moved)


def test_a_finished_pipeline_stage_with_another_config_is_not_reused(tokenizer_dir, tmp_path):
  folder = tmp_path / "teacher_eval"
  provenance.check(_config(tokenizer_dir, **{"teacher.hf_dir": ""}), folder)
  ran = []
  other = _config(tokenizer_dir, **{"loss.alpha": 0.25})
  with pytest.raises(config_lib.ConfigError, match="loss.alpha: 0.5 -> 0.25"):
    pipeline._stage(tmp_path, "teacher_eval", True, lambda: ran.append(1), record=(other, folder, None))
  # A sweep compares the keys it shares with the stage (the loss is a distill setting, not one of them) and never
  # rewrites the record; a shared key's change is refused as above.
  pipeline._stage(tmp_path, "teacher_eval", True, lambda: ran.append(1), record=(other, folder, pipeline.SHARED_KEYS))
  assert provenance.flatten(_config(tokenizer_dir, **{"teacher.hf_dir": ""})).items() <= json.loads(
      (folder / provenance.RECORD).read_text())["config"].items()
  with pytest.raises(config_lib.ConfigError, match="sft.thoughts: 'none' -> 'subgoal'"):
    pipeline._stage(tmp_path, "teacher_eval", True, lambda: ran.append(1),
                    record=(_config(tokenizer_dir, **{"sft.thoughts": "subgoal"}), folder, pipeline.SHARED_KEYS))
  pipeline._stage(tmp_path, "teacher_eval", False, lambda: ran.append(1),
                  record=(_config(tokenizer_dir), folder, None))
  assert ran == [1]


# ----------------------------------------------------------------------------- vocabularies


def _hf_dir_with_tokenizer(tmp_path, tokenizer_dir, vocab_size, swap=False):
  """A checkpoint folder with its own copy of the tokenizer; `swap` renumbers two of its tokens."""
  out = tmp_path / f"teacher_{vocab_size}_{swap}"
  models.save_hf_checkpoint(_tiny_model(vocab_size=vocab_size), out)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(pathlib.Path(tokenizer_dir) / name, out / name)
  if swap:
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(spec))
  return out


def test_a_teacher_with_another_tokenizer_is_refused(tokenizer_dir, tmp_path):
  vocab = -(-len(models.load_tokenizer(tokenizer_dir)) // 64) * 64
  same = _hf_dir_with_tokenizer(tmp_path, tokenizer_dir, vocab)
  renumbered = _hf_dir_with_tokenizer(tmp_path, tokenizer_dir, vocab, swap=True)
  tokenizer = models.load_tokenizer(tokenizer_dir)
  train.check_vocabularies(_config(tokenizer_dir, **{"teacher.hf_dir": str(same)}), tokenizer, ("student", "teacher"))
  with pytest.raises(config_lib.ConfigError, match=r"config.teacher.hf_dir=.*2 of \d+ tokens have another id"):
    train.train(_config(tokenizer_dir, **{"teacher.hf_dir": str(renumbered)}), tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_full_estimator_needs_one_vocabulary_size(tokenizer_dir, tmp_path):
  vocab = -(-len(models.load_tokenizer(tokenizer_dir)) // 64) * 64
  wider = _hf_dir_with_tokenizer(tmp_path, tokenizer_dir, vocab + 64)
  tokenizer = models.load_tokenizer(tokenizer_dir)
  train.check_vocabularies(_config(tokenizer_dir, **{"teacher.hf_dir": str(wider)}), tokenizer, ("student", "teacher"))
  with pytest.raises(config_lib.ConfigError, match=(
      rf"vocab_size={vocab + 64} \(config\.teacher\.hf_dir='{wider}'\) differs from the student's {vocab} "
      r"\(config\.student\.model\)")):
    train.check_vocabularies(_config(tokenizer_dir, **{"teacher.hf_dir": str(wider), "loss.estimator": "full"}),
                             tokenizer, ("student", "teacher"))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_the_pipeline_refuses_a_checkpoint_with_another_tokenizer_before_any_stage(role, tokenizer_dir, tmp_path):
  from configs import alfworld_cpu  # pylint: disable=g-import-not-at-top

  vocab = -(-len(models.load_tokenizer(tokenizer_dir)) // 64) * 64
  renumbered = _hf_dir_with_tokenizer(tmp_path, tokenizer_dir, vocab, swap=True)
  config = alfworld_cpu.get_config()
  config.env.data_dir, config.tokenizer_dir = str(FIXTURE_DATA), str(tokenizer_dir)
  config[role].hf_dir = str(renumbered)
  with pytest.raises(config_lib.ConfigError, match=(
      rf"config\.{role}\.hf_dir='{renumbered}' ships a tokenizer other than config\.tokenizer_dir='{tokenizer_dir}'")):
    pipeline.run(config_lib.validate(config), tmp_path / "run")
  assert not (tmp_path / "run" / "demos").exists()  # Refused before the demonstrations (hours at paper scale).


# ----------------------------------------------------------------------------- finite weights


def test_an_update_that_would_make_the_weights_non_finite_is_skipped():
  model = _tiny_model()
  graphdef = nnx.graphdef(model)
  optim = base.get_config().optim
  # A NaN learning rate (past validation, as a bug in a schedule would be) leaves the loss and the
  # gradient finite: only the new weights and moments show it.
  optim.learning_rate, optim.warmup_steps = float("nan"), 0
  tx = update_lib.make_optimizer(optim)

  def loss_fn(model, micro, totals):
    logits_BxSxV = model(micro["tokens"], attention_mask=micro["attention_mask"])
    return jnp.mean(jax.nn.logsumexp(logits_BxSxV, axis=-1)) / totals["rows"], {}

  update = jax.jit(update_lib.make_update_fn(graphdef, tx, loss_fn, lambda batch: {"rows": 1.0}, micro_batches=1))
  state = update_lib.init_train_state(model, tx, seed=0)
  before = jax.device_get((state.params, state.opt_state))
  batch = {"tokens": jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64, "attention_mask": jnp.ones((2, 8), bool)}
  new_state, metrics = update(state, batch, update_lib.learning_rates(optim, 10)[1])
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert bool(metrics["update_skipped"]) and int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((new_state.params, new_state.opt_state)), before)


def test_export_refuses_non_finite_weights_naming_the_tensor(tmp_path):
  model = _tiny_model()
  up = model.layers.up_proj
  up.set_value(up.get_value().at[1, 0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match=r"non-finite .*\['model.layers.1.mlp.up_proj.weight'\]"):
    models.save_hf_checkpoint(model, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


def test_loading_refuses_non_finite_weights_naming_the_tensor(tmp_path):
  models.save_hf_checkpoint(_tiny_model(), tmp_path)
  file = tmp_path / "model.safetensors"
  raw = bytearray(file.read_bytes())
  header_len = int(np.frombuffer(raw[:8], "<u8")[0])
  start = json.loads(raw[8:8 + header_len])["model.norm.weight"]["data_offsets"][0] + 8 + header_len
  raw[start:start + 4] = np.float32(np.nan).tobytes()
  file.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=rf"{tmp_path}: non-finite .*\['model.norm.weight'\]"):
    models.load_hf_checkpoint(tmp_path)


def test_a_run_whose_every_update_is_skipped_fails_and_exports_nothing(tokenizer_dir, tmp_path):
  config = _config(tokenizer_dir, **{"method": "opd", "train.num_steps": 1, "train.batch_episodes": 2,
                                     "env.train_split": "valid_seen", "env.eval_splits": ("valid_seen",), "env.max_turns": 1,
                                     "env.num_workers": 1, "eval.num_episodes": 0, "sampling.max_new_tokens": 2, "train.max_seq_len": 256,
                                     "teacher.score_chunk": 64, "mesh.fsdp": 2})
  config.optim.learning_rate = float("nan")  # Past validation, as a bug in a schedule would be.
  with pytest.raises(RuntimeError, match="Every update of .* was skipped"):
    train.train(config, tmp_path)
  assert not writers.exported(tmp_path)
  assert [row["train/update_skipped"] for row in writers.rows_with(tmp_path, "train/")] == [1.0]


# ----------------------------------------------------------------------------- corrupt HF files


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_dir):
  out = tmp_path_factory.mktemp("hf")
  models.save_hf_checkpoint(_tiny_model(), out)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(pathlib.Path(tokenizer_dir) / name, out / name)
  return out


def _damaged_copy(hf_dir, tmp_path, name, cut):
  out = tmp_path / "hf"
  shutil.copytree(hf_dir, out)
  data = (out / name).read_bytes()
  (out / name).write_bytes(data[:cut(data)])
  return out, out / name


def _header_len(data):
  return int(np.frombuffer(data[:8], "<u8")[0])


@pytest.mark.parametrize("cut, problem", [
    (lambda data: len(data) // 2, "truncated"),
    (lambda data: 8 + _header_len(data) // 2, "truncated"),
    (lambda data: 0, "0 bytes, too short"),
    (lambda data: 4, "4 bytes, too short"),
], ids=["half", "inside_header", "empty", "inside_length"])
def test_a_cut_safetensors_file_is_named(hf_dir, tmp_path, cut, problem):
  out, file = _damaged_copy(hf_dir, tmp_path, "model.safetensors", cut)
  with pytest.raises(ValueError, match=problem) as error:
    models.load_hf_checkpoint(out)
  assert str(file) in str(error.value)


def test_a_damaged_safetensors_header_is_named(hf_dir, tmp_path):
  out = tmp_path / "hf"
  shutil.copytree(hf_dir, out)
  file = out / "model.safetensors"
  raw = bytearray(file.read_bytes())
  raw[8:10] = b"\xff\xfe"  # Not JSON (nor UTF-8) any more.
  file.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="header is not valid JSON") as error:
    models.load_hf_checkpoint(out)
  assert str(file) in str(error.value)
  # Offsets that disagree with the dtype and shape.
  raw = bytearray((hf_dir / "model.safetensors").read_bytes())
  header = json.loads(raw[8:8 + _header_len(raw)])
  header["model.norm.weight"]["data_offsets"][1] += 4
  text = json.dumps(header, separators=(",", ":")).encode().ljust(_header_len(raw))
  file.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + _header_len(raw):]))
  with pytest.raises(ValueError, match=r"'model.norm.weight' has data_offsets") as error:
    models.load_hf_checkpoint(out)
  assert str(file) in str(error.value)


@pytest.mark.parametrize("name, load", [
    ("config.json", models.load_hf_checkpoint),
    ("tokenizer.json", models.load_tokenizer),
    ("tokenizer_config.json", models.load_tokenizer),
])
def test_a_truncated_json_file_is_named(hf_dir, tmp_path, name, load):
  out, file = _damaged_copy(hf_dir, tmp_path, name, lambda data: len(data) // 2)
  with pytest.raises(ValueError) as error:
    load(out)
  assert str(file) in str(error.value)


def test_a_truncated_index_is_named(hf_dir, tmp_path):
  out = tmp_path / "sharded"
  models.save_hf_checkpoint(_tiny_model(), out, max_shard_bytes=4096)
  index = out / "model.safetensors.index.json"
  index.write_text(index.read_text()[:20])
  with pytest.raises(ValueError, match="safetensors index") as error:
    models.load_hf_checkpoint(out)
  assert str(index) in str(error.value)


def test_the_results_report_links_the_config_its_numbers_came_from(tmp_path):
  from configs import alfworld_cpu  # pylint: disable=g-import-not-at-top
  from sage_opd_jax import results  # pylint: disable=g-import-not-at-top

  config = alfworld_cpu.get_config()
  provenance.check(config, tmp_path)
  report = (results.write_results(tmp_path, config) / "results.md").read_text()
  link = report.split(f"Config: [{provenance.RECORD}](", 1)[1].split(")", 1)[0]
  recorded = json.loads((tmp_path / "results" / link).read_text())["config"]
  assert recorded == provenance.flatten(config)
