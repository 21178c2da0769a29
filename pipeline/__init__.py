"""mailpipe: order and signup files → documented email-platform payloads."""

__version__ = "0.1.0"


def _prefer_jemalloc() -> None:
    """Arrow's jemalloc pool: measured faster than mimalloc here, with fewer page faults.

    An explicit ARROW_DEFAULT_MEMORY_POOL still wins.
    """
    import os

    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except (NotImplementedError, pa.ArrowNotImplementedError):  # a build without jemalloc
        pass


_prefer_jemalloc()
