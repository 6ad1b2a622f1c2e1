"""The server's memory: why it stops growing, and what it says about it.

    batch_shapes(512, 32, 64)   # 760: the shapes a batch can have when it is padded to a multiple of 64 tokens
    describe(classifier)        # GET /info's "memory": the allocator, oneDNN's cache, the shapes, RSS now and at peak
    log_setup(classifier)       # the startup line saying the same, and a warning where the cache is too small
    proc_status_mb()            # {"rss_mb": ..., "rss_anon_mb": ..., ...} from /proc/self/status
    mallinfo2()                 # glibc's account of its heap, in MB (bench/memory_probe.py)

Why the memory grew (measured in BENCHMARKS.md, explained in docs/serving.md#memory): each new
tensor shape makes oneDNN, which runs torch's GELU on a CPU, create a primitive and keep it in its
cache (up to 1,024). A packed batch had a new shape almost every time (its total token count). glibc
serves the batching worker's activations (2-10 MB each) from that thread's arena, since it raises
its mmap threshold to each large block freed (up to 32 MiB), and the small long-lived primitives sat
between them: the freed activations around them could not be merged or handed back, the next batch,
of another size, often did not fit the holes, and the arena grew for good. In use, the memory barely
changed (+20 MB in 1,000 requests); freed but kept, it grew by hundreds of MB.

The remedy is a bounded shape set (--pad_to_multiple_of, 64 by default): on a CPU, a batch of more
than one text is padded to a multiple of 64 tokens, a packed batch over the model's maximum in all
(serve/packed.py), a padded one per row (serve/classifier.py). A BERT of 512 tokens and batches of
32 texts then has at most 760 shapes, all of them in oneDNN's cache, each created once. What the
arenas still keep after a batch larger than any before, Trimmer hands back (--malloc_trim_interval).
POST /explain's thread trims after each explanation, and pads its text to a multiple of 16 tokens
(serve/explaining.py): its shapes are a bounded set too.
The allocator is glibc's, or whatever the process was started with (LD_PRELOAD), and is named here.
"""

import ctypes
import logging
import math
import os
import platform
import time
from functools import lru_cache

log = logging.getLogger("memory")

MB = 2**20
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")  # read in this order
ONEDNN_CACHE_DEFAULT = 1024  # oneDNN's own capacity, in primitives (doc/advanced/primitive_cache.md)


# -----------------------------------------------------------------------------
# what runs: the allocator, oneDNN's cache, the batches' shapes


def batch_shapes(max_length, max_batch_size, multiple, packed=True):
    """How many shapes a batch can have. Packed: every token count up to `max_length`, then one per
    `multiple` tokens up to max_batch_size texts of max_length. Padded: a text alone, every length up
    to max_length; several, one per `multiple` tokens of the longest, for each number of texts."""
    if packed:
        return max_length + math.ceil(max_batch_size * max_length / multiple) - max_length // multiple
    return max_length + (max_batch_size - 1) * math.ceil(max_length / multiple)


def onednn_cache_capacity():
    """(primitives oneDNN's cache holds, who set it): a variable of the environment, or oneDNN's default.
    oneDNN reads the variable once, at its first primitive: a value set later in the process is ignored."""
    for name in ONEDNN_CACHE_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value), f"{name} in the environment"
    return ONEDNN_CACHE_DEFAULT, "oneDNN's default"


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


class Trimmer:
    """After a batch, at most once every `interval` seconds: glibc's malloc_trim(0), which hands the
    whole pages that are free inside every arena back to the OS (madvise). Without it the arenas keep
    the pages of the largest batch seen so far, and each rarer, larger batch raises that for good (a
    step in the RSS every few thousand requests). What it costs: those pages are zero-filled again
    when the next batches reuse them, once per interval instead of once per batch (BENCHMARKS.md).
    Under another malloc (LD_PRELOAD), nothing is called: it returns memory in its own way."""

    def __init__(self, interval):
        self.interval = interval
        self.enabled = interval > 0 and uses_glibc_malloc()
        self.last = time.monotonic()
        self.trims = 0

    def __call__(self):
        """After a batch: trim if `interval` seconds have passed since the last trim."""
        if time.monotonic() - self.last >= self.interval:
            self.trim()

    def trim(self):
        """Trim now (when enabled): after an explanation, seconds long and the largest allocation."""
        if self.enabled:
            glibc().malloc_trim(0)
            self.last = time.monotonic()
            self.trims += 1


def describe(classifier=None):
    """GET /info's "memory": the allocator, oneDNN's primitive cache, the shapes a batch can have
    (None before the model is loaded, or off the CPU, where oneDNN does not run), RSS now and at its peak."""
    capacity, set_by = onednn_cache_capacity()
    shapes = multiple = None
    if classifier is not None and classifier.device_type == "cpu":
        multiple = classifier.limits.pad_to_multiple_of
        shapes = batch_shapes(classifier.max_length, classifier.limits.max_batch_size, multiple, classifier.packed)
    return {"allocator": allocator_name(), "onednn_primitive_cache_capacity": capacity,
            "onednn_primitive_cache_set_by": set_by, "batch_shapes": shapes, "pad_to_multiple_of": multiple,
            "malloc_trim_interval": classifier.trimmer.interval if classifier and classifier.trimmer.enabled else None,
            "malloc_trims": classifier.trimmer.trims if classifier else 0,
            **(proc_status_mb() if os.path.exists("/proc/self/status") else {})}


def log_setup(classifier):
    """One startup line: the allocator, and whether every shape of a batch fits in oneDNN's cache (a
    warning when it does not: the memory is then not known to stay flat)."""
    info = describe(classifier)
    capacity, shapes, multiple = info["onednn_primitive_cache_capacity"], info["batch_shapes"], info["pad_to_multiple_of"]
    if shapes is None:
        log.info("memory: %s malloc, on a %s", info["allocator"], classifier.device_type)
    elif 0 < capacity < shapes:  # 0: no cache at all, each primitive made and freed at every pass
        log.warning("memory: %s malloc; batches have up to %d shapes (--pad_to_multiple_of %d), more than oneDNN's "
                    "primitive cache holds (%d, %s): primitives are evicted and created again, and the server's "
                    "memory may grow (docs/serving.md#memory)", info["allocator"], shapes, multiple, capacity,
                    info["onednn_primitive_cache_set_by"])
    else:
        log.info("memory: %s malloc; batches of several texts are padded to a multiple of %d tokens (%s): at most "
                 "%d shapes, all in oneDNN's primitive cache of %d (docs/serving.md#memory)", info["allocator"],
                 multiple, "packed, in all, over the model's maximum" if classifier.packed else "per row", shapes,
                 capacity)
    trimmer = classifier.trimmer
    if trimmer.enabled:
        log.info("memory: glibc's malloc_trim after a batch, at most every %g s: freed pages go back to the OS "
                 "(--malloc_trim_interval)", trimmer.interval)
    elif trimmer.interval > 0:
        log.info("memory: %s answers malloc: --malloc_trim_interval is glibc's, not applied", info["allocator"])


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
