"""SMTP delivery: 100,000 personalized messages to a local sink, mailpipe against a naive script.

Contenders, each in its own process (wall time, CPU time and peak RSS from
``wait4``; the sink is a process of its own, measured the same way):

* **mailpipe** — ``mailpipe run --mode smtp --job order-confirmation`` on
  100,000 one-line orders with the example's ``order-confirmation`` template:
  extract, normalize, build, the engine (every recipient added to the store),
  the ledger claim/finish around every chunk, SMTP over the connection pool,
  and the report;
* **naive** — ``bench/smtpnaive.py``: csv.DictReader, str.replace into the
  same templates, one ``EmailMessage`` per recipient, ``smtplib`` over one
  connection.

The sink is Postfix's ``smtp-sink`` when it is installed, else
``bench/smtpsink.py`` (a minimal asyncio sink in its spirit: answers, counts,
keeps nothing, announces PIPELINING); ``--sink aiosmtpd`` uses aiosmtpd's
Sink handler, which announces no PIPELINING (so mailpipe goes one command at
a time) and saturates near 4,000 messages/s on a 2-core machine.

It also times composing alone, in this process: ``EmailMessage`` per
recipient against mailpipe's composer (merge + bytes).

    python bench/smtp.py [--messages N] [--naive-messages N] [--sink auto|smtp-sink|python|aiosmtpd]
"""

from __future__ import annotations

import argparse
import os
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
DATA = BENCH / "data"
OUT = BENCH / "out" / "smtp"
PY = sys.executable
TEMPLATES = ROOT / "configs" / "templates"

sys.path.insert(0, str(BENCH))
from run import fresh, waited  # noqa: E402

CONFIG = """
[run]
out = "{out}/runs"

[store]
url = "sqlite:///{out}/store.db"

[delivery]
mode = "smtp"

[delivery.smtp]
host = "127.0.0.1"
port = {port}
security = "none"
pool_size = {pool_size}
templates = "{templates}"

[lists.shop]
name = "Shop Customers"
d_from_email = "orders@shop.example.com"
d_from_name = "Example Shop"
d_reply_to = "support@shop.example.com"
d_bounce_email = "bounces@shop.example.com"
custom_headers_enabled = true
custom_headers = "X-Company: Example Shop\\n"

[lists.shop.fields.FIRST_NAME]
type = "text"
mandatory = true

[lists.shop.fields.LAST_NAME]
type = "text"

[lists.shop.fields.COUNTRY]
type = "single-select"
lookup = ["AT", "BE", "CH", "DE", "DK", "ES", "FR", "GB", "IE", "IT", "NL", "PL", "SE", "US"]

[sources.orders]
kind = "orders"
path = "{orders}"
email = "email"
record_id = "order_id"

[sources.orders.fields]
FIRST_NAME = "first_name"
LAST_NAME = "last_name"
COUNTRY = "ship_country"
ORDER_ID = "order_id"
ORDER_TOTAL = "amount"
CURRENCY = "currency"
SHIPPING_ADDRESS_LINE1 = "ship_line1"
SHIPPING_ADDRESS_LINE2 = "ship_line2"
SHIPPING_CITY = "ship_city"
SHIPPING_POSTCODE = "ship_postcode"

[jobs.order-confirmation]
source = "orders"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
ifExistsForceSending = true
transactional = true
template = "order-confirmation"
merge_fields = ["ORDER_ID", "ORDER_TOTAL", "CURRENCY", "SHIPPING_ADDRESS_LINE1",
                "SHIPPING_ADDRESS_LINE2", "SHIPPING_CITY", "SHIPPING_POSTCODE"]
"""


def make_orders(n: int) -> Path:
    """n one-line orders to n distinct customers (names with and without accents)."""
    path = DATA / f"smtp-orders-{n}.csv"
    if path.exists():
        return path
    sys.path.insert(0, str(BENCH))
    import numpy as np
    import pyarrow as pa
    from generate import CITIES, COUNTRIES, FIRST, LAST, STREETS, customers, write_csv

    rng = np.random.default_rng(5)
    ci = rng.integers(0, CITIES.size, n)
    table = pa.table(
        {
            "order_id": (500000 + np.arange(n)).astype(str),
            "email": customers(n).astype(str),
            "first_name": FIRST[rng.integers(0, FIRST.size, n)],
            "last_name": LAST[rng.integers(0, LAST.size, n)],
            "amount": np.char.mod("%.2f", np.round(rng.gamma(2.0, 30.0, n), 2)),
            "currency": np.where(COUNTRIES[ci] == "GB", "GBP", "EUR"),
            "ship_line1": np.char.add(
                np.char.add(STREETS[ci % STREETS.size], ", "), rng.integers(1, 200, n).astype(str)
            ),
            "ship_line2": np.where(rng.random(n) < 0.2, "Flat 3", ""),
            "ship_city": CITIES[ci],
            "ship_postcode": rng.integers(10000, 99999, n).astype(str),
            "ship_country": COUNTRIES[ci],
        }
    )
    write_csv(table, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"the sink exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the sink did not start listening")


def smtp_sink_binary() -> str | None:
    for candidate in (
        shutil.which("smtp-sink"),
        "/usr/sbin/smtp-sink",
        "/usr/lib/postfix/sbin/smtp-sink",
        "/usr/libexec/postfix/smtp-sink",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Sink:
    """A sink process; ``stop()`` returns its CPU seconds."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        if kind == "smtp-sink":
            binary = smtp_sink_binary()
            assert binary is not None
            cmd = [binary, "-u", "nobody", f"127.0.0.1:{self.port}", "1024"]
        elif kind == "aiosmtpd":
            cmd = [PY, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{self.port}"]
            cmd += ["-c", "aiosmtpd.handlers.Sink"]
        else:
            cmd = [PY, str(BENCH / "smtpsink.py"), str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)

    def stop(self) -> float:
        self.proc.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(self.proc.pid, 0)
        return float(usage.ru_utime + usage.ru_stime)


def measure(name: str, cmd: list[str], sink: Sink) -> dict[str, Any]:
    code, usage, wall, out, err = waited(cmd)
    sink_cpu = sink.stop()
    if code not in (0, 1):
        raise SystemExit(f"{name}: exit {code}\n{out}\n{err}")
    if out.lstrip().startswith("{"):
        messages = int(orjson.loads(out).get("status", {}).get("completed", 0))
    else:
        messages = int(out.split()[-1])
    result = {
        "name": name,
        "sink": sink.kind,
        "messages": messages,
        "seconds": round(wall, 2),
        "messages_per_s": round(messages / wall),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "sink_cpu_seconds": round(sink_cpu, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }
    print(
        f"  {name:<22} {sink.kind:<9} {messages:>8,} msgs {wall:7.2f} s "
        f"{result['messages_per_s']:>7,} msg/s  cpu {result['cpu_seconds']:6.2f} s "
        f"(sink {sink_cpu:5.2f} s)  rss {result['peak_rss_mb']:6.1f} MB",
        flush=True,
    )
    return result


def remove_store(db: Path) -> None:
    """The store, its ledger's file, their write-ahead logs and the run lock."""
    fresh(db)
    Path(f"{db}.lock").unlink(missing_ok=True)


def run_mailpipe(orders: Path, sink_kind: str, pool_size: int) -> dict[str, Any]:
    shutil.rmtree(OUT / "runs", ignore_errors=True)
    remove_store(OUT / "store.db")
    sink = Sink(sink_kind)
    config = OUT / "bench-smtp.toml"
    config.write_text(
        CONFIG.format(
            out=OUT, port=sink.port, pool_size=pool_size, templates=TEMPLATES, orders=orders
        )
    )
    cmd = [PY, "-m", "pipeline.cli", "run", "--config", str(config), "--json"]
    return measure("mailpipe", cmd, sink)


def run_naive(orders: Path, sink_kind: str, n: int) -> dict[str, Any]:
    sink = Sink(sink_kind)
    cmd = [PY, str(BENCH / "smtpnaive.py"), str(orders), str(sink.port), "--rows", str(n)]
    return measure("naive (smtplib)", cmd, sink)


def compose_only(orders: Path, n: int) -> dict[str, float]:
    """µs a message: EmailMessage per recipient vs mailpipe's merge + compose."""
    import csv

    import pyarrow as pa

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(BENCH))
    from smtpnaive import TEMPLATES as NAIVE_TEMPLATES
    from smtpnaive import fill

    from pipeline.config import parse_config
    from pipeline.mail.compose import Composer
    from pipeline.mail.templates import Merger, job_template

    with orders.open(newline="", encoding="utf-8") as fh:
        rows = [r for _, r in zip(range(n), csv.DictReader(fh))]
    subject = (NAIVE_TEMPLATES / "subject.txt").read_text().strip()
    text = (NAIVE_TEMPLATES / "body.txt").read_text()
    body_html = (NAIVE_TEMPLATES / "body.html").read_text()
    from email.message import EmailMessage

    t0 = time.perf_counter()
    for row in rows:
        msg = EmailMessage()
        msg["From"] = "Example Shop <orders@shop.example.com>"
        msg["To"] = row["email"]
        msg["Subject"] = fill(subject, row)
        msg.set_content(fill(text, row))
        msg.add_alternative(fill(body_html, row, escape=True), subtype="html")
        msg.as_bytes()
    email_message = (time.perf_counter() - t0) / n * 1e6

    import tomllib

    raw = tomllib.loads(
        CONFIG.format(out=OUT, port=25, pool_size=1, templates=TEMPLATES, orders=orders)
    )
    cfg = parse_config(raw, env={})
    plan = cfg.plan("order-confirmation")
    merger, composer = Merger(job_template(cfg, plan), plan), Composer(plan)
    source = cfg.sources["orders"]
    table = pa.table(
        {
            "email": [r["email"] for r in rows],
            **{f"f:{f}": [r[c] for r in rows] for f, c in source.fields.items()},
        }
    )
    t0 = time.perf_counter()
    for start in range(0, n, 1024):
        part = table.slice(start, 1024)
        merged = merger.merge(merger.values(part, {}), part.num_rows)
        emails = part.column("email").to_pylist()
        composer.compose(list(range(part.num_rows)), emails, emails, merged, None)
    direct = (time.perf_counter() - t0) / n * 1e6
    print(
        f"  compose only ({n:,} messages): EmailMessage {email_message:7.1f} us/message, "
        f"mailpipe {direct:5.1f} us/message ({email_message / direct:.0f}x)"
    )
    return {"email_message_us": round(email_message, 1), "mailpipe_us": round(direct, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--naive-messages", type=int, default=None, help="default: --messages")
    ap.add_argument("--sink", choices=["auto", "smtp-sink", "python", "aiosmtpd"], default="auto")
    ap.add_argument("--pool-size", type=int, default=8)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    sink = args.sink
    if sink == "auto":
        sink = "smtp-sink" if smtp_sink_binary() else "python"
        if sink == "python":
            print("Postfix smtp-sink is not installed: using bench/smtpsink.py as the sink")
    orders = make_orders(args.messages)
    naive_n = args.naive_messages or args.messages
    print(f"SMTP benchmark: {args.messages:,} messages, {os.cpu_count()} CPUs, sink {sink}")
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "sink": sink}
    results["mailpipe"] = run_mailpipe(orders, sink, args.pool_size)
    results["naive"] = run_naive(orders, sink, naive_n)
    # last: the children above must not inherit this process's memory at fork time
    results["compose"] = compose_only(orders, 5000)
    ratio = results["mailpipe"]["messages_per_s"] / results["naive"]["messages_per_s"]
    results["ratio"] = round(ratio, 1)
    print(
        f"\n  mailpipe {results['mailpipe']['messages_per_s']:,} msg/s (target >= 5,000), "
        f"{ratio:.1f}x the naive script (target >= 6x)"
    )
    (OUT / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    shutil.rmtree(OUT / "runs", ignore_errors=True)
    remove_store(OUT / "store.db")


if __name__ == "__main__":
    main()
