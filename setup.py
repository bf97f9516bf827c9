"""Packaging: `kernels/` (repo root) installs as `peft_fast.kernels`.

A top-level `kernels` module would shadow Hugging Face's own `kernels` package, which
transformers probes for, so the folder is mapped under our namespace here.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["peft_fast", "peft_fast.*"])
setup(
    packages=packages + ["peft_fast.kernels", "peft_fast.data"],
    package_dir={"peft_fast.kernels": "kernels"},
    package_data={"peft_fast": ["data/*.jsonl"]},
    include_package_data=True,
)
