"""Build script for the optional compiled accelerator ``nodeagent._accel``.

Everything else about the distribution lives in pyproject.toml. The extension links OpenSSL's
libcrypto (Debian: libssl-dev) and is marked optional: where it cannot be built (no compiler, no
headers) the install still succeeds and nodeagent runs its pure-Python data path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nodeagent._accel",
            sources=["nodeagent/_accel.c", "nodeagent/_accel_wg.c"],
            depends=["nodeagent/_accel.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)
