"""The paper config, rehearsed (configs/alfworld_rehearsal.py): tiny random Qwen3 checkpoints with
Qwen3's real tokenizer and vocabulary, the 2 x 2 x 2 mesh of 8 fake CPU devices, real ALFWorld games.
"""

import importlib.util
import json
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str, *args):
  spec = importlib.util.spec_from_file_location(name, _REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(*args)


def _flat(config) -> dict:
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value

  walk(config, "")
  return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  return tmp_path_factory.mktemp("rehearsal_checkpoints")


def test_the_rehearsal_changes_only_sizes_budgets_games_and_the_mesh(checkpoints):
  module, rehearsal = _load("alfworld_rehearsal", str(checkpoints))
  _, paper = _load("alfworld_paper", "0.6b")
  paper, rehearsal = _flat(paper), _flat(rehearsal)
  assert paper.keys() == rehearsal.keys()
  assert {key for key in paper if paper[key] != rehearsal[key]} == set(module.CHANGED)
  assert (rehearsal["mesh.data"], rehearsal["mesh.fsdp"], rehearsal["mesh.tensor"]) == (2, 2, 2)
  student, teacher = (json.loads((pathlib.Path(rehearsal[f"{r}.hf_dir"]) / "config.json").read_text())
                      for r in ("student", "teacher"))
  assert student["vocab_size"] == teacher["vocab_size"] == 151_936
  assert student["model_type"] == teacher["model_type"] == "qwen3"
  assert teacher["hidden_size"] > student["hidden_size"]
