"""Package layout only (metadata is in pyproject.toml): the repository's `configs/` is installed
as `jaxprune/configs/`, so `pipeline.load_config('cifar10:smoke')` works from an installed
package without a second copy of the files in git."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["jaxprune", "jaxprune.*"]) + ["jaxprune.configs"],
      package_dir={"jaxprune.configs": "configs"})
