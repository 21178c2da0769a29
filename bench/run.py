"""`make bench`: mailpipe against a naive per-row script and the pyarrow+orjson floor.

Measures, each in its own process (wall time, CPU time and peak RSS from
``wait4``):

* **naive** — ``bench/naive.py``: csv.DictReader + email_validator +
  json.dumps per row (run on the first 200,000 rows: it is linear, and slow);
* **floor** — ``bench/floor.py``: pyarrow read + orjson write, no logic;
* **build** — ``mailpipe run --until build`` (extract, normalize, build)
  for the on-demand and the Yesmail job on 1,000,000 order rows, and again on
  5,000,000 rows to show that memory stays flat;
* **simulate** — the whole run in simulate mode for the on-demand job,
  against a store holding 1,000,000 existing subscribers.

Prints rows/s, ratios and the issue's targets, writes ``bench/out/results.json``
and compares with ``bench/baseline.json`` (a drop of more than 25% is flagged).

    python bench/run.py [--quick] [--repeat N] [--only NAME]…

``--quick``: 200k rows, no 5M run. ``--repeat N`` (default 3): naive and the
Yesmail build alternate N times, and the simulate run is made N times; the
ratios are those of the medians, each naive/build pair's ratio printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DATA = BENCH / "data"
OUT = BENCH / "out"
PY = sys.executable
MAILPIPE = [PY, "-m", "pipeline.cli"]


# ext4 without a journal (this machine's disk) does not reuse an inode freed in the last
# 60 s (the kernel's RECENTCY_MIN; 5 minutes more while its inode-table block is still
# dirty, hence the sync first), checking each one it passes: creating 44,000 files of 300
# bytes took 15.5 s 1 s after 44,000 others were deleted and synced, 5.4 s 31 s after,
# 1.4-1.8 s from 46 s on. So no contender's files are deleted before the last one has
# run, and a leftover tree is given this long to age.
FREED_INODES_AGE_S = 65
# The disk is virtual: after `sync` returns, the host still absorbs what was written, and
# for ~10 s the guest's own page-cache writes cost several times their usual kernel time
# (the build's 505 MB: 0.54-0.78 s of sys 15 s after the last run, 1.3-1.6 s 3 s after,
# 1.5-1.9 s 1 s after). So a contender starts this long after the one before stopped,
# and pays for its own writes only.
SETTLE_S = 15


def quiet() -> None:
    """Before a measured run: the page cache written back, the writeback settled."""
    os.sync()
    time.sleep(SETTLE_S)


def runs_dir(name: str) -> Path:
    """A run directory of the contender's own (all are removed at the end, see above)."""
    return OUT / "runs" / name.replace(" ", "-")


def remove_runs(wait: bool) -> None:
    """Remove the contenders' run directories; ``wait``: then let the freed inodes age."""
    if not (OUT / "runs").exists():
        return
    shutil.rmtree(OUT / "runs", ignore_errors=True)
    if wait:
        os.sync()
        print(f"  (waiting {FREED_INODES_AGE_S} s for a removed run tree's inodes to age)")
        time.sleep(FREED_INODES_AGE_S)


def waited(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, Any, float, str, str]:
    """Run a command to its end: (exit code, its ``wait4`` usage, wall seconds, stdout,
    stderr). Its output goes to files, not pipes: a pipe read only after ``wait4``
    would stop a command that writes more than the pipe holds."""
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=fout, stderr=ferr, env={**os.environ, **(env or {})}
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read().decode(), ferr.read().decode()
    return os.waitstatus_to_exitcode(status), usage, wall, out, err


def measure(
    name: str, cmd: list[str], rows: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a command; return rows/s, wall, CPU and peak RSS of that process tree."""
    quiet()
    code, usage, wall, out, err = waited(cmd, env)
    if code not in (0, 1):
        raise SystemExit(f"{name}: exit {code}\n{out}\n{err}")
    cpu = usage.ru_utime + usage.ru_stime
    result = {
        "name": name,
        "rows": rows,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "rows_per_s": round(rows / wall),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }
    print(
        f"  {name:<28} {rows:>9,} rows {wall:8.2f} s {result['rows_per_s']:>10,} rows/s "
        f"cpu {cpu:6.2f} s  rss {result['peak_rss_mb']:7.1f} MB",
        flush=True,
    )
    return result


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, processor, and the time a fixed
    pure-Python loop takes (best of three), so that figures from two machines of the
    same kind can be told apart (they differed by 2.5x on 2026-12-03)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.perf_counter() - t)
    return {"cpus": os.cpu_count(), "cpu_model": model, "python_loop_s": round(best, 3)}


def median_run(tries: list[dict[str, Any]], by: str = "rows_per_s") -> dict[str, Any]:
    """The median of repeated runs of one contender (by ``by``), with every try's
    rows/s (and ``by``) kept beside it."""
    ranked = sorted(tries, key=lambda r: r.get(by) or 0)
    mid = dict(ranked[(len(ranked) - 1) // 2])
    if len(tries) > 1:
        mid["tries_rows_per_s"] = [r["rows_per_s"] for r in tries]
        if by != "rows_per_s":
            mid[f"tries_{by}"] = [r.get(by) for r in tries]
        print(
            f"  {mid['name']:<28} median of {len(tries)}: {mid['rows_per_s']:,} rows/s"
            + (f", {by} {mid.get(by)}" if by != "rows_per_s" else "")
        )
    return mid


def fresh(db: Path) -> None:
    """No SQLite store at ``db``: the file, its ledger's file and any WAL an earlier run
    left beside them (a copied database next to an old WAL is a corrupt one)."""
    from pipeline.store import ledger_url, sqlite_file

    ledger = sqlite_file(ledger_url(f"sqlite:///{db}"))
    for base in (db, ledger):
        for extra in ("", "-wal", "-shm"):
            Path(f"{base}{extra}").unlink(missing_ok=True)


def stage_seconds(runs_dir: Path) -> dict[str, float]:
    """The stage times the run wrote to its manifest (extract, normalize and build run
    together: one figure, ``build``)."""
    manifests = sorted(runs_dir.glob("*/manifest.json"))
    if not manifests:
        return {}
    stages = orjson.loads(manifests[-1].read_bytes()).get("stages", {})
    return {
        k: v["seconds"]
        for k, v in stages.items()
        if k not in ("extract", "normalize") and v.get("seconds") is not None
    }


def ensure_orders(rows: int) -> Path:
    """The generated orders file (made once; the generator is deterministic)."""
    path = DATA / f"orders-{rows}.csv"
    if not path.exists():
        subprocess.run([PY, str(BENCH / "generate.py"), str(rows), str(path)], check=True, cwd=ROOT)
    return path


def ensure_store(subscribers: int) -> Path:
    db = DATA / f"store-{subscribers}.db"
    if db.exists():  # made by an earlier mailpipe: migrate it once, not in every measured run
        subprocess.run(
            [PY, "-c", f"from pipeline.store import Store; Store('sqlite:///{db}').close()"],
            check=True,
            cwd=ROOT,
        )
    else:
        sys.path.insert(0, str(BENCH))
        sys.path.insert(0, str(ROOT))
        from generate import fill_store

        t = time.perf_counter()
        fill_store(db, "shop", subscribers)
        print(f"  store with {subscribers:,} subscribers in {time.perf_counter() - t:.1f}s")
    return db


def mailpipe_env(orders: Path, store: Path, out: Path) -> dict[str, str]:
    return {
        "MAILPIPE_SOURCES_ORDERS_PATH": str(orders),
        "MAILPIPE_STORE_URL": f"sqlite:///{store}",
        "MAILPIPE_RUN_OUT": str(out),
    }


def compiled_sources() -> None:
    """Byte-compile mailpipe's modules, as a regular (non-editable) install does.

    An editable install leaves them as sources, and where PYTHONDONTWRITEBYTECODE
    is set (as on this machine) every mailpipe process compiled its ~30 modules
    again: 45 ms of a 0.41 s start. Sources changed since are still compiled.
    """
    import compileall

    compileall.compile_dir(str(ROOT / "pipeline"), quiet=1)


def main() -> None:
    compiled_sources()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200k rows, no 5M run")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="measure the contenders behind a target ratio N times, interleaved, and "
        "report medians (default 3)",
    )
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only the contenders whose name contains NAME (repeatable); "
        "the ratios take the others from bench/baseline.json",
    )
    args = ap.parse_args()
    rows = 200_000 if args.quick else 1_000_000
    naive_rows = min(rows, 200_000)
    OUT.mkdir(parents=True, exist_ok=True)
    orders = ensure_orders(rows)
    config = str(BENCH / "bench.toml")
    results: dict[str, Any] = {"rows": rows, "machine": machine(), "runs": {}}
    print(f"mailpipe benchmark, {rows:,} order rows ({orders.name})")
    runs = results["runs"]

    def on(name: str) -> bool:
        return not args.only or any(w in name for w in args.only)

    def naive() -> dict[str, Any]:
        return measure(
            "naive (200k rows)",
            [
                PY,
                str(BENCH / "naive.py"),
                str(orders),
                str(OUT / "naive.jsonl"),
                "--rows",
                str(naive_rows),
            ],
            naive_rows,
        )

    if on("floor"):
        runs["floor"] = measure(
            "floor (pyarrow+orjson)",
            [PY, str(BENCH / "floor.py"), str(orders), str(OUT / "floor.jsonl")],
            rows,
        )
    remove_runs(wait=True)  # left by an interrupted run of this script
    scratch_store = OUT / "scratch.db"  # the build runs' (empty) ledger: made afresh, once
    fresh(scratch_store)
    subprocess.run(
        [PY, "-c", f"from pipeline.store import Store; Store('sqlite:///{scratch_store}').close()"],
        check=True,
        cwd=ROOT,
    )

    def build(job: str, attempt: int) -> dict[str, Any]:
        out = runs_dir(f"build {job} {attempt}")
        got = measure(
            f"build {job}",
            [*MAILPIPE, "run", "--config", config, "--job", job, "--until", "build"],
            rows,
            mailpipe_env(orders, scratch_store, out),
        )
        got["stages"] = stage_seconds(out)
        return got

    if on("build order-confirmation"):
        runs["build order-confirmation"] = build("order-confirmation", 0)
    # the two runs behind the build-vs-naive ratio alternate, so both see the same
    # machine (this one's speed drifts within the hour); the figures are their medians
    pairs: dict[str, list[dict[str, Any]]] = {"naive": [], "build order-followup": []}
    for attempt in range(max(1, args.repeat)):
        if on("naive"):
            pairs["naive"].append(naive())
        if on("build order-followup"):
            pairs["build order-followup"].append(build("order-followup", attempt))
    for name, tries in pairs.items():
        if tries:
            runs[name] = median_run(tries)
    if not args.quick and on("build 5M"):
        big = ensure_orders(5_000_000)
        runs["build 5M"] = measure(
            "build order-followup 5M",
            [*MAILPIPE, "run", "--config", config, "--job", "order-followup", "--until", "build"],
            5_000_000,
            mailpipe_env(big, scratch_store, runs_dir("build 5M")),
        )
    if on("simulate order-confirmation"):
        store = ensure_store(1_000_000)
        work_store = OUT / "store.db"
        tries = []
        for attempt in range(max(1, args.repeat)):
            fresh(work_store)
            shutil.copy(store, work_store)
            out = runs_dir(f"simulate {attempt}")
            got = measure(
                "simulate order-confirmation",
                [*MAILPIPE, "run", "--config", config, "--job", "order-confirmation"],
                rows,
                mailpipe_env(orders, work_store, out),
            )
            got["stages"] = stages = stage_seconds(out)
            if stages.get("build"):
                got["deliver_vs_build"] = round(stages["deliver"] / stages["build"], 2)
            print(
                "    stages: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
                + "  (target: deliver, the engine, no more than build)"
            )
            tries.append(got)
        runs["simulate order-confirmation"] = median_run(tries, "deliver_vs_build")
        # the deliver stage alone, in a process of its own (its CPU time and memory), on a
        # run built for it (until build, not measured) and a fresh copy of the store.
        # Delivering the simulate run's directory again overwrote its 44,224 response
        # files: 7.0-8.6 s against ~5 s for the same stage writing them new
        fresh(work_store)
        alone = runs_dir("simulate deliver stage")
        build_only = ["run", "--config", config, "--job", "order-confirmation", "--until", "build"]
        code, _, _, _, built_err = waited(
            [*MAILPIPE, *build_only], mailpipe_env(orders, work_store, alone)
        )
        if code != 0:
            raise SystemExit(f"simulate deliver stage, its build: exit {code}\n{built_err}")
        (run_dir,) = alone.iterdir()
        fresh(work_store)
        shutil.copy(store, work_store)
        runs["simulate deliver stage"] = measure(
            "simulate deliver stage",
            [*MAILPIPE, "deliver", str(run_dir)],
            rows,
            mailpipe_env(orders, work_store, alone),
        )
    remove_runs(wait=False)
    report(results)


def report(results: dict[str, Any]) -> None:
    baseline_path = BENCH / "baseline.json"
    baseline = orjson.loads(baseline_path.read_bytes()) if baseline_path.exists() else {}
    base = baseline.get("runs", {})
    runs = {**base, **results["runs"]}
    naive = runs["naive"]["rows_per_s"]
    floor = runs["floor"]["rows_per_s"]
    build = runs["build order-followup"]["rows_per_s"]
    ratios = {
        "build_vs_naive": round(build / naive, 1),
        "floor_vs_build": round(floor / build, 2),
        "build_rss_mb": runs["build order-followup"]["peak_rss_mb"],
        "build_5m_rss_mb": runs.get("build 5M", {}).get("peak_rss_mb"),
        "simulate_rows_per_s": runs["simulate order-confirmation"]["rows_per_s"],
    }
    sim = runs["simulate order-confirmation"]
    stages = sim.get("stages") or {}
    if sim.get("deliver_vs_build"):
        ratios["deliver_vs_build"] = sim["deliver_vs_build"]
    elif stages.get("build"):
        ratios["deliver_vs_build"] = round(stages["deliver"] / stages["build"], 2)
    pair_n = results["runs"].get("naive", {}).get("tries_rows_per_s")
    pair_b = results["runs"].get("build order-followup", {}).get("tries_rows_per_s")
    if pair_n and pair_b and len(pair_n) == len(pair_b):
        # each build against the naive run just before it: the spread the machine gives
        ratios["build_vs_naive_pairs"] = [round(b / n, 1) for n, b in zip(pair_n, pair_b)]
    results["ratios"] = ratios
    print("\nratios and targets")
    pairs = ratios.get("build_vs_naive_pairs")
    print(
        f"  build vs naive     {ratios['build_vs_naive']:>6}x   (target >= 14x)"
        + (f"; run by run: {', '.join(f'{r}x' for r in pairs)}" if pairs else "")
    )
    print(f"  floor vs build     {ratios['floor_vs_build']:>6}x   (target <= 3x)")
    print(
        f"  build peak RSS     {ratios['build_rss_mb']:>6} MB (target <= 500 MB; "
        f"5M: {ratios['build_5m_rss_mb']} MB, target no higher)"
    )
    print(
        f"  simulate           {ratios['simulate_rows_per_s']:>6,} rows/s "
        f"(build {runs['build order-confirmation']['rows_per_s']:,} rows/s)"
    )
    alone = runs.get("simulate deliver stage")
    if alone:
        built = runs["build order-confirmation"]
        ratios["deliver_cpu_vs_build_cpu"] = round(alone["cpu_seconds"] / built["cpu_seconds"], 2)
        print(
            f"  deliver alone      {alone['seconds']:.2f} s wall, {alone['cpu_seconds']:.2f} s CPU "
            f"(build: {built['seconds']:.2f} s wall, {built['cpu_seconds']:.2f} s CPU)"
        )
    if "deliver_vs_build" in ratios:
        print(
            f"  simulate deliver   {ratios['deliver_vs_build']:>6}x the build stages' time "
            "(target <= 1x)"
        )
    (OUT / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if base:
        print("\nagainst bench/baseline.json")
        then = baseline.get("machine", {}).get("python_loop_s")
        now = results["machine"].get("python_loop_s")
        if then and now:
            speed = then / now
            print(f"  (this machine runs a Python loop {speed:.2f}x as fast as the baseline's)")
        else:
            print("  (the baseline does not say how fast its machine was: compare with care)")
        for name, r in results["runs"].items():
            if name in base:
                change = r["rows_per_s"] / base[name]["rows_per_s"] - 1
                flag = "  <-- slower by more than 25%" if change < -0.25 else ""
                print(f"  {name:<28} {change:+7.1%}{flag}")
    print(f"\nwritten: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
