from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "robust_sft" / "version.py").read_text(), version)

setup(
    name="robust_sft",
    version=version["__version__"],
    description="Drop-in robust replacements for TRL's SFTTrainer: TAIA, DELIA, ANIT and safety realignment.",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["robust_sft", "robust_sft.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23,<6",
        "trl>=1.16,<2",
        "peft>=0.21",
        "datasets>=4.0",
        "filelock>=3.12",
        "accelerate>=1.10",
        "gguf>=0.17",
        "tqdm",
        "matplotlib>=3.8",
        "rapidfuzz>=3",
    ],
    extras_require={
        "qlora": ["bitsandbytes>=0.50"],
        "vllm": ["vllm"],
        "eval": ["lm-eval==0.4.13"],
        "dev": [
            "pytest>=8",
            "lm-eval==0.4.13",
            "hypothesis>=6",
            "ruff>=0.6",
            "mkdocs>=1.6",
            "mkdocs-material>=9.5",
            "mkdocstrings-python>=1.10",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6",
        ],
    },
    entry_points={"console_scripts": ["robust-sft=robust_sft.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
