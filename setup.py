"""The package list, which pyproject.toml cannot state: the evaluation configs stay in the top-level
``eval_configs/`` of the source tree and ship as ``mimbench/eval_configs/`` (mimbench.paths finds them there);
everything else is in pyproject.toml."""
from setuptools import find_namespace_packages, setup

CONFIGS = "mimbench.eval_configs"

setup(
    packages=find_namespace_packages(include=["mimbench*", "pretrain*"])
    + [CONFIGS] + [f"{CONFIGS}.{sub}" for sub in find_namespace_packages(where="eval_configs")],
    package_dir={CONFIGS: "eval_configs"},
)
