"""Packaging glue that pyproject.toml cannot express: the repository's ``configs/`` folder is
shipped inside the package as ``latentzoo/configs`` (package data), so a non-editable install
(``pip install .`` or a wheel) finds its configs without a checkout. The checkout keeps
``configs/`` at the root for ``python train.py`` and the tests; ``latentzoo.paths.config_dir``
looks there first."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "latentzoo.configs"],
    package_dir={"": "src", "latentzoo.configs": "configs"},
    package_data={"latentzoo": ["py.typed"], "latentzoo.configs": ["**/*.yaml", "**/*.md"]},
    # machine-specific settings (configs/local/*.yaml are git-ignored) stay on the machine
    exclude_package_data={"latentzoo.configs": ["local/*.yaml"]},
)
