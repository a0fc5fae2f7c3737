"""`lorascale` as its console script runs it, except that the run pauses for good once a new matrices part is
on disk, and says so with a file: the test that interrupts a run then signals a driver that is certainly
mid-run, with finished matrices saved and others still to do, however fast or slow the machine is.

    python paused_lorascale.py PAUSE_FILE run --base ... --out ...

The pause sits in the progress callback that `lorascale.pipeline.compare` calls after each result is
stored, so everything around it (Ray, the writer, signal handling, exit codes) is the real command's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> None:
    pause_file = Path(sys.argv.pop(1))
    from lorascale import pipeline
    from lorascale.cli import main as lorascale_main

    real_compare = pipeline.compare

    def compare(request, *args, progress=None, **kwargs):  # noqa: ANN001, ANN202 - compare's own
        parts = Path(request.output.out) / "matrices"
        before = len(list(parts.glob("part-*.parquet")))

        def pausing_progress(done: int, total: int, matrix: str) -> None:
            if progress is not None:
                progress(done, total, matrix)
            if len(list(parts.glob("part-*.parquet"))) > before:
                pause_file.write_text(f"{done}\n")
                while True:  # until the test's signal ends the run
                    time.sleep(0.1)

        return real_compare(request, *args, progress=pausing_progress, **kwargs)

    pipeline.compare = compare
    sys.argv[0] = "lorascale"
    lorascale_main()


if __name__ == "__main__":
    main()
