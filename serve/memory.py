"""The server's memory: why it stops growing, and what it says about its allocator.

    configure(131072)   # once, before the model loads: glibc's mmap threshold held at 128 KiB
    describe()          # the allocator and the setting, as the startup log and GET /info say them
    proc_status_mb()    # {"rss_mb": ..., "rss_anon_mb": ..., ...} from /proc/self/status
    mallinfo2()         # glibc's account of its heap, in MB (bench/memory_probe.py)

Why (measured in BENCHMARKS.md, explained in docs/serving.md#memory): glibc's malloc serves a block
above its mmap threshold (128 KiB at first) with an mmap of its own, returned to the OS when freed,
and everything smaller from its heap (one arena per thread, up to 8 per core). Each time a block it
had mmapped is freed, glibc raises the threshold to that block's size, up to 32 MiB, to save the
next mmap. After the first batches, the activations of a forward pass (2-10 MB each) therefore come
from the batching worker's arena instead. Between them sit small long-lived blocks: above all the
primitives oneDNN caches for GELU, one per tensor shape (up to 1,024), and a packed batch has a new
shape almost every time. A freed activation next to one of those cannot be merged with its
neighbours or handed back, and the next batch, of another size, often does not fit in the hole: the
arena grows by a few MB every few dozen batches, without end. In use, the memory barely changed
(+20 MB in 1,000 requests); freed but kept, it grew by hundreds of MB.

The remedy is glibc's own setting, made in-process with mallopt: the threshold held fixed at
glibc's initial 128 KiB. Activations then get their own mmap every time and go back to the OS as
soon as they are freed, whatever their neighbours; only the small blocks stay in the heap. Under
another malloc (jemalloc or tcmalloc through LD_PRELOAD), or another C library, nothing is set.
"""

import ctypes
import logging
import os
import platform
from functools import lru_cache

log = logging.getLogger("memory")

MB = 2**20
# mallopt's parameter numbers (glibc's malloc.h), and glibc's defaults for the two the server resets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_TRIM_THRESHOLD = 128 * 1024  # free memory at the heap's top beyond this goes back to the OS
GLIBC_MMAP_MAX = 65536  # mmapped blocks at once; cpu_speed.reuse_freed_memory sets 0 (none) for training
GLIBC_MMAP_THRESHOLD_MAX = 32 * MB  # what mallopt accepts at most on 64-bit (HEAP_MAX_SIZE / 2)
ENV_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable: a user's value wins over ours


# -----------------------------------------------------------------------------
# the C library and the allocator in use


@lru_cache(maxsize=1)
def glibc():
    """The C library, if it is glibc (Linux); else None (macOS, musl)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


class DlInfo(ctypes.Structure):
    """dladdr's Dl_info: which loaded library holds an address."""
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def malloc_library():
    """The file of the library whose malloc answers this process's calls: glibc's libc.so.6, or a
    malloc preloaded before it (LD_PRELOAD=libjemalloc.so.2, say). None where it cannot be told."""
    try:
        process = ctypes.CDLL(None)  # every loaded library, in lookup order: what a call to malloc reaches
        address = ctypes.cast(process.malloc, ctypes.c_void_p)
        info = DlInfo()
        if not process.dladdr(address, ctypes.byref(info)):
            return None
        return info.dli_fname.decode()
    except (AttributeError, OSError):
        return None


def allocator_name():
    """"glibc 2.36", "jemalloc (/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)", or the C library's own."""
    library = malloc_library()
    if library is not None and "libc.so" not in os.path.basename(library):
        known = [name for name in ("jemalloc", "tcmalloc", "mimalloc") if name in os.path.basename(library)]
        return f"{known[0] if known else 'a preloaded malloc'} ({library})"
    name, version = platform.libc_ver()
    return f"{name} {version}".strip() if name else f"the C library's malloc ({platform.system()})"


def uses_glibc_malloc():
    return glibc() is not None and allocator_name().startswith("glibc")


# -----------------------------------------------------------------------------
# the setting


@lru_cache(maxsize=None)
def configure(mmap_threshold):
    """Hold glibc's mmap threshold at `mmap_threshold` bytes (0: leave glibc's dynamic threshold), once
    per process, before the model loads. mallopt is process-wide: it holds for everything else in
    the process too. Also resets the two settings cpu_speed.reuse_freed_memory changes for training
    (no mmap at all, nothing returned below 2 GB free) to glibc's defaults: a process that trained
    first would otherwise serve with them, and keep its peak for good."""
    if not uses_glibc_malloc():
        log.info("memory: %s answers malloc; --malloc_mmap_threshold is glibc's, not applied", allocator_name())
    elif ENV_THRESHOLD in os.environ:
        log.info("memory: %s malloc, mmap threshold %s bytes from %s in the environment (glibc applied it)",
                 allocator_name(), os.environ[ENV_THRESHOLD], ENV_THRESHOLD)
    elif mmap_threshold == 0:
        log.warning("memory: %s malloc with its dynamic mmap threshold (--malloc_mmap_threshold 0): the "
                    "server's memory grows with the shapes it has seen (docs/serving.md#memory)", allocator_name())
    else:
        libc = glibc()
        applied = (libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX) and libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
                   and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
        if not applied:
            raise RuntimeError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {mmap_threshold})")
        log.info("memory: %s malloc; blocks over %s get an mmap of their own, returned to the OS when freed "
                 "(mmap threshold held fixed: docs/serving.md#memory)", allocator_name(), size_text(mmap_threshold))


def describe(mmap_threshold=None):
    """What GET /info says under "memory": the allocator, the mmap threshold in force and who set it,
    and the resident memory now and at its peak."""
    if not uses_glibc_malloc():
        threshold, source = None, "not glibc's malloc: not applied"
    elif ENV_THRESHOLD in os.environ:
        value = os.environ[ENV_THRESHOLD]
        threshold, source = int(value) if value.isdigit() else value, f"{ENV_THRESHOLD} in the environment"
    elif not mmap_threshold:
        threshold, source = None, "glibc's dynamic threshold (128 KiB, raised up to 32 MiB by each freed block)"
    else:
        threshold, source = mmap_threshold, "held fixed by the server (--malloc_mmap_threshold)"
    return {"allocator": allocator_name(), "mmap_threshold": threshold, "mmap_threshold_set_by": source,
            **(proc_status_mb() if os.path.exists("/proc/self/status") else {})}


def check_mmap_threshold(value):
    """The flag's bounds: 0 (glibc's dynamic threshold) or 1 byte to 32 MiB, what mallopt accepts."""
    if not 0 <= value <= GLIBC_MMAP_THRESHOLD_MAX:
        raise ValueError(f"--malloc_mmap_threshold must be 0 (glibc's dynamic threshold) or between 1 and "
                         f"{GLIBC_MMAP_THRESHOLD_MAX} bytes (32 MiB, glibc's maximum), not {value}")


def size_text(n):
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} bytes"


# -----------------------------------------------------------------------------
# measurements


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc 2.33+): every field a size_t, in bytes."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mallinfo2():
    """glibc's heap, summed over its arenas, in MB: in_use (allocated and not freed), free_kept (freed
    but still held in the arenas), mmapped (blocks served by their own mmap), arena (heap bytes from the
    OS). None without glibc 2.33+ (and all 0 when another malloc answers)."""
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return {"in_use": round(info.uordblks / MB, 1), "free_kept": round(info.fordblks / MB, 1),
            "mmapped": round(info.hblkhd / MB, 1), "arena": round(info.arena / MB, 1)}


def proc_status_mb(pid="self"):
    """Resident memory of a process in MB, from /proc/<pid>/status: all of it, anonymous, file-backed,
    and its peak."""
    fields = {"VmRSS": "rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb", "VmHWM": "peak_rss_mb"}
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                out[fields[name]] = round(int(value.split()[0]) / 1024, 1)
    return out
