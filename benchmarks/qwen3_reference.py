"""The benchmarks' shared reference: Qwen3-shaped sizes, a random HF checkpoint, and a timer.

Both `bench_decode.py` and `bench_train.py` compare ours against HF transformers' PyTorch model
on the same weights: torch builds a random `Qwen3ForCausalLM`, saves it as safetensors, and ours
loads that file with `models.load_hf_checkpoint`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

SIZES = {
    # Qwen3 layout, tied embeddings, vocabulary VOCAB (parameter counts printed at run time).
    "6m": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
               num_kv_heads=2, head_dim=64),
    "27m": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                num_kv_heads=4, head_dim=64),
    # Qwen3-0.6B's layers (28 x D 1024, 16 / 8 heads of 128) with the benchmarks' vocabulary:
    # about 0.45B parameters. For accelerators; far too slow for the CPU defaults.
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                 num_kv_heads=8, head_dim=128),
    # The other paper students' layers (Qwen3-1.7B and Qwen3-4B), for bench_memory.py's estimates.
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                 num_kv_heads=8, head_dim=128),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
               num_kv_heads=8, head_dim=128),
    # The paper's teacher, Qwen3-8B (untied output projection in the real checkpoint).
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
               num_kv_heads=8, head_dim=128),
}
VOCAB = 8192


def save_hf_qwen3(size: str, path: str):
  """Writes a random HF Qwen3ForCausalLM (seed 0) of `size` to `path`; returns the torch model."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  dims = SIZES[size]
  config = transformers.Qwen3Config(
      vocab_size=VOCAB, hidden_size=dims["hidden_size"],
      intermediate_size=dims["intermediate_size"], num_hidden_layers=dims["num_layers"],
      num_attention_heads=dims["num_heads"], num_key_value_heads=dims["num_kv_heads"],
      head_dim=dims["head_dim"], tie_word_embeddings=True, max_position_embeddings=4096,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
      pad_token_id=0, attn_implementation="sdpa")
  model = transformers.Qwen3ForCausalLM(config)
  model.save_pretrained(path, safe_serialization=True)
  return model


def torch_device(name: str):
  """The torch device for `--torch-device`; on CUDA, fp32 matmuls may use TF32 as XLA's do."""
  import torch  # pylint: disable=g-import-not-at-top

  if name == "cuda":
    if not torch.cuda.is_available():
      raise ValueError("--torch-device=cuda, but torch sees no CUDA device.")
    # XLA's default fp32 dot precision on NVIDIA GPUs is TF32; match it so that both run
    # the same arithmetic.
    torch.set_float32_matmul_precision("high")
  return torch.device(name)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
  """(wall seconds, this process's CPU seconds) of one call, CUDA work included."""
  import torch  # pylint: disable=g-import-not-at-top

  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  if torch.cuda.is_initialized():
    torch.cuda.synchronize()  # torch's CUDA calls return before the GPU has finished.
  return time.perf_counter() - wall, time.process_time() - cpu
