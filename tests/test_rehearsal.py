"""The paper config's whole pipeline, rehearsed (configs/alfworld_rehearsal.py): tiny random Qwen3
checkpoints with Qwen3's real tokenizer and vocabulary, thinking on, bf16, remat, chunked attention and
loss, the 2 x 2 x 2 mesh of 8 fake CPU devices, real ALFWorld games.
"""

import csv
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from sage_opd_jax import provenance

from conftest import real_alfworld_data

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Bounds a hung pipeline. The rehearsal takes a few minutes of an idle 2-core machine; a loaded one
# stretches that several times over.
_LIMIT_S = 3600


def _load(name: str, *args):
  spec = importlib.util.spec_from_file_location(name, _REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(*args)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  return tmp_path_factory.mktemp("rehearsal_checkpoints")


def test_the_rehearsal_changes_only_the_fields_it_lists(checkpoints):
  module, rehearsal = _load("alfworld_rehearsal", str(checkpoints))
  _, paper = _load("alfworld_paper", "0.6b")
  paper, rehearsal = provenance.flatten(paper), provenance.flatten(rehearsal)
  assert paper.keys() == rehearsal.keys()
  assert {key for key in paper if paper[key] != rehearsal[key]} == set(module.CHANGED)
  assert (rehearsal["mesh.data"], rehearsal["mesh.fsdp"], rehearsal["mesh.tensor"]) == (2, 2, 2)
  student, teacher = (json.loads((pathlib.Path(rehearsal[f"{r}.hf_dir"]) / "config.json").read_text())
                      for r in ("student", "teacher"))
  assert student["vocab_size"] == teacher["vocab_size"] == 151_936
  assert student["model_type"] == teacher["model_type"] == "qwen3"
  assert teacher["hidden_size"] > student["hidden_size"]


def test_the_control_rehearsal_changes_the_qwen3_study_as_the_paper_rehearsal_changes_the_paper(checkpoints):
  module, rehearsal = _load("alfworld_rehearsal", f"{checkpoints},control")
  _, study = _load("alfworld_control_qwen3", "0.5")
  study, rehearsal = provenance.flatten(study), provenance.flatten(rehearsal)
  assert study.keys() == rehearsal.keys()
  # Listed fields only (the study already evaluates as the rehearsal does), but not the teacher's checkpoint:
  # the expert is the teacher.
  changed = {key for key in study if study[key] != rehearsal[key]}
  assert changed <= set(module.CHANGED) - {"teacher.hf_dir"}, changed - set(module.CHANGED)
  assert {"student.hf_dir", "env.max_turns", "train.max_seq_len", "mesh.tensor"} <= changed
  assert rehearsal["teacher.kind"] == "expert" and rehearsal["teacher.hf_dir"] == ""
  assert rehearsal["tokenizer_dir"] == rehearsal["student.hf_dir"]
  with pytest.raises(ValueError, match="after the comma"):
    _load("alfworld_rehearsal", f"{checkpoints},contrl")


def _run_pipeline(checkpoints: pathlib.Path, workdir: pathlib.Path, which: str = "") -> str:
  """The rehearsal's one command (`which`: the paper config after the argument's comma), in a process of its
  own with 8 fake CPU devices.

  Its compilation cache is its own and starts empty: every stage compiles what no earlier stage of
  this run did, and loads what one did (the same programs at the same shapes), as a user's first run.
  """
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO))
  arg = f"{checkpoints},{which}" if which else str(checkpoints)
  cmd = [sys.executable, "-m", "sage_opd_jax.main", f"--config=configs/alfworld_rehearsal.py:{arg}",
         f"--workdir={workdir}"]
  # Its own session: on a timeout the pipeline and its env workers are killed together.
  proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=_LIMIT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"The rehearsal ran past {_LIMIT_S} s:\n{out[-5000:]}")
  finally:
    if proc.poll() is None:  # Interrupted (Ctrl-C): nothing of it outlives the test.
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, out[-8000:]
  return out


def _metrics(folder: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _turns(folder: pathlib.Path, pattern: str = "*.jsonl") -> list[dict]:
  return [turn for path in sorted((folder / "transcripts").glob(pattern))
          for line in path.read_text().splitlines() for turn in json.loads(line)["turns"]]


def test_the_rehearsal_runs_the_paper_pipeline(checkpoints, tmp_path):
  real_alfworld_data()
  _, config = _load("alfworld_rehearsal", str(checkpoints))
  workdir = tmp_path / "rehearsal"
  _run_pipeline(checkpoints, workdir)

  # The table: every method's row, from one seed, evaluated on both splits.
  with open(workdir / "results" / "results.csv", encoding="utf-8") as f:
    rows = {row["method"]: row for row in csv.DictReader(f)}
  assert set(config.pipeline.methods) <= set(rows), rows.keys()
  for method in config.pipeline.methods:
    assert rows[method]["seeds"] == "1" and rows[method]["valid_unseen/success_mean"] != "", rows[method]
  report = (workdir / "results" / "results.md").read_text()
  assert f"the given checkpoint `{config.teacher.hf_dir}`" in report and "| sage_opd |" in report

  # The warm start trained from the given student; the teacher was used as given.
  warm = json.loads((workdir / "student_sft" / "config.json").read_text())["config"]
  assert warm["student.hf_dir"] == config.student.hf_dir and not (workdir / "teacher").exists()

  runs = workdir / "runs"
  # The sft row: SFT on the expert demonstrations; no teacher scores, rollouts or judge.
  sft = _metrics(runs / "sft" / "seed0")
  assert sft[0]["sft/demos"] > 0
  assert not any(key.startswith(("time/teacher", "time/rollout", "rollout/", "judge/")) for row in sft for key in row)
  for method in ("opd", "sage_opd"):
    trained = [row for row in _metrics(runs / method / "seed0") if "time/teacher" in row]
    assert len(trained) == config.pipeline.distill_steps, method
    # Episodes of several turns: the token budget ends few of them before the turn limit.
    for row in trained:
      assert row["rollout/mean_turns"] >= 3 and row["rollout/context_cut_rate"] < 1, (method, row)
    # Free decoding, as the paper samples: the random student's turns are its own text, not the
    # admissible actions, so none parses to one (a constrained decode would play one every turn).
    played = _turns(runs / method / "seed0", "*_train.jsonl")
    assert played and not any(turn["valid"] for turn in played), (method, played[:3])
    assert all(row["rollout/invalid_rate"] == 1.0 for row in trained), method
    # Thinking mode: the trained student opens its turns with a think block (greedy, in its evaluation;
    # its rollouts at temperature 1 are mostly the random model's other 151,935 ids).
    responses = [turn["response"] for turn in _turns(runs / method / "seed0")]
    assert responses and any(r.startswith("<think>") for r in responses), (method, responses[:3])
  # SAGE-OPD's label mix is in every update's metrics and in the transcripts: every turn played no
  # admissible action, so every turn is Strong by rule and none reaches the judge's question.
  labelled = [row for row in _metrics(runs / "sage_opd" / "seed0") if "judge/strong_frac" in row]
  assert len(labelled) == config.pipeline.distill_steps
  for row in labelled:
    assert row["judge/asked_frac"] == 0.0 and row["judge/strong_frac"] == 1.0, row
    assert sum(row[f"judge/{label}_frac"] for label in ("skip", "weak", "strong")) == pytest.approx(1.0)
  assert {turn["label"] for turn in _turns(runs / "sage_opd" / "seed0", "*_train.jsonl")} == {"Strong"}
  # The judge's question at the paper's settings was asked in the judge-accuracy stage, of the given teacher.
  assert "Judge accuracy on held-out games' judge examples:" in report

  # The exported student reloads in transformers (PyTorch) with the same logits.
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from sage_opd_jax import models  # pylint: disable=g-import-not-at-top

  exported = runs / "sage_opd" / "seed0" / "hf"
  tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer_dir)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": "You are in the middle of a room."},
                                       {"role": "assistant", "content": "<think>\nlook\n</think>\n\n<action>look"
                                                                        "</action>"}], tokenize=True)
  ids = np.asarray(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids, np.int32)[None]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  with torch.no_grad():
    want = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(models.load_hf_checkpoint(exported, dtype="float32")(ids))
  assert got.shape == want.shape == (1, ids.shape[1], 151_936)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_the_rehearsal_runs_the_controlled_study_with_a_qwen3_student(checkpoints, tmp_path):
  """configs/alfworld_control_qwen3.py, rehearsed: the expert teacher scores a Qwen3 student's thinking-mode
  responses (Qwen3's tokenizer and chat template), its knob and judge run, and the study's report is written."""
  real_alfworld_data()
  _, config = _load("alfworld_rehearsal", f"{checkpoints},control")
  workdir = tmp_path / "control"
  _run_pipeline(checkpoints, workdir, "control")

  # The warm start trained from the given student; no teacher was trained or evaluated.
  assert json.loads((workdir / "student_sft" / "config.json").read_text())["config"]["student.hf_dir"] == (
      config.student.hf_dir)
  assert not (workdir / "teacher").exists() and not (workdir / "teacher_eval").exists()
  runs = workdir / "sweeps" / "eta0.5" / "runs"
  for method in ("opd", "sage_opd"):
    trained = [row for row in _metrics(runs / method / "seed0") if "time/teacher" in row]
    assert len(trained) == config.pipeline.distill_steps, method
    for row in trained:
      # The expert scored every turn, at the study's knob; the random student leaves its path at once.
      assert row["teacher/expert"] == 1.0 and row["teacher/eta"] == 0.5 and row["teacher/no_expert_frac"] == 0.0
      assert row["teacher/on_path_frac"] < 1.0 and np.isfinite(row["train/loss"]), (method, row)
      assert row["train/num_trained_tokens"] > 0 and row["rollout/invalid_rate"] == 0.0, (method, row)
    # Constrained decoding after a free thought, in Qwen3's thinking format: every turn closes its thought and
    # plays an admissible action.
    played = _turns(runs / method / "seed0", "*_train.jsonl")
    assert played and all(turn["valid"] for turn in played), (method, played[:3])
    assert all("</think>\n\n<action>" in turn["response"] for turn in played), (method, played[:3])
  # SAGE-OPD's labels come from the expert's own judge, graded against the oracle's.
  labelled = [row for row in _metrics(runs / "sage_opd" / "seed0") if "judge/strong_frac" in row]
  assert len(labelled) == config.pipeline.distill_steps
  for row in labelled:
    assert row["judge/num_prompts"] == 0.0 and 0.0 <= row["judge/oracle_accuracy"] <= 1.0, row
    assert sum(row[f"judge/{label}_frac"] for label in ("skip", "weak", "strong")) == pytest.approx(1.0)
  # The study's report: a row per method at eta 0.5, evaluated on both splits.
  with open(workdir / "control" / "control.csv", encoding="utf-8") as f:
    rows = {row["method"]: row for row in csv.DictReader(f)}
  for method in ("opd", "sage_opd"):
    assert rows[method]["eta"] == "0.5" and rows[method]["valid_unseen/success_mean"] != "", rows
  assert rows["sage_opd"]["judge/skip_frac"] != "" and rows["opd"]["judge/skip_frac"] == ""
