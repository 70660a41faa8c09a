"""The compiled parts of raycache: the frequency sketch's counter steps and W-TinyLFU's `place`
(see pyproject.toml for everything else). `optional=True`: where no C compiler is at hand the
install goes on and `cluster.local.policies` uses the same steps in Python, slower and otherwise the
same."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cluster.local.policies._sketch_core",
            ["cluster/local/policies/_sketch_core.c"],
            optional=True,
        ),
        Extension(
            "cluster.local.policies._tinylfu_core",
            ["cluster/local/policies/_tinylfu_core.c"],
            optional=True,
        ),
    ]
)
