"""Only the optional C extension lives here; everything else is in pyproject.toml.

``blobchain.layers._speedups`` holds native twins of the per-entry hot loop (docs/compression.md,
"The per-entry path"). ``optional=True``: without a compiler the build warns and the install
goes on, and blobchain runs the pure-Python reference path (same bytes, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "blobchain.layers._speedups",
            sources=["layers/_speedups.c"],
            optional=True,
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        )
    ]
)
