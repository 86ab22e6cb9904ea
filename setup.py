"""Package layout that pyproject.toml cannot state: the top-level ``sample_data/`` folder is the
package ``napari_uga.sample_data`` (in the wheel at ``napari_uga/sample_data/``; in an editable
install setuptools maps the import to the folder). Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "napari_uga.sample_data"],
    package_dir={"": "src", "napari_uga.sample_data": "sample_data"},
)
