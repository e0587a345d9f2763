"""Config validation: bad keys, values and combinations stop a run with the key named."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from sage_opd_jax import config as config_lib
from sage_opd_jax import losses
from sage_opd_jax import train
from sage_opd_jax.envs import base as envs_base

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_config(name: str, *args):
  """configs/<name>.py's get_config(*args), loaded by path as main.py's --config flag does."""
  spec = importlib.util.spec_from_file_location(name, _REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def test_base_config_is_valid():
  config = _load_config("base")
  assert config_lib.validate(config) is config


def test_sft_on_a_zero_turn_window_is_refused():
  config = _load_config("alfworld_cpu")
  config.env.history_turns = 0
  with pytest.raises(config_lib.ConfigError, match="config.env.history_turns=0 with an SFT stage"):
    config_lib.validate(config)
  config.env.history_turns = 1
  assert config_lib.validate(config) is config


@pytest.mark.parametrize("changes, named", [
    (dict(), None),
    ({"sampling.temperature": 0.7}, "config.sampling.temperature=0.7"),
    ({"sampling.top_k": 5}, "config.sampling.top_k=5"),
    ({"sampling.constrained": True}, "config.sampling.constrained=True with config.teacher.kind='model'"),
])
def test_behaviour_logprobs_as_old_only_where_they_are_the_models(changes, named):
  config = _load_config("base")
  config.update_from_flattened_dict({"loss.old_logprobs": "batch", **changes})
  if named is None:
    assert config_lib.validate(config) is config
    return
  with pytest.raises(config_lib.ConfigError, match="config.loss.old_logprobs='batch' with") as e:
    config_lib.validate(config)
  assert named in str(e.value)
  config.loss.old_logprobs = "current"
  assert config_lib.validate(config) is config


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("method", "dpo", "config.method='dpo'"),
        ("stage", "train", "config.stage='train'"),
        ("loss.confidence", "top5", "config.loss.confidence='top5'"),
        ("loss.alpha", 1.5, "config.loss.alpha=1.5"),
        ("loss.dual_clip", 1.0, "config.loss.dual_clip=1.0"),
        ("loss.jsd_beta", 0.0, "config.loss.jsd_beta=0.0"),  # Identically zero: the loss refuses it too.
        ("loss.jsd_beta", 1.0, "config.loss.jsd_beta=1.0"),
        ("loss.old_logprobs", "old", "config.loss.old_logprobs='old'"),
        ("judge.mode", "vote", "config.judge.mode='vote'"),
        ("judge.enable_thinking", True, "config.judge.max_new_tokens=4 with judge.enable_thinking=True"),
        ("train.micro_batches", 3, "config.train.batch_episodes=8 is not divisible by config.train.micro_batches=3"),
        ("env.train_split", "test", "config.env.train_split='test'"),
        ("student.model.num_kv_heads", 3, "config.student.model.num_heads=4 is not a multiple"),
        ("sampling.top_p", 1.5, "config.sampling.top_p=1.5"),
        ("sampling.min_chunk_len", 0, "config.sampling.min_chunk_len=0: must be > 0"),
        ("sampling.min_trie_shape", (256, 0), "config.sampling.min_trie_shape=(256, 0)"),
        ("teacher.temperature", 0.0, "config.teacher.temperature=0.0"),
        ("teacher.top_k", -1, "config.teacher.top_k=-1"),
        ("teacher.top_k", 10**6, "config.teacher.top_k=1000000 exceeds config.teacher.model.vocab_size="),
        ("demos.search_order", "random", "config.demos.search_order='random'"),
        ("demos.passes", 0, "config.demos.passes=0"),
    ],
)
def test_bad_value_names_the_key(key, value, message):
  config = _load_config("base")
  config.update_from_flattened_dict({key: value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)


@pytest.mark.parametrize("name", ["alfworld_cpu", "alfworld_cpu_pick", "quickstart"])
def test_pipeline_budgets(name):
  config = _load_config(name)
  config.pipeline.student_demos = 0  # Every demonstration: allowed.
  config_lib.validate(config)
  config.pipeline.student_demos = -1
  with pytest.raises(config_lib.ConfigError, match=r"config.pipeline.student_demos=-1"):
    config_lib.validate(config)
  config.pipeline.student_demos = 0
  for role in ("student", "teacher"):
    config.pipeline[f"{role}_steps"] = 0  # No SFT: only a given checkpoint can be taken as it is.
    with pytest.raises(config_lib.ConfigError, match=rf"config\.pipeline\.{role}_steps=0 uses the given {role} as "
                                                     rf"it is, but config\.{role}\.hf_dir is empty"):
      config_lib.validate(config)
    config[role].hf_dir, config.tokenizer_dir = "/ckpt/model", "/ckpt/model"
    config_lib.validate(config)


@pytest.mark.parametrize("key", ["student", "teacher"])
def test_pipeline_checkpoints_need_their_tokenizer(key):
  config = _load_config("alfworld_cpu")
  config[key].hf_dir = "/ckpt/model"
  with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}\.hf_dir .* config\.tokenizer_dir"):
    config_lib.validate(config)
  config.tokenizer_dir = "/ckpt/tokenizer"
  config_lib.validate(config)


def test_expert_variations_are_alfworlds():
  config = _load_config("alfworld_cpu")
  config.demos.search_order, config.demos.passes = "shuffled", 3
  config_lib.validate(config)
  for key, value in (("search_order", "shuffled"), ("passes", 2)):
    config = _load_config("scienceworld_cpu")
    config.demos[key] = value  # Its gold path is one fixed episode.
    with pytest.raises(config_lib.ConfigError, match=rf"config\.demos\.{key}=.*scienceworld"):
      config_lib.validate(config)


@pytest.mark.parametrize("key", ["renamed_copies", "renumbered_copies"])
def test_demo_copies_are_alfworlds(key):
  config = _load_config("alfworld_cpu")
  config.sft[key] = 1
  config_lib.validate(config)
  config.sft[key] = -1
  with pytest.raises(config_lib.ConfigError, match=rf"config\.sft\.{key}=-1"):
    config_lib.validate(config)
  config = _load_config("scienceworld_cpu")
  config.sft[key] = 1
  with pytest.raises(config_lib.ConfigError, match=rf"config\.sft\.{key}=1 .*scienceworld"):
    config_lib.validate(config)


def test_dagger_round_settings():
  config = _load_config("alfworld_cpu")
  config.pipeline.dagger_rounds = 2
  config_lib.validate(config)
  config.pipeline.dagger_steps = 0
  with pytest.raises(config_lib.ConfigError, match=r"config\.pipeline\.dagger_steps=0"):
    config_lib.validate(config)
  config = _load_config("scienceworld_cpu")
  config.pipeline.dagger_rounds = 1  # ScienceWorld's gold path cannot follow another agent's episode.
  with pytest.raises(config_lib.ConfigError, match=r"config\.pipeline\.dagger_rounds.*scienceworld"):
    config_lib.validate(config)
  config.pipeline.dagger_rounds, config.pipeline.dagger_student_rounds = 0, 1
  with pytest.raises(config_lib.ConfigError, match=r"config\.pipeline\.dagger_student_rounds.*scienceworld"):
    config_lib.validate(config)
  config = _load_config("alfworld_cpu")
  config.pipeline.dagger_rounds, config.pipeline.dagger_student_rounds = 0, 1
  config.pipeline.dagger_games = 0  # Student rounds alone need the round settings too.
  with pytest.raises(config_lib.ConfigError, match=r"config\.pipeline\.dagger_games=0"):
    config_lib.validate(config)


def test_runtime_fields_are_checked_for_a_checkpoint_too():
  # With hf_dir the architecture is the checkpoint's, but dtype and memory settings still
  # come from the config (train.RUNTIME_FIELDS), so they are validated all the same.
  config = _load_config("base")
  config.teacher.hf_dir = "/ckpt/teacher"
  config.teacher.model.num_heads = -1  # Architecture: ignored for a checkpoint.
  config.teacher.model.dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match=r"config\.teacher\.model\.dtype='float16'"):
    config_lib.validate(config)


def test_teacher_and_student_vocabularies_must_match():
  config = _load_config("base")
  config.teacher.model.vocab_size = config.student.model.vocab_size + 1
  with pytest.raises(config_lib.ConfigError, match=r"config\.teacher\.model\.vocab_size=.*student"):
    config_lib.validate(config)


def test_forward_kl_needs_full_estimator():
  config = _load_config("base")
  config.loss.divergence = "forward_kl"
  with pytest.raises(config_lib.ConfigError, match=r"config\.loss\.divergence='forward_kl'.*estimator"):
    config_lib.validate(config)
  config.loss.estimator = "full"
  config_lib.validate(config)


def test_validation_accepts_what_the_loss_accepts():
  config = _load_config("base")
  config.loss.dual_clip = None  # Off, as `losses.ppo_clip_loss` takes it.
  config.loss.estimator, config.loss.divergence, config.loss.jsd_beta = "full", "jsd", 0.01
  assert config_lib.loss_options(config) == losses.LossOptions(
      **dict(config.loss.to_dict(), method=config.method))
  config_lib.validate(config)


def test_method_is_any_registered_variant():
  config = _load_config("alfworld_cpu")
  name = "test_only_config_variant"
  config.method = name
  with pytest.raises(config_lib.ConfigError, match=rf"config.method='{name}'"):
    config_lib.validate(config)
  config.method, config.pipeline.methods = "sage_opd", ("sft", name)
  with pytest.raises(config_lib.ConfigError, match=rf"config.pipeline.methods contains '{name}'"):
    config_lib.validate(config)
  losses.register_loss(name)(losses.batch_confidence)
  try:
    config_lib.validate(config)
    config.method = name
    config_lib.validate(config)
  finally:
    losses._REGISTRY.pop(name)


def test_results_dir_is_a_folder():
  config = _load_config("alfworld_cpu_pick")
  assert config.pipeline.results_dir == "docs/results/alfworld_cpu_pick"
  config_lib.validate(config)
  config.pipeline.results_dir = "docs/results_pick_seed1.md"  # The markdown target `results_doc` took.
  with pytest.raises(config_lib.ConfigError, match=r"config.pipeline.results_dir='docs/results_pick_seed1.md'"):
    config_lib.validate(config)


def test_the_replaced_results_doc_key_is_rejected_on_the_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sage_opd_jax.main", "--config=configs/alfworld_cpu.py", f"--workdir={tmp_path / 'run'}",
       "--config.pipeline.results_doc=docs/results.md"], cwd=_REPO, capture_output=True, text=True, check=False)
  assert result.returncode != 0 and "results_doc" in result.stderr
  assert not (tmp_path / "run").exists()


def test_unknown_key_is_rejected_by_the_locked_config():
  config = _load_config("base")
  config.lock()
  with pytest.raises(AttributeError, match="lerning_rate"):
    config.optim.lerning_rate = 1e-3


def test_two_wildcard_mesh_axes_are_rejected():
  config = _load_config("base")
  config.mesh.data = -1
  with pytest.raises(config_lib.ConfigError, match="at most one axis may be -1"):
    config_lib.validate(config)


def test_transcript_judge_training_needs_transcripts_without_admissible_lists():
  config = _load_config("base")
  config.judge.mode = "transcript"
  config_lib.validate(config)  # Judging only (a prompted teacher): any transcript.
  config.sft.judge_examples = True
  with pytest.raises(config_lib.ConfigError, match=r"config.env.show_admissible=False"):
    config_lib.validate(config)
  config.env.show_admissible = False
  config_lib.validate(config)
  pipeline = _load_config("alfworld_cpu")
  pipeline.judge.mode, pipeline.env.show_admissible = "transcript", True
  with pytest.raises(config_lib.ConfigError, match=r"config.env.show_admissible=False"):
    config_lib.validate(pipeline)


def test_a_thinking_judge_samples_its_reply_within_a_thought_budget():
  config = _load_config("base")
  config.judge.enable_thinking, config.judge.max_new_tokens = True, config_lib.JUDGE_THINKING_MIN_TOKENS
  config_lib.validate(config)
  for mode in ("transcript", "likelihood", "oracle"):
    config.judge.mode = mode
    with pytest.raises(config_lib.ConfigError, match=rf"judge.enable_thinking=True with judge.mode='{mode}'"):
      config_lib.validate(config)


def test_thought_budget_bounds_the_free_thought_of_constrained_decoding():
  config = _load_config("base")
  config.sampling.max_thought_tokens = -1
  with pytest.raises(config_lib.ConfigError, match=r"config.sampling.max_thought_tokens=-1"):
    config_lib.validate(config)
  config.sampling.max_thought_tokens = 12
  for constrained, free_thought in ((False, True), (True, False)):
    config.sampling.constrained, config.sampling.free_thought = constrained, free_thought
    with pytest.raises(config_lib.ConfigError, match=r"config.sampling.max_thought_tokens=12 bounds"):
      config_lib.validate(config)
  config.sampling.constrained = config.sampling.free_thought = True
  config_lib.validate(config)


def test_the_acting_cache_length_is_positive():
  config = _load_config("base")
  config.sampling.min_cache_len = 0
  with pytest.raises(config_lib.ConfigError, match=r"config.sampling.min_cache_len=0: must be > 0"):
    config_lib.validate(config)


@pytest.mark.parametrize("sizes, want", [
    ((1, -1, 2), {"data": 1, "fsdp": 4, "tensor": 2}),  # -1 takes the 8 devices the others leave.
    ((-1, 1, 1), {"data": 8, "fsdp": 1, "tensor": 1}),
    ((1, 2, 1), {"data": 1, "fsdp": 2, "tensor": 1}),  # No -1: exactly the sizes given, over the first devices.
])
def test_mesh_from_config_resolves_a_wildcard_axis(sizes, want):
  import jax  # pylint: disable=g-import-not-at-top

  from sage_opd_jax import train  # pylint: disable=g-import-not-at-top

  config = _load_config("base")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  mesh = train.mesh_from_config(config.mesh)
  assert dict(mesh.shape) == want
  assert list(mesh.devices.flat) == jax.devices()[:mesh.devices.size]


@pytest.mark.parametrize("sizes", [(3, -1, 1), (1, 16, 1)])
def test_a_mesh_that_does_not_fit_the_devices_is_named(sizes):
  from sage_opd_jax import train  # pylint: disable=g-import-not-at-top

  config = _load_config("base")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  with pytest.raises(config_lib.ConfigError, match=r"config\.mesh=.* does not fit the 8 devices"):
    train.mesh_from_config(config.mesh)


@pytest.mark.parametrize("key, value", [
    ("optim.learning_rate", float("nan")), ("loss.alpha", float("nan")), ("optim.grad_clip", float("inf")),
    ("eval.temperatures", (0.0, float("nan"))), ("judge.likelihood_thresholds", (float("nan"), -2.0)),
])
def test_a_non_finite_float_is_named(key, value):
  config = _load_config("base")
  section, leaf = key.rsplit(".", 1)
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}=.*: must be finite"):
    config_lib.validate(config)


def test_allow_changed_names_an_unknown_key():
  config = _load_config("base")
  config.allow_changed = "train.num_steps,optim.lerning_rate"
  with pytest.raises(config_lib.ConfigError, match="config.optim.lerning_rate: missing"):
    config_lib.validate(config)


def test_the_paper_config_names_its_required_folders_and_its_argument_form():
  config = _load_config("alfworld_paper", "0.6b")
  with pytest.raises(config_lib.ConfigError,
                     match="config.teacher.hf_dir, config.student.hf_dir, config.tokenizer_dir must be set"):
    config_lib.validate(config)
  config.teacher.hf_dir = config.tokenizer_dir = "/ckpt/Qwen3-8B"
  with pytest.raises(config_lib.ConfigError, match=r"^config.student.hf_dir must be set"):
    config_lib.validate(config)
  config.student.hf_dir = "/ckpt/Qwen3-0.6B"
  config_lib.validate(config)
  # The old form (one method per command) names the new one, and how to run one method alone.
  for arg in ("sage_opd,0.6b", "opd,1.7b"):
    method, size = arg.split(",")
    with pytest.raises(ValueError, match=(rf"^alfworld_paper: the argument is '<student size>' \(e\.g\. "
                                          rf"configs/alfworld_paper\.py:{size}\).*--config\.stage=distill "
                                          rf"--config\.method={method}\.$")):
      _load_config("alfworld_paper", arg)
  for arg in ("sage_opd", "8b", ""):  # An unknown student size is named, with the known ones.
    with pytest.raises(ValueError, match=rf"^alfworld_paper: student size '{arg}' .* must be one of "
                                         r"\('0\.6b', '1\.7b', '4b'\)"):
      _load_config("alfworld_paper", arg)
  # ScienceWorld's paper config reads the same argument and names its own file.
  with pytest.raises(ValueError, match=r"^scienceworld_paper: .*configs/scienceworld_paper\.py:0\.6b"):
    _load_config("scienceworld_paper", "sage_opd,0.6b")


@pytest.mark.parametrize("name", ["alfworld_paper", "scienceworld_paper"])
def test_the_paper_config_runs_the_whole_table(name):
  config = _load_config(name, "1.7b")
  config.teacher.hf_dir = config.tokenizer_dir = "/ckpt/Qwen3-8B"
  config.student.hf_dir = "/ckpt/Qwen3-1.7B"
  config_lib.validate(config)
  assert config.stage == "pipeline" and config.pipeline.seeds == (0, 1, 2)
  # Every row of docs/method.md's table (the loss registry), once each.
  assert sorted(config.pipeline.methods) == sorted(losses.registered_losses())
  # The teacher as given; 0 warm-start updates would take the student as given too.
  assert config.pipeline.teacher_steps == 0 and config.pipeline.student_steps > 0
  config.pipeline.student_steps = 0
  config_lib.validate(config)


def test_the_sft_row_is_not_a_distill_stage():
  config = _load_config("base")
  config.method = "sft"
  with pytest.raises(config_lib.ConfigError, match=r"config\.method='sft' with config\.stage='distill'.*"
                                                   r"--config\.stage=sft --config\.sft\.demos_dir="):
    config_lib.validate(config)
  config.stage, config.sft.demos_dir = "sft", "/runs/demos/train"
  config_lib.validate(config)


def test_an_environment_declares_its_splits_keys_and_expert():
  name = "test_only_declared_env"
  spec = envs_base.EnvSpec(splits=("easy", "hard"), own_keys=("level",),
                           config_kwargs=lambda env: {"level": env.get("level", 1)})
  envs_base.register(name, spec)(object)
  try:
    config = _load_config("alfworld_cpu")
    config.env.name, config.env.train_split, config.env.eval_splits = name, "easy", ("hard",)
    config.demos.split, config.pipeline.heldout_split, config.env.level = "easy", "hard", 3
    config.sft.thoughts = "none"  # ALFWorld's subgoals: a data option this env does not declare.
    config.pipeline.dagger_rounds = config.pipeline.dagger_student_rounds = 0
    config_lib.validate(config)
    assert train.env_kwargs(config) == {"max_turns": config.env.max_turns, "seed": config.seed,
                                        "task_types": list(config.env.task_types) or None, "level": 3}
    config.pipeline.dagger_rounds = 1  # Nothing to shadow the policy with: no expert declared.
    with pytest.raises(config_lib.ConfigError, match=rf"config\.pipeline\.dagger_rounds.*'{name}' has none"):
      config_lib.validate(config)
    config.pipeline.dagger_rounds, config.sft.renamed_copies = 0, 1  # An ALFWorld data option.
    with pytest.raises(config_lib.ConfigError, match=rf"config\.sft\.renamed_copies=1 .*'{name}'"):
      config_lib.validate(config)
    config.sft.renamed_copies, config.env.eval_splits = 0, ("valid_seen",)
    with pytest.raises(config_lib.ConfigError, match=r"config\.env\.eval_splits contains 'valid_seen'"):
      config_lib.validate(config)
    config.env.data_dir = "/data/alfworld"  # ALFWorld's own key.
    with pytest.raises(config_lib.ConfigError, match=rf"config\.env\.data_dir='/data/alfworld' is not a setting"):
      train.env_kwargs(config)
  finally:
    envs_base._REGISTRY.pop(name)  # pylint: disable=protected-access
    envs_base._SPECS.pop(name)  # pylint: disable=protected-access



def test_what_several_processes_need_is_checked_before_they_join():
  config = _load_config("base")
  config.stage, config.train.batch_episodes = "distill", 8
  config_lib.check_processes(config, 2)
  config_lib.check_processes(config, 8)
  with pytest.raises(config_lib.ConfigError, match="batch_episodes=8 does not divide over the 3 processes"):
    config_lib.check_processes(config, 3)
  config_lib.check_processes(config, 1)  # One process plays every episode.
  config.method = "opd_two_rollout"
  with pytest.raises(config_lib.ConfigError, match="'opd_two_rollout' replaces turns inside the rollout"):
    config_lib.check_processes(config, 2)
  config.stage = "collect_demos"
  with pytest.raises(config_lib.ConfigError, match="config.stage='collect_demos' runs in one process"):
    config_lib.check_processes(config, 2)
  config.stage, config.train.batch_episodes = "evaluate", 3  # Evaluation plays no training batch.
  config_lib.check_processes(config, 2)
