"""Lay out the installed `smily` namespace as a tree of symlinks, for checkers
that read packages from folders and cannot see setuptools' package-dir mapping
(mypy, import-linter): build/namespace/smily/tiler/server.py -> services/tiler/server.py.

    python tools/namespace.py                  lay out build/namespace
    python tools/namespace.py mypy             ... then type-check it
    python tools/namespace.py lint-imports     ... then check the import contracts

Paths in a checker's output are mapped back to the files in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "namespace")
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
BANNER = "╔╗╚╝║═╣╠╦╩╬─│▶◀▲└┘┐┌ "
CHECKERS = {
    "mypy": [sys.executable, "-m", "mypy"],
    # import-linter puts its working directory first on sys.path: run it in the tree.
    "lint-imports": [
        sys.executable,
        "-c",
        "from importlinter.cli import lint_imports_command as c; c()",
        "--config",
        PYPROJECT,
    ],
}


def package_dirs() -> dict[str, str]:
    """Package name -> folder, as setuptools maps them (pyproject.toml)."""
    with open(PYPROJECT, "rb") as fh:
        tool = tomllib.load(fh)["tool"]["setuptools"]
    out: dict[str, str] = {}
    for pkg in tool["packages"]:
        parent, _, name = pkg.rpartition(".")
        # A listed package without its own entry lives in its parent's folder.
        out[pkg] = tool["package-dir"].get(pkg) or os.path.join(out[parent], name)
    return out


def build() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for pkg, folder in package_dirs().items():
        target = os.path.join(OUT, *pkg.split("."))
        os.makedirs(target, exist_ok=True)
        src = os.path.join(ROOT, folder)
        for name in sorted(os.listdir(src)):
            if name.endswith((".py", ".pyi")):
                os.symlink(os.path.join(src, name), os.path.join(target, name))


def run(checker: str) -> int:
    cwd = OUT if checker == "lint-imports" else ROOT
    proc = subprocess.run(CHECKERS[checker], cwd=cwd, capture_output=True, text=True)
    prefix = os.path.relpath(OUT, ROOT) + os.sep
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and not line.strip(BANNER):  # import-linter's logo
            continue
        if line.startswith(prefix):
            path, sep, rest = line.partition(":")
            line = os.path.relpath(os.path.realpath(os.path.join(ROOT, path)), ROOT) + sep + rest
        print(line)
    return proc.returncode


if __name__ == "__main__":
    build()
    if len(sys.argv) > 1:
        if sys.argv[1] not in CHECKERS:
            sys.exit(f"usage: {sys.argv[0]} [{'|'.join(CHECKERS)}]")
        sys.exit(run(sys.argv[1]))
