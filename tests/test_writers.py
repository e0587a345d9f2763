"""Metric writers: JSONL rows and TensorBoard events agree with what was written."""

import struct

import numpy as np
from tensorboardX.proto import event_pb2

from sage_opd_jax import writers


def _read_events(directory):
  scalars = {}
  for path in directory.rglob("events.out.tfevents.*"):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      record = data[offset + 12 : offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_metrics_reach_jsonl_and_tensorboard(tmp_path):
  writer = writers.MetricWriter(tmp_path)
  writer.write(1, {"train/loss": np.float32(0.5), "train/tokens": 12})
  writer.write(2, {"train/loss": 0.25, "eval/valid_unseen/success": float("nan")})
  writer.close()
  rows = writers.read_metrics(tmp_path)
  assert rows[0] == {"step": 1, "train/loss": 0.5, "train/tokens": 12.0}
  assert rows[1]["train/loss"] == 0.25 and rows[1]["eval/valid_unseen/success"] == "nan"
  events = _read_events(tmp_path / "tensorboard")
  assert events["train/loss"] == [(1, 0.5), (2, 0.25)]


def test_reopened_workdir_appends(tmp_path):
  for step in (1, 2):
    writer = writers.MetricWriter(tmp_path)
    writer.write(step, {"x": step})
    writer.close()
  assert [row["step"] for row in writers.read_metrics(tmp_path)] == [1, 2]


def test_transcripts_are_json_lines(tmp_path):
  path = tmp_path / "transcripts" / "step_3.jsonl"
  writers.write_transcripts(path, [{"turns": [{"action": "look", "label": np.int64(2)}], "w": np.ones(2)}])
  assert path.read_text().strip() == '{"turns": [{"action": "look", "label": 2}], "w": [1.0, 1.0]}'
