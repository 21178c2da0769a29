"""Start-up: what `mailpipe run` imports before it reads a row (every run pays for it)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import pyarrow as pa
import pipeline.cli, pipeline.run, pipeline.normalize, pipeline.build
pa.array(["a", None])
print("pandas" in sys.modules)
"""


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def test_pyarrow_does_not_import_pandas_to_convert_python_objects() -> None:
    assert _run(PROBE) == "False"


def test_pandas_still_comes_when_something_converts_to_it() -> None:
    code = PROBE + "print(type(pa.array(['x']).to_pandas()).__name__)\n"
    assert _run(code).splitlines() == ["False", "Series"]


REUSE = """
import resource
import pipeline
import pyarrow as pa
import pyarrow.compute as pc
x = pa.array(range(2_000_000))
pc.add(x, 1)  # the first 16 MB result faults its pages in
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    y = pc.add(x, 1)
    del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_arrow_memory_is_reused_without_faulting_it_in_again() -> None:
    # jemalloc's default handed each freed 16 MB result back to the kernel, and the
    # next one faulted its ~3,900 pages in again: ~78,000 page faults in this loop
    assert int(_run(REUSE)) < 2_000


RELEASE = """
import re
import numpy as np
import pipeline

def anon_mb():
    text = open("/proc/self/smaps_rollup").read()
    return int(re.search(r"^Anonymous:\\s+(\\d+) kB", text, re.M).group(1)) // 1024

heap = [np.ones(1_000_000) for _ in range(12)]  # 8 MB each: below the mmap threshold
del heap
kept = anon_mb()
pipeline.release_memory()
print(kept - anon_mb())
"""


def test_the_heap_a_finished_stage_freed_goes_back_to_the_kernel() -> None:
    # the 96 MB freed above stay on glibc's heap for reuse (a trim threshold of 1 GB)
    # until released
    assert int(_run(RELEASE)) > 80
