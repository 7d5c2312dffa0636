"""Virtual environments of the competitors the benchmarks run beside Fermion.

A competitor whose pins clash with Fermion's (KServe and BentoML pin fastapi,
uvicorn, starlette and pydantic) gets a virtual environment of its own under
``.bench-venvs/<name>``, made and filled with pip from the package registries on
first use and reused while its requirements stay the same. ONNX Runtime and
numpy are pinned to the versions Fermion's environment has, so every server
runs the same kernels.

    python -m bench.competitors kserve      # make it now; prints its Python
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

__all__ = ["COMPETITORS", "competitor_python", "requirements"]

_ROOT = Path(__file__).resolve().parent.parent
#: Competitor -> what its environment needs besides ONNX Runtime and numpy.
COMPETITORS: dict[str, list[str]] = {
    "kserve": ["kserve==0.21.0"],
    "bentoml": ["bentoml==1.4.40"],
}


def requirements(name: str) -> list[str]:
    """The pip requirements of ``name``'s environment."""
    if name not in COMPETITORS:
        raise KeyError(f"unknown competitor {name!r}; known: {sorted(COMPETITORS)}")
    return [
        *COMPETITORS[name],
        f"onnxruntime=={version('onnxruntime')}",
        f"numpy=={version('numpy')}",
    ]


def competitor_python(name: str, root: Path = _ROOT / ".bench-venvs") -> Path:
    """The Python of ``name``'s environment, made (once) if missing or out of date."""
    wanted = "\n".join(requirements(name)) + "\n"
    venv = root / name
    python = venv / "bin" / "python"
    stamp = venv / "fermion-bench-requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"bench: installing {name} into {venv} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements(name)], check=True)
    stamp.write_text(wanted)
    return python


if __name__ == "__main__":
    for competitor in sys.argv[1:] or sorted(COMPETITORS):
        print(competitor_python(competitor))
