"""Package discovery, the one thing pyproject.toml cannot say: the top-level `kernels/` folder
installs as the subpackage `any4ao.kernels`, next to everything found under `any4ao/`."""

from setuptools import find_packages, setup

kernel_packages = ["any4ao." + name for name in find_packages(include=["kernels", "kernels.*"])]
setup(
    packages=find_packages(include=["any4ao", "any4ao.*"]) + kernel_packages,
    package_dir={"any4ao.kernels": "kernels"},
)
