"""HAT: pip install -e '.[dev]' (see the Makefile for the one-command setup)."""
from setuptools import find_packages, setup

setup(
    name="hat",
    version="0.1.0",
    description="Config-driven training of models that run as integer programs on J5-class accelerators",
    python_requires=">=3.10",
    packages=find_packages(include=["hat", "hat.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "tensorboard>=2.10",
        "scikit-learn>=1.0",
        "tqdm>=4.60",
        "numpy>=1.23",
    ],
    extras_require={"dev": ["pytest>=7"]},
)
