"""mailpipe: order and signup files → documented email-platform payloads."""

__version__ = "0.1.0"


def _prefer_jemalloc() -> None:
    """Arrow's jemalloc pool: measured faster than mimalloc here, with fewer page faults.

    An explicit ARROW_DEFAULT_MEMORY_POOL still wins.
    """
    import os

    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    # keep freed pages for reuse (see _reuse_freed_memory); read when libarrow loads
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:-1")
    import contextlib

    import pyarrow as pa

    with contextlib.suppress(NotImplementedError, pa.ArrowNotImplementedError):
        pa.set_memory_pool(pa.jemalloc_memory_pool())  # absent from some builds


def _one_malloc_arena() -> None:
    """One glibc malloc arena for every thread, unless MALLOC_ARENA_MAX says otherwise.

    The stage threads each got an arena of their own (up to 8 a core), and the
    numpy temporaries freed in one stay there: peak RSS crept up with the rows
    of a run (build on 1M rows: 346 MB, 318 MB with one arena, at the same CPU
    time). Must run before any thread starts (pyarrow's too); a no-op without mallopt.
    """
    import os

    if "MALLOC_ARENA_MAX" not in os.environ:
        _mallopt(-8, 1)  # M_ARENA_MAX


def _reuse_freed_memory() -> None:
    """Freed memory kept for the next allocation instead of handed back to the kernel.

    A run allocates and frees chunk-sized buffers over and over. glibc served
    the large ones with ``mmap`` and returned them with ``munmap`` (and trimmed
    its heap), and Arrow's jemalloc returned freed pages at once; every reuse
    then faulted fresh zeroed pages in. With glibc keeping blocks under 32 MB
    on its heap and jemalloc keeping its freed pages (any finite decay time
    still gave them back at once here), the Yesmail build took ~82,000 page
    faults instead of 139,000-173,000 on 1M rows and 149,000 instead of
    604,000 on 5M, at the same peak RSS (324-334 MB at 5M). A process keeps
    its peak memory for reuse rather than giving it back. Must run before
    pyarrow is imported; GLIBC_TUNABLES or JE_ARROW_MALLOC_CONF still win.
    """
    import os

    if "GLIBC_TUNABLES" not in os.environ:
        _mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: glibc's largest
        _mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD
    # jemalloc's part is set in _prefer_jemalloc, where Arrow's pool is chosen


def release_memory() -> None:
    """Hand what glibc's heap holds free back to the kernel, once a stage has finished.

    Within a stage, freed memory is kept for the next chunk (see
    :func:`_reuse_freed_memory`); the next stage allocates for other things, so
    what the stage before kept would only add to the run's peak (1M-row simulate
    run: 850 → 730 MB). Arrow's jemalloc keeps its freed pages: its
    ``release_unused`` gave none back here.
    """
    _glibc("malloc_trim", 0)


def _mallopt(param: int, value: int) -> None:
    """glibc's ``mallopt``; a no-op where the C library has none."""
    _glibc("mallopt", param, value)


def _glibc(name: str, *args: int) -> None:
    """Call a function of the C library by name; a no-op where it has none."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        getattr(ctypes.CDLL(None), name)(*args)


def _one_blas_thread() -> None:
    """numpy's OpenBLAS without its thread pool, unless OPENBLAS_NUM_THREADS says otherwise.

    mailpipe does no linear algebra, yet OpenBLAS starts a thread a core when numpy
    is imported, and those threads spun for ~0.1 s of CPU in every run (2% of a
    1M-row build, `perf`), on cores the stage threads need. Must run before numpy
    is imported (pyarrow imports it).
    """
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class _PandasLater:
    """An import finder that refuses pandas (see :func:`_defer_pandas`)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is imported when it is used")


def _defer_pandas() -> None:
    """Keep pyarrow from importing pandas (0.25 s, 45 MB) only to ask whether a value is one.

    The first ``pa.array()`` of Python objects imports pandas to recognize a
    Series; mailpipe never passes one. With pandas refused during that first
    probe, pyarrow takes it as absent, and imports it for real the first time
    something converts to pandas (``to_pandas()``), as ``pipeline.keyset`` may.
    """
    import sys

    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    finder = _PandasLater()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([None])
    finally:
        sys.meta_path.remove(finder)


_one_malloc_arena()
_reuse_freed_memory()
_one_blas_thread()
_prefer_jemalloc()
_defer_pandas()
