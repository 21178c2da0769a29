"""mailpipe: order and signup files → documented email-platform payloads."""

__version__ = "0.1.0"


def _prefer_jemalloc() -> None:
    """Arrow's jemalloc pool: measured faster than mimalloc here, with fewer page faults.

    An explicit ARROW_DEFAULT_MEMORY_POOL still wins.
    """
    import os

    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    import contextlib

    import pyarrow as pa

    with contextlib.suppress(NotImplementedError, pa.ArrowNotImplementedError):
        pa.set_memory_pool(pa.jemalloc_memory_pool())  # absent from some builds


_prefer_jemalloc()
