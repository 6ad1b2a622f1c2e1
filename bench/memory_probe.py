"""The web app with a memory probe inside: where its memory goes, sampled on request.

    python -m bench.memory_probe --model_dir DIR --port 8000      # python -m serve's flags
    kill -USR1 <pid>                                              # one JSON line into $PROBE_OUT

bench/soak.py starts the server this way with --probe and sends SIGUSR1 after every 1,000 requests.
Each sample is one JSON line: the process's resident memory from /proc (anonymous and file-backed),
glibc's own account of its heap (mallinfo2: bytes in use, bytes free but kept, bytes in mmapped
blocks; and its arenas, from malloc_info), the threads, Python's objects (gc), and with
PYTHONTRACEMALLOC=1 the memory Python allocated (tracemalloc) and the ten source lines whose
allocations grew most since the first sample. With PROBE_TRIM=1 the last sample (SIGUSR2) also
calls malloc_trim(0) and reports the resident memory after it: what glibc held free but unreturned.

A diagnosis tool, not a production setting: tracemalloc slows Python down by half or more.
"""

import gc
import json
import os
import re
import signal
import sys
import threading
import time
import tracemalloc

from serve.memory import glibc, mallinfo2, proc_status_mb

OUT = os.environ.get("PROBE_OUT", "memory_probe.jsonl")
TRIM = os.environ.get("PROBE_TRIM") == "1"


def malloc_arenas():
    """(number of arenas, [(arena, MB free in it, MB it holds from the OS)]) from glibc's malloc_info XML."""
    libc = glibc()
    if libc is None:
        return None
    path = f"/tmp/malloc_info.{os.getpid()}.xml"
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    with open(path) as f:
        xml = f.read()
    os.unlink(path)
    heaps = re.findall(r'<heap nr="(\d+)">(.*?)</heap>', xml, flags=re.S)
    rows = []
    for nr, body in heaps:
        total = dict(re.findall(r'<total type="(\w+)" count="\d+" size="(\d+)"/>', body))
        system = re.search(r'<system type="current" size="(\d+)"/>', body)
        rows.append((int(nr), round(int(total.get("fast", 0)) / 2**20 + int(total.get("rest", 0)) / 2**20, 1),
                     round(int(system.group(1)) / 2**20, 1) if system else None))
    return len(heaps), rows


class Probe:
    def __init__(self):
        self.first = None  # the first tracemalloc snapshot: growth is measured against it
        self.samples = 0

    def sample(self, trim=False):
        started = time.perf_counter()
        gc.collect()
        row = {"sample": self.samples, "time": time.time(), **proc_status_mb(),
               "threads": len(os.listdir("/proc/self/task")), "gc_objects": len(gc.get_objects())}
        info = mallinfo2()
        if info is not None:
            row["malloc"] = info  # MB: in_use, free_kept (in the arenas), mmapped, arena (heap from the OS)
            row["arenas"] = malloc_arenas()
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            row["python_traced_mb"] = round(current / 2**20, 2)
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if self.first is None:
                self.first = snapshot
            row["python_growth"] = [f"{stat.size_diff / 1024:+.0f} KiB {stat.count_diff:+d} blocks "
                                    f"{stat.traceback.format()[-1].strip()}"
                                    for stat in snapshot.compare_to(self.first, "lineno")[:10]]
        if trim and glibc() is not None:
            glibc().malloc_trim(0)
            row["rss_after_trim_mb"] = proc_status_mb()["rss_mb"]
        row["probe_seconds"] = round(time.perf_counter() - started, 3)
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.samples += 1


def listen(probe):
    """The probe's own thread: SIGUSR1 and SIGUSR2 are blocked everywhere else, and waited for here."""
    while True:
        signum = signal.sigwait({signal.SIGUSR1, signal.SIGUSR2})
        try:
            probe.sample(trim=TRIM and signum == signal.SIGUSR2)
        except Exception as err:  # a probe that fails must say so, not take the server down
            with open(OUT, "a") as f:
                f.write(json.dumps({"error": repr(err)}) + "\n")


def main():
    # Blocked before any other thread starts (torch's, uvicorn's, the worker), so all inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    threading.Thread(target=listen, args=(Probe(),), name="memory-probe", daemon=True).start()
    from serve.app import main as serve_main

    serve_main(sys.argv[1:])


if __name__ == "__main__":
    main()
