"""Multi-host for real: two processes x 4 CPU devices equal one process x 8, and resume after SIGKILL.

The processes join through `jax.distributed` on 127.0.0.1 (gloo collectives), each plays its half
of every batch on the fixture games, and they train `sage_opd` with the tiny models and the
paper's prompted judge (the teacher generates each label, on the global mesh). Every launch has
a hard deadline, and a launch that fails or runs over kills its processes (and their env
workers, in the same process group) before the test fails.
"""

import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import test_main
from sage_opd_jax import judge
from sage_opd_jax import models
from sage_opd_jax import tokenization
from sage_opd_jax import writers
from sage_opd_jax.models import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "alfworld"
BATCH = 8  # Episodes per update: 4 per process, 1 per device.
STEPS = 2  # Killed after the first, resumed for the second.
DEADLINE_S = 240  # Per launch; the whole test stays well under it on an idle machine.


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
  """A data folder with 8 train games (copies of the fixture's two valid_seen games), the initial
  student and a judging teacher as HF checkpoints, and a config file."""
  root = tmp_path_factory.mktemp("multihost")
  data = root / "data"
  shutil.copytree(FIXTURE_DATA, data)
  split = data / "json_2.1.1" / "valid_seen"
  for task in sorted(split.iterdir()):
    for copy in range(1, BATCH // 2):
      for trial in task.iterdir():
        shutil.copytree(trial, split / f"{task.name}" / f"{trial.name}_copy{copy}")
  tokenizer_dir = tokenization.build_alfworld_tokenizer(data, root / "tokenizer")
  overrides = {
      "env.data_dir": str(data), "train.batch_episodes": BATCH, "train.micro_batches": 1, "train.num_steps": STEPS,
      "train.ckpt_every": 1, "train.eval_every": STEPS, "eval.num_episodes": BATCH, "eval.num_transcripts": 1,
      # The paper config's judge: the teacher answers each judge prompt greedily, a generation on
      # the global mesh. Eval plays one batch as the rollouts do (same temperature, 4 episodes per
      # process), so it runs the rollout's compiled programs.
      # Its answer is one token (the label word), its prompt without history or the admissible list,
      # all of an update's prompts in one call: one compiled shape serves every update.
      "judge.mode": "prompt", "judge.max_new_tokens": 1, "judge.history_turns": 0, "judge.show_admissible": False,
      "judge.length_bucketing": False, "eval.temperatures": (1.0,),
      # The acting KV cache at its largest length from the start: the decode compiles per chunk width
      # only, and the same shapes recur in later updates and the eval (each compile costs seconds).
      "sampling.min_cache_len": 768,
      # Actions from the admissible ones, so that turns are valid and the judge is asked about them.
      "sampling.constrained": True,
      "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, "env.num_workers": 1,
  }
  config = test_main.tiny_config(tokenizer_dir, **overrides)
  # Both models start from checkpoints, built once here rather than initialised in every process.
  overrides["student.hf_dir"], overrides["teacher.hf_dir"] = _initial_models(config, root)
  config_path = root / "config.py"
  config_path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
      "import test_main\n"
      "def get_config():\n"
      f"  return test_main.tiny_config({tokenizer_dir!r}, **{overrides!r})\n")
  return config_path


def _initial_models(config, root):
  """The tiny student, and a teacher whose greedy judge answer is a label word chosen by its context.

  The teacher's LM head gives the three label words the logits a<h, w_k> (h the last hidden
  state, w_k three unit vectors 120 degrees apart in a random plane), far above every other
  token's: each judge prompt gets the label whose direction h leans to, so the labels, and
  through them the loss, show whether both runs' judge generations agree.
  """
  tokenizer = models.load_tokenizer(config.tokenizer_dir)
  student = sharding.create_model(models.ModelConfig.from_dict(config.student.model.to_dict()), seed=0)
  teacher_config = dataclasses.replace(models.ModelConfig.from_dict(config.teacher.model.to_dict()),
                                       tie_embeddings=False)
  teacher = sharding.create_model(teacher_config, seed=1)
  head_DxV = np.array(teacher.lm_head[...])
  u, v = np.linalg.qr(np.random.default_rng(2).standard_normal((head_DxV.shape[0], 2)))[0].T
  for k, token in enumerate(judge.label_token_ids(tokenizer)):
    angle = 2 * np.pi * k / 3
    head_DxV[:, token] = 10.0 * (np.cos(angle) * u + np.sin(angle) * v)
  teacher.lm_head[...] = jnp.asarray(head_DxV)
  dirs = root / "student", root / "teacher"
  for model, path in zip((student, teacher), dirs):
    models.save_hf_checkpoint(model, path)
  return tuple(str(path) for path in dirs)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(config_path, workdir, num_processes, devices_each, *flags, timeout_s=60, process_ids=None):
  """Starts the run's processes `process_ids` (default all), each in its own process group, so
  that its env workers die with it. Each gets a deadline `DEADLINE_S` from now, which `_wait` enforces.
  """
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
  procs = []
  for i in range(num_processes) if process_ids is None else process_ids:
    # sage_opd_jax.main, with every process writing its compiled programs to the shared cache.
    cmd = [sys.executable, str(REPO / "tests" / "multihost_main.py"), f"--config={config_path}", f"--workdir={workdir}",
           *flags]
    if num_processes > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}",
              f"--distributed_timeout_s={timeout_s}"]
    log = open(pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.{i}.log", "ab")
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True))
    procs[-1].deadline, procs[-1].port = time.monotonic() + DEADLINE_S, port
  return procs


def _kill(procs):
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  for proc in procs:
    proc.wait()


def _wait(procs, workdir, until=None, fail=False):
  """Waits for every process to exit 0 (or for `until()`); kills them all on a failure or past
  their deadline. With `fail`, every process must exit non-zero instead."""
  ok = (lambda code: code != 0) if fail else (lambda code: code == 0)
  try:
    while True:
      codes = [proc.poll() for proc in procs]
      if any(code is not None and not ok(code) for code in codes):
        raise AssertionError(f"a process of {workdir} exited with {codes}:\n{_logs(workdir)}")
      if all(code is not None for code in codes) or (until is not None and until()):
        return
      if time.monotonic() > max(proc.deadline for proc in procs):
        raise AssertionError(f"{workdir} ran past {DEADLINE_S} s:\n{_logs(workdir)}")
      time.sleep(0.2)
  finally:
    if until is not None or not all(proc.poll() is not None and ok(proc.returncode) for proc in procs):
      _kill(procs)


def _logs(workdir):
  workdir = pathlib.Path(workdir)
  return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                   for log in sorted(workdir.parent.glob(f"{workdir.name}.*.log")))


def _params(workdir):
  exported = writers.export_dir(workdir)
  arrays = {}
  for path in sorted(exported.glob("*.safetensors")):
    arrays.update(safetensors.numpy.load_file(path))
  assert arrays, f"no exported weights under {exported}"
  return arrays


def _updates(workdir):
  """{step: {train metric: value}}; a resumed run's rewritten steps keep their last row."""
  rows = {}
  for row in writers.read_metrics(workdir):
    if "train/loss" in row:
      rows[row["step"]] = {k: v for k, v in row.items() if k.startswith(("train/", "rollout/", "judge/"))}
  return rows


def _evals(workdir):
  return [{k: v for k, v in row.items() if k.startswith("eval/")} for row in writers.rows_with(workdir, "eval/")]


def _assert_close(actual, expected, what):
  assert actual.keys() == expected.keys(), what
  np.testing.assert_allclose([actual[k] for k in sorted(expected)], [expected[k] for k in sorted(expected)],
                             rtol=1e-5, atol=1e-5, err_msg=f"{what}: {sorted(expected)}")


def _assert_same_run(workdir, reference, steps=STEPS, evals=1):
  params, expected = _params(workdir), _params(reference)
  assert params.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(params[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
  updates, expected_updates = _updates(workdir), _updates(reference)
  assert sorted(updates) == list(range(1, steps + 1))
  assert updates.keys() == expected_updates.keys()
  for step, metrics in expected_updates.items():
    _assert_close(updates[step], metrics, f"step {step}")
  actual_evals, expected_evals = _evals(workdir), _evals(reference)
  assert len(actual_evals) == len(expected_evals) == evals  # One process wrote each.
  for actual, expected in zip(actual_evals, expected_evals):
    _assert_close(actual, expected, "eval")


def test_two_processes_killed_and_resumed_equal_one(run_files, tmp_path):
  # One launch of 2 processes x 4 devices is SIGKILLed once its first checkpoint is on disk; a
  # second launch resumes it. Its per-update metrics (from both launches), its eval and its final
  # parameters must be those of 1 process x 8 devices, so a fault in the split, the gather, the
  # judge's generation or the resume shows. The reference runs alongside: each launch's time is
  # mostly single-threaded compiling, so the three processes share the two cores' time.
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  reference = _launch(run_files, one, 1, 8)
  try:
    procs = _launch(run_files, two, 2, 4)
    _wait(procs, two, until=lambda: (two / "checkpoints" / "1").is_dir())  # Orbax renames it there once complete.
    assert all(proc.returncode == -signal.SIGKILL for proc in procs), [proc.returncode for proc in procs]
    assert not writers.exported(two)
    _wait(_launch(run_files, two, 2, 4), two)
    _wait(reference, one)
  finally:
    _kill(reference)
  _assert_same_run(two, one)
  updates = _updates(two).values()
  # The run learnt something, so that equal parameters are not equal initialisations.
  assert any(row["train/update_skipped"] == 0 for row in updates)
  # The teacher's generated answers set labels (Strong alone could come from invalid turns and fallbacks).
  assert all(row["judge/num_prompts"] > 0 for row in updates)
  assert all(row["judge/unanswered_frac"] == 0 for row in updates)
  assert any(row["judge/skip_frac"] + row["judge/weak_frac"] > 0 for row in updates)
  # One process wrote the files: each update's row once per launch that ran it, one eval.
  assert len([r for r in writers.read_metrics(two) if r.get("step") == STEPS and "train/loss" in r]) == 1
  assert (two / "transcripts").is_dir() and len(list((two / "transcripts").iterdir())) == 2  # Eval and train.


def test_transcript_judge_two_processes_equal_one(run_files, tmp_path):
  # The transcript judge (the question after the transcript, its label read from the teacher's
  # next-token distribution in the scoring pass) across processes: one update, 2 x 4 against
  # 1 x 8, both launched at once (the eval, which does not judge, is the test above's). After the
  # test above, the rollout's and the update's programs load from the compilation cache; the
  # scoring pass with the questions compiles anew.
  flags = ("--config.judge.mode=transcript", "--config.train.num_steps=1", "--config.eval.num_episodes=0")
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  runs = {one: _launch(run_files, one, 1, 8, *flags), two: _launch(run_files, two, 2, 4, *flags)}
  try:
    for workdir, procs in runs.items():
      _wait(procs, workdir)
  finally:
    for procs in runs.values():
      _kill(procs)
  _assert_same_run(two, one, steps=1, evals=0)
  (row,) = _updates(two).values()
  assert row["judge/num_prompts"] > 0 and row["judge/unanswered_frac"] == 0
  assert row["judge/skip_frac"] + row["judge/weak_frac"] > 0  # Labels read from the teacher's answers.


def test_bad_launches_fail_with_what_is_wrong(run_files, tmp_path):
  # Three bad launches at once (each is mostly process start-up): a process whose coordinator
  # never answers names the address instead of hanging; a global batch that does not split over
  # the processes stops before joining (process 0 alone: after the join it would wait 60 s for its
  # peer and fail with the coordinator's timeout), and a mesh that leaves devices out stops
  # before compiling.
  lonely = tmp_path / "coordinator"
  procs = _launch(run_files, lonely, 2, 4, timeout_s=3, process_ids=(1,))  # Process 0, the coordinator, never starts.
  launches = {lonely: (procs, "The coordinator 127.0.0.1:{port} did not answer within 3 s")}
  for flag, message, process_ids in (
      ("--config.train.batch_episodes=3", "batch_episodes=3 does not divide over the 2 processes", (0,)),
      ("--config.mesh.fsdp=4", "uses 4 of the 8 devices of 2 processes", None)):
    workdir = tmp_path / flag.split("=")[0].rsplit(".", 1)[1]
    launches[workdir] = (_launch(run_files, workdir, 2, 4, flag, "--config.mesh.data=1", process_ids=process_ids),
                         message)
  try:
    for workdir, (procs, message) in launches.items():
      _wait(procs, workdir, fail=True)
      assert message.format(port=procs[0].port) in _logs(workdir), _logs(workdir)
      assert not (workdir / "checkpoints").exists()
  finally:
    for procs, _ in launches.values():
      _kill(procs)


def test_shares_cover_every_episode_once():
  from sage_opd_jax import multihost

  for num in (1, 3, 8, 13):
    for count in (1, 2, 3, 4):
      played = [i for p in range(count) for i in multihost.share(num, p, count)]
      assert played == list(range(num)), (num, count)


def test_an_episodes_sample_depends_on_its_key_only():
  # What lets 2 processes x 4 episodes play the 8 episodes of 1 process: with per-episode keys, an
  # episode's response is the same whether it shares the decode batch with 3 others or with none.
  import jax
  from configs import base
  from sage_opd_jax import rollout, sampling

  model = sharding.create_model(models.ModelConfig.from_dict(base.tiny_model(vocab_size=128).to_dict()), seed=0)
  config = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, eos_ids=(1,), pad_id=0)
  contexts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
  keys = rollout.episode_keys(jax.random.PRNGKey(3), [0, 1, 2, 3], turn=1)
  together = sampling.EpisodeCache(model, 4).generate(contexts, keys, config)
  for e in (1, 3):
    alone = sampling.EpisodeCache(model, 1).generate([contexts[e]], keys[e:e + 1], config)
    np.testing.assert_array_equal(alone.tokens[0], together.tokens[e])
    np.testing.assert_allclose(alone.logprobs[0], together.logprobs[e], atol=1e-5)
  # Not a constant: other keys draw other responses.
  other = sampling.EpisodeCache(model, 4).generate(contexts, rollout.episode_keys(jax.random.PRNGKey(4), range(4), 1),
                                                   config)
  assert not np.array_equal(other.tokens, together.tokens)
