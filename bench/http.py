"""HTTP delivery against the sandbox vs simulate: recipients/s, same inputs, same starting store.

For each job — ``order-confirmation`` (Maestro on-demand, batches bounded by an
8,000-byte URL) and ``order-followup`` (Yesmail, 300 recipients a request) —
on the benchmark's generated orders:

1. ``mailpipe run --mode simulate`` on a copy of the starting store;
2. ``mailpipe sandbox`` (its own process, on its own copy of the same store)
   and ``mailpipe run --mode http`` against it (the run's ledger on a third
   copy), client and server sharing this machine's cores, ``--repeat`` times
   (default 3), each on fresh copies, from a synced and settled disk;

and prints, for each, the deliver stage's recipients/s (the figure the
targets are about: >= 20,000/s on-demand, >= 50,000/s Yesmail; http the
median of its tries, each try printed too) and the whole run's rows/s, then
checks that every http run's results.jsonl agrees with simulate's (ignoring
times, ticket ids and event times). ``--profile`` samples the first http try's
client and sandbox with py-spy and prints where their time goes.

    python bench/http.py [--rows N] [--job NAME]... [--repeat N] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out" / "http"
PY = sys.executable
MAILPIPE = [PY, "-m", "pipeline.cli"]
CONFIG = str(BENCH / "bench.toml")
TARGETS = {"order-confirmation": 20_000, "order-followup": 50_000}
# client settings for the run against the sandbox
CLIENT_ENV = {
    "MAILPIPE_DELIVERY_HTTP_CONCURRENCY": "512",
    "MAILPIPE_DELIVERY_HTTP_POLL_INTERVAL": "0.005",
    "MAILPIPE_DELIVERY_HTTP_POLL_MAX_INTERVAL": "0.05",
}

sys.path.insert(0, str(BENCH))
from run import (  # noqa: E402
    FREED_INODES_AGE_S,
    compiled_sources,
    ensure_orders,
    ensure_store,
    quiet,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the sandbox did not listen on port {port}") from None
            time.sleep(0.1)


def mailpipe(args: list[str], env: dict[str, str], name: str) -> float:
    """Run a mailpipe command; its wall time. Exit 0 or 1 (rows failed) are fine."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*MAILPIPE, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return wall


def cpu_seconds(pid: int) -> float | None:
    """A running process's CPU time so far (user + system), from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_dir(out: Path) -> Path:
    return sorted(p for p in out.iterdir() if p.is_dir())[-1]


def deliver_rate(d: Path, job: str) -> tuple[int, float]:
    m = orjson.loads((d / "manifest.json").read_bytes())
    return int(m["counts"]["jobs"][job]["recipients"]), float(m["stages"]["deliver"]["seconds"])


def comparable(d: Path) -> list[tuple[Any, ...]]:
    keys = ("index", "status", "result", "error", "message", "reason", "state", "http_status")
    out = []
    for line in (d / "results.jsonl").read_bytes().splitlines():
        r = orjson.loads(line)
        events = [(e["state"], e["message"]) for e in r["events"] or []]
        out.append((*(r[k] for k in keys), tuple(events)))
    return out


def export_env(lines: str) -> dict[str, str]:
    import shlex

    env = {}
    for line in lines.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    return env


def bench_job(
    job: str, orders: Path, store: Path, profile: bool, repeat: int = 1
) -> dict[str, Any]:
    work = OUT / job
    if work.exists():  # left by an interrupted run: its freed inodes slow new files a while
        shutil.rmtree(work, ignore_errors=True)
        os.sync()
        time.sleep(FREED_INODES_AGE_S)
    work.mkdir(parents=True)
    sim_store = work / "simulate.db"
    shutil.copy(store, sim_store)
    quiet()  # the copy written back before anything is measured
    base = {"MAILPIPE_SOURCES_ORDERS_PATH": str(orders)}

    sim_out = work / "simulate-runs"
    sim_env = {
        **base,
        "MAILPIPE_STORE_URL": f"sqlite:///{sim_store}",
        "MAILPIPE_RUN_OUT": str(sim_out),
    }
    sim_wall = mailpipe(
        ["run", "--config", CONFIG, "--job", job, "--mode", "simulate"], sim_env, f"simulate {job}"
    )
    sim_dir = run_dir(sim_out)
    n, sim_deliver = deliver_rate(sim_dir, job)
    sim_store.unlink()
    expected = comparable(sim_dir)

    tries = []
    for attempt in range(max(1, repeat)):
        tried = http_once(job, work / f"http-{attempt}", store, base, profile and attempt == 0)
        tried["same_results"] = comparable(tried.pop("run_dir")) == expected
        tries.append(tried)
        print(
            f"    http try {attempt + 1}: {n / tried['deliver_s']:>8,.0f}/s deliver, "
            f"run {tried['run_s']:.2f} s, CPU sandbox {tried['cpu']['sandbox']} s, "
            f"client {tried['cpu']['client']} s, results equal: {tried['same_results']}",
            flush=True,
        )
    mid = sorted(tries, key=lambda t: t["deliver_s"])[len(tries) // 2]
    result = {
        "job": job,
        "recipients": n,
        "simulate_deliver_per_s": round(n / sim_deliver),
        "http_deliver_per_s": round(n / mid["deliver_s"]),  # the median try
        "http_deliver_per_s_tries": [round(n / t["deliver_s"]) for t in tries],
        "simulate_run_s": round(sim_wall, 2),
        "http_run_s": round(mid["run_s"], 2),
        "same_results": all(t["same_results"] for t in tries),
        # CPU seconds during the median http run (the client's: the whole run, build included)
        "http_cpu_s": mid["cpu"],
        "target_per_s": TARGETS.get(job),
    }
    if profile:
        result["profile"] = tries[0]["profile"]
    return result


def http_once(
    job: str, work: Path, store: Path, base: dict[str, str], profile: bool
) -> dict[str, Any]:
    """One http run against a sandbox of its own, each on a fresh copy of the store."""
    work.mkdir(parents=True)
    stores = {n: work / f"{n}.db" for n in ("sandbox", "client")}
    for path in stores.values():
        shutil.copy(store, path)
    quiet()  # the copies and the run before are their own cost, not this run's
    port = free_port()
    box_env = {**os.environ, **base, "MAILPIPE_STORE_URL": f"sqlite:///{stores['sandbox']}"}
    box_args = ["sandbox", "--config", CONFIG, "--port", str(port)]
    exports = subprocess.run(
        [*MAILPIPE, *box_args, "--print-env"],
        cwd=ROOT,
        env=box_env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    box = subprocess.Popen(
        [*MAILPIPE, *box_args],
        cwd=ROOT,
        env=box_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    spy_box = None
    try:
        wait_for(port)
        if profile:
            spy_box = subprocess.Popen(
                [
                    str(Path(PY).parent / "py-spy"),
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--pid",
                    str(box.pid),
                    "--output",
                    str(work / "sandbox.profile.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        http_out = work / "http-runs"
        http_env = {
            **base,
            **export_env(exports),
            **CLIENT_ENV,
            "MAILPIPE_STORE_URL": f"sqlite:///{stores['client']}",
            "MAILPIPE_RUN_OUT": str(http_out),
        }
        args = ["run", "--config", CONFIG, "--job", job, "--mode", "http"]
        box_cpu0, client_cpu0 = cpu_seconds(box.pid), children_cpu()
        if profile:
            raw = work / "client.profile.txt"
            spy = [
                str(Path(PY).parent / "py-spy"),
                "record",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(raw),
                "--",
                *MAILPIPE,
                *args,
            ]
            t0 = time.perf_counter()
            subprocess.run(spy, cwd=ROOT, env={**os.environ, **http_env}, capture_output=True)
            http_wall = time.perf_counter() - t0
        else:
            http_wall = mailpipe(args, http_env, f"http {job}")
        box_cpu1, client_cpu = cpu_seconds(box.pid), children_cpu() - client_cpu0
        box_cpu = None if box_cpu0 is None or box_cpu1 is None else box_cpu1 - box_cpu0
    finally:
        if spy_box is not None:
            spy_box.send_signal(signal.SIGINT)
            spy_box.wait()
        box.terminate()
        box.wait()
    http_dir = run_dir(http_out)
    _, http_deliver = deliver_rate(http_dir, job)
    tried: dict[str, Any] = {
        "run_dir": http_dir,
        "deliver_s": http_deliver,
        "run_s": http_wall,
        "cpu": {
            "sandbox": None if box_cpu is None else round(box_cpu, 2),
            "client": round(client_cpu, 2),
        },
    }
    if profile:
        tried["profile"] = {
            "client": summarize(work / "client.profile.txt", "deliver_job"),
            "sandbox": summarize(work / "sandbox.profile.txt"),
        }
    for path in stores.values():  # the run trees stay until every job has run (see main)
        path.unlink(missing_ok=True)
    return tried


def summarize(raw: Path, within: str | None = None, top: int = 10) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks → share of the samples by innermost mailpipe function
    and by leaf function; with ``within``, only the stacks passing through that function
    (and the threads of the deliver stage: batch files)."""
    ours: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if within and not any(within in f or "BatchFileWriter" in f for f in frames):
            continue
        n = int(count)
        total += n
        mine = [f for f in frames if " (pipeline/" in f]
        ours[mine[-1].split(":")[0] + ")" if mine else "(outside mailpipe)"] += n
        leaf[frames[-1].rsplit(":", 1)[0] + ")"] += n

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / max(total, 1), 1)) for k, v in c.most_common(top)]

    return {"samples": total, "mailpipe": share(ours), "leaf": share(leaf)}


def main() -> None:
    compiled_sources()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="order rows (default 1,000,000)")
    ap.add_argument("--job", action="append", choices=list(TARGETS), help="default: both")
    ap.add_argument("--profile", action="store_true", help="sample the http client with py-spy")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="http runs per job, each on fresh store copies; the median is reported (default 3)",
    )
    args = ap.parse_args()
    orders = ensure_orders(args.rows)
    store = ensure_store(1_000_000)
    print(
        f"http vs simulate, {args.rows:,} order rows, {os.cpu_count()} cores "
        "(client and sandbox on the same machine)"
    )
    results = []
    for job in args.job or list(TARGETS):
        r = bench_job(job, orders, store, args.profile, args.repeat)
        results.append(r)
        target = r["target_per_s"]
        ok = "ok" if target and r["http_deliver_per_s"] >= target else "BELOW TARGET"
        print(
            f"  {job:<20} {r['recipients']:>9,} recipients  deliver: simulate "
            f"{r['simulate_deliver_per_s']:>8,}/s  http {r['http_deliver_per_s']:>8,}/s "
            f"(median of {len(r['http_deliver_per_s_tries'])}) "
            f"(target {target:,}/s: {ok})  run: simulate {r['simulate_run_s']} s, "
            f"http {r['http_run_s']} s  results equal: {r['same_results']}",
            flush=True,
        )
        cpu = r["http_cpu_s"]
        print(
            f"    median http run's CPU: sandbox {cpu['sandbox']} s, client {cpu['client']} s "
            f"(whole run; {os.cpu_count()} cores shared)",
            flush=True,
        )
        for side, p in r.get("profile", {}).items():
            what = "the deliver stage" if side == "client" else "all of it"
            print(f"    {side} profile, {what} ({p['samples']} samples at 200/s):")
            print("      by innermost mailpipe function:")
            for name, pct in p["mailpipe"]:
                print(f"        {pct:5.1f}%  {name}")
            print("      by leaf function:")
            for name, pct in p["leaf"]:
                print(f"        {pct:5.1f}%  {name}")
    for job in args.job or list(TARGETS):
        shutil.rmtree(OUT / job, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
