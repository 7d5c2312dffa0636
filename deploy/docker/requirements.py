"""Print the serving image's requirements from pyproject.toml: the dependencies and extras.

The image installs them before the sources are copied, so that a code change never
rebuilds the dependency layer. Usage: ``python3 requirements.py EXTRA ...``.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The project's dependencies and those of ``extras``, in file order."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in {pyproject} (it has {sorted(optional)})")
        wanted.extend(optional[extra])
    return wanted


if __name__ == "__main__":
    print("\n".join(requirements(Path("pyproject.toml"), sys.argv[1:])))
