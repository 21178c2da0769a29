"""The floor: pyarrow reads the rows, orjson writes them, no logic at all.

python bench/floor.py IN.csv OUT.jsonl
"""

from __future__ import annotations

import sys

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    reader = pacsv.open_csv(
        src,
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in pacsv.open_csv(src).schema.names}
        ),
    )
    n = 0
    with open(dst, "wb") as out:
        for batch in reader:
            rows = batch.to_pylist()
            out.write(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
            n += len(rows)
    print(f"{n} rows")


if __name__ == "__main__":
    main()
