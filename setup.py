"""Build script; the package metadata lives in pyproject.toml.

The native op's C++/CUDA sources (``csrc/``) are not compiled here: ``fused_trim.native`` compiles
them on first use against the torch that is installed and caches the library per machine. So the
build needs no torch (pip's isolated build environment never downloads one) and a torch upgrade
never leaves a stale binary behind. Wheels and non-editable installs carry the sources as package
data (``fused_trim/_csrc``); editable installs use ``csrc/`` in the checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"


class BuildPyWithNativeSources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not CSRC.is_dir():
            return
        dest = Path(self.build_lib) / "fused_trim" / "_csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.rglob("*")):  # csrc/ and its subfolders (csrc/cpu/*.h)
            if src.is_file() and src.suffix in (".cpp", ".cu", ".h", ".cuh"):
                out = dest / src.relative_to(CSRC)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)


setup(cmdclass={"build_py": BuildPyWithNativeSources})
