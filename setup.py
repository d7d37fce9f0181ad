"""Packaging hook: the wheel ships the top-level candidates/ as kerneltune/candidates/ (the seed kernels and the
promoted winners the shipped registry points to). Everything else is in pyproject.toml."""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithCandidates(build_py):
    def run(self) -> None:
        super().run()
        src_root = os.path.join(HERE, "candidates")
        for src in sorted(glob.glob(os.path.join(src_root, "*", "*.py"))):
            dst = os.path.join(self.build_lib, "kerneltune", "candidates", os.path.relpath(src, src_root))
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst)


setup(cmdclass={"build_py": BuildPyWithCandidates})
