"""The batch-file writer: helper processes write every file handed to them, whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.rundir import BatchFileWriter


@pytest.mark.parametrize("writers", [1, 2, 3])
def test_every_file_is_written_whole_whichever_helper_takes_its_chunk(
    tmp_path: Path, writers: int
) -> None:
    expected: dict[str, bytes] = {}
    with BatchFileWriter(str(tmp_path), writers=writers) as files:
        for chunk in range(7):  # more chunks than helpers: each helper gets several
            for b in range(50):
                bid = f"job-{chunk * 50 + b:04d}"
                data = (f'{{"chunk":{chunk},"batch":{b}}}' * (b + 1)).encode()
                files.add(bid, "response", data)
                expected[f"{bid}.response.json"] = data
            files.flush()
        files.flush()  # an empty flush is harmless
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert written == expected
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o600 for name in written)


def test_a_helper_that_cannot_write_fails_the_close_with_its_reason(tmp_path: Path) -> None:
    files = BatchFileWriter(str(tmp_path / "missing"), writers=2)
    files.add("job-0001", "request", b"{}")
    files.flush()
    with pytest.raises(
        OSError, match=r"^writing batch files failed: FileNotFoundError: .*No such file[^\n]*$"
    ):
        files.close()
