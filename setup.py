"""Packaging for cluster workers only: Beam ships dc_tf to Dataflow / Flink / Spark workers
with `--setup_file=./setup.py` (their Python dependencies: `--requirements_file=requirements.txt`).
Locally nothing needs installing: run from the repository root."""

from setuptools import find_packages, setup

setup(name="dc_tf", version="0.6", packages=find_packages(include=["dc_tf", "dc_tf.*"]))
