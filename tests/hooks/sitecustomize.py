"""Test-only fault injection for lorascale subprocesses (put this directory first on PYTHONPATH).

LORASCALE_TEST_FAULT selects what happens when the worker is asked for its SECOND matrix, after the first
one finished (so some results exist):
  block:<marker>   create <marker>, then wait forever (the test sends a signal)
  fill:<path>      fill the file system holding <path> until it is full, then continue (disk full)
Nothing here is imported by lorascale itself.
"""

import os

_FAULT = os.environ.get("LORASCALE_TEST_FAULT", "")

if _FAULT:
    import time

    import lorascale.analyses.compare as _worker

    _original = _worker.analyse_job
    _calls = [0]

    def _faulty(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == 2:
            kind, _, where = _FAULT.partition(":")
            if kind == "block":
                open(where, "w").close()
                while True:
                    time.sleep(0.05)
            elif kind == "fill":
                handle = open(where, "wb", buffering=0)
                try:
                    while True:
                        handle.write(b"\0" * 4096)
                except OSError:
                    pass
                finally:
                    handle.close()
        return _original(*args, **kwargs)

    _worker.analyse_job = _faulty
