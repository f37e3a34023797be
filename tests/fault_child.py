"""Runs the CLI (`python -m jaxprune.main ARGS`) and signals itself when a watched path changes:
`python tests/fault_child.py SIGNAL PATH DELAY -- ARGS...` (used by faults_test.py).

PATH is a folder of checkpoint steps (it changes when a finished step that was not there at the
start appears) or a file (it changes when it appears or its mtime moves). SIGNAL is sent DELAY
seconds after the change. The watcher is a thread of the CLI's own process, polling every
millisecond, so the signal lands within milliseconds of the change however loaded the machine is;
a watcher in another process can be descheduled long enough for a short phase to finish first.
"""
import os
import runpy
import sys
import threading
import time


def steps(folder: str) -> frozenset:
    """Finished checkpoint steps in `folder` (not the temporary folders of unfinished saves)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return frozenset(n for n in names if n.isdigit())


def _state(path: str):
    if os.path.isdir(path) or not os.path.splitext(path)[1]:
        return steps(path)
    try:
        return os.path.getmtime(path)
    except OSError:  # not there (yet, or for a moment while it is replaced)
        return None


def _changed(before, now) -> bool:
    if isinstance(before, frozenset):
        return bool(now - before)
    return now != before


def _watch(sig: int, path: str, delay: float) -> None:
    before = _state(path)
    while not _changed(before, _state(path)):
        time.sleep(0.001)
    time.sleep(delay)
    os.kill(os.getpid(), sig)


if __name__ == "__main__":
    sig, path, delay, sep, *args = sys.argv[1:]
    assert sep == "--", sys.argv
    threading.Thread(target=_watch, args=(int(sig), path, float(delay)), daemon=True).start()
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # as `python -m`
    sys.argv = ["jaxprune.main", *args]
    runpy.run_module("jaxprune.main", run_name="__main__", alter_sys=True)
