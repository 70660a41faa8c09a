"""The one compiled part of raycache: the frequency sketch's counter steps (see pyproject.toml for
everything else). `optional=True`: where no C compiler is at hand the install goes on and
`cluster.policies.sketch` uses its pure-Python steps, slower and otherwise the same."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cluster.policies._sketch_core",
            ["cluster/policies/_sketch_core.c"],
            optional=True,
        )
    ]
)
