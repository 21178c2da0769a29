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
