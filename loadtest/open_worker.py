"""A worker process of an open-loop run: ``python -m loadtest.open_worker RESULT.json``.

Reads its job (JSON) on stdin, prints each second's figures as one JSON line on stdout
(the parent merges them into the progress line) and writes its result to RESULT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loadtest.open_runner import EngineJob, run_async, run_job
from loadtest.openloop import Tick

__all__ = ["main"]


def _print_tick(tick: Tick) -> None:
    sys.stdout.write(json.dumps(tick.to_dict()) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    """Run the job on stdin; write its result to ``argv[0]``."""
    job = EngineJob.from_json(sys.stdin.read())
    result = run_async(run_job(job, _print_tick))
    Path(argv[0]).write_text(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
