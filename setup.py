import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# The one version is supermask.__version__; read as text so that building needs no torch.
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "supermask" / "__init__.py").read_text(encoding="utf-8"),
                    re.M).group(1)

setup(
    name="supermask",
    version=VERSION,
    description="Edge-popup supermasks and lottery tickets (IMP) in PyTorch, with Triton kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ folder is supermask.kernels through the link supermask/kernels -> ../kernels,
    # so a plain checkout imports it with no install (the GPU machine gets a bare copy of the tree); a bare
    # "kernels" package would collide with an unrelated distribution of that name on PyPI.
    packages=["supermask", "supermask.kernels"],
    # the C source of the CPU kernels, compiled on first use (supermask/cpu_kernels.py)
    package_data={"supermask": ["cpu_kernels.c"]},
    # safetensors: the compact .smask files; filelock: the run-folder lock (every OS); pyyaml: --config
    install_requires=["torch>=2.4", "torchvision", "numpy", "tqdm", "matplotlib", "safetensors", "filelock",
                      "pyyaml"],
    # TensorBoard event files in every run folder (without it, runs say so once and train on);
    # the tests read them back, so CI installs it with [test]
    extras_require={"tensorboard": ["tensorboard"], "test": ["pytest", "tensorboard"],
                    "hf": ["transformers"]},  # Hugging Face models in convert (tests skip without it)
)
