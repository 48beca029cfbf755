"""cascade_jax: prune a decoder LM, distill the parent into the child, repeat."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="cascade_jax",
    version="0.1.0",
    description="Cascade distillation (prune, distill, repeat) for decoder LMs in JAX.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["cascade_jax", "cascade_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.18",
        "tensorstore>=0.1.86",
        "einops>=0.8.2",
        "ml_collections>=1.1.0",
        "absl-py>=2.0",
        "etils[epath]>=1.5",
        "safetensors>=0.8.0",
        "ml_dtypes>=0.5",  # float8_e4m3fn, to read FP8 checkpoints (a jax dependency too)
        "tokenizers>=0.23.3",
        "gguf>=0.17",  # llama.cpp's GGUF reader and dequantizers (pure Python + numpy)
        "numpy>=2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": [
            "pytest>=9.0",
            "pytest-xdist>=3.8",
            "ruff>=0.17",
            "torch>=2.13.0",
            "transformers>=5.23.0",
            "accelerate>=1.0",  # transformers' GGUF loader (the reference in test_gguf)
            "nbclient>=0.11",
            "nbformat>=5.11",
            "ipykernel>=7.4",
        ],
    },
)
