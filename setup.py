"""The code folders sit at the top of the repository but install under the hkdbench namespace, so nothing called
'benchmark' or 'analysis' lands in site-packages. Their packages are found, not listed: a new subpackage (a folder
with an __init__.py) is in the wheel without an edit here. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

CODE_FOLDERS = ("methods", "benchmark", "analysis")

packages = ["hkdbench"]
package_dir = {"hkdbench": "hkdbench"}
for folder in CODE_FOLDERS:
    package_dir[f"hkdbench.{folder}"] = folder
    packages += [f"hkdbench.{folder}"] + [f"hkdbench.{folder}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
