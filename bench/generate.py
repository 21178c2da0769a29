"""Generate realistic order files (and a store of existing subscribers) for the benchmarks.

Orders: about 1.6 line-item rows per order (adjacent, sharing the order id), a
customer base of repeat buyers, addresses with mixed-case domains, quoted
addresses with commas, and about 1% bad addresses of the kinds exports
really contain. Everything is vectorized with numpy, so 5M rows take seconds.

    python bench/generate.py ROWS OUT.csv [--store URL --subscribers N]
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

FIRST = np.array(
    [
        "Anna",
        "Ben",
        "Chloé",
        "David",
        "Eva",
        "Frank",
        "Grace",
        "Henrik",
        "Irene",
        "Jens",
        "Karl",
        "Lena",
        "Mia",
        "Noah",
        "Olga",
        "Paul",
        "Quinn",
        "Rosa",
        "Sven",
        "Tara",
        "Ugo",
        "Vera",
        "Will",
        "Xenia",
        "Yusuf",
        "Zoe",
    ]
)
LAST = np.array(
    [
        "Schmidt",
        "Miller",
        "Martin",
        "Jones",
        "Novak",
        "Wagner",
        "Hopper",
        "Larsen",
        "Rossi",
        "Hansen",
        "Weber",
        "Fischer",
        "Dubois",
        "García",
        "Kowalski",
        "Nilsson",
        "Murphy",
        "Costa",
        "Bauer",
        "Janssen",
    ]
)
DOMAINS = np.array(
    [
        "example.com",
        "example.org",
        "Example.net",
        "mail.example.de",
        "post.example.fr",
        "shop.example.co.uk",
        "example.it",
        "EXAMPLE.es",
        "webmail.example.nl",
        "example.at",
    ]
)
CITIES = np.array(
    [
        "Berlin",
        "London",
        "Paris",
        "Amsterdam",
        "Warszawa",
        "Hamburg",
        "Dublin",
        "Stockholm",
        "Milano",
        "København",
        "Wien",
        "Zürich",
        "Köln",
    ]
)
COUNTRIES = np.array(["DE", "GB", "FR", "NL", "PL", "DE", "IE", "SE", "IT", "DK", "AT", "CH", "DE"])
STREETS = np.array(
    [
        "Hauptstraße",
        "Baker Street",
        "rue de Rivoli",
        "Kalverstraat",
        "Lindenweg",
        "Main Road",
        "Storgatan",
        "Via Roma",
        "Nørregade",
        "Bahnhofstrasse",
    ]
)
BAD = np.array(
    [
        "{u}.example.com",
        "{u}@@example.com",
        "{u} @example.com",
        "{u}@example",
        "{u}@example.com.",
        "@example.com",
        "{u}@exa mple.com",
        "{u}@-example.com",
    ]
)


def customers(n: int, seed: int = 11) -> np.ndarray:
    """n distinct addresses: first.last.N@domain; address N is the same whatever n is."""
    rng = np.random.default_rng(seed)
    big = max(n, 1)
    # draw a fixed-size table of names so that address N does not depend on n
    names = rng.integers(0, FIRST.size * LAST.size, 1 << 16)
    pick = names[np.arange(big) % names.size]
    f = np.char.lower(FIRST[pick % FIRST.size].astype(str))[:n]
    last = np.char.lower(LAST[pick // FIRST.size].astype(str))[:n]
    num = np.arange(n).astype(str)
    dom = DOMAINS[np.arange(n) % DOMAINS.size]
    return np.char.add(
        np.char.add(np.char.add(np.char.add(f, "."), last), np.char.add(".", num)),
        np.char.add("@", dom),
    )


def orders(rows: int, pool: int, seed: int = 7) -> pa.Table:
    rng = np.random.default_rng(seed)
    # line items: order sizes 1..4, mostly 1
    sizes = rng.choice([1, 2, 3, 4], size=rows, p=[0.6, 0.25, 0.1, 0.05])
    order_of_row = np.repeat(np.arange(sizes.size), sizes)[:rows]
    n_orders = int(order_of_row[-1]) + 1
    cust = rng.integers(0, int(pool * 1.25), n_orders)  # a fifth are new customers
    addr = customers(int(pool * 1.25))[cust]
    bad = rng.random(n_orders) < 0.01
    if bad.any():
        user = np.char.partition(addr[bad], "@")[:, 0]
        tmpl = BAD[rng.integers(0, BAD.size, int(bad.sum()))]
        addr = addr.astype(object)
        addr[bad] = [t.format(u=u) for t, u in zip(tmpl, user)]
    fi = rng.integers(0, FIRST.size, n_orders)
    li = rng.integers(0, LAST.size, n_orders)
    ci = rng.integers(0, CITIES.size, n_orders)
    amount = np.round(rng.gamma(2.0, 30.0, n_orders), 2)
    base = np.datetime64("2026-01-01T00:00:00")
    created = base + rng.integers(0, 300 * 86400, n_orders).astype("timedelta64[s]")
    street_no = rng.integers(1, 200, n_orders)
    flat = rng.random(n_orders) < 0.2
    line2 = np.where(flat, np.char.add("Flat ", rng.integers(1, 40, n_orders).astype(str)), "")
    o = order_of_row
    cols = {
        "order_id": (100000 + o).astype(str),
        "email": np.asarray(addr)[o].astype(str),
        "first_name": FIRST[fi][o],
        "last_name": LAST[li][o],
        "amount": np.char.mod("%.2f", amount)[o],
        "currency": np.where(COUNTRIES[ci] == "GB", "GBP", "EUR")[o],
        "created_at": np.datetime_as_string(created, unit="s")[o],
        "ship_line1": np.char.add(
            np.char.add(STREETS[ci % STREETS.size], ", "), street_no.astype(str)
        )[o],
        "ship_line2": line2[o],
        "ship_city": CITIES[ci][o],
        "ship_postcode": rng.integers(10000, 99999, n_orders).astype(str)[o],
        "ship_country": COUNTRIES[ci][o],
    }
    return pa.table({k: pa.array(v.tolist() if v.dtype == object else v) for k, v in cols.items()})


def write_csv(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="needed"))


def fill_store(db: Path, list_name: str, n: int, seed: int = 7) -> None:
    """n subscribers on a list, written straight into a mailpipe store (schema by mailpipe)."""
    from pipeline.store import Store

    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists():
        db.unlink()
    Store(f"sqlite:///{db}").close()
    addr = customers(n)
    conn = sqlite3.connect(db)
    rows = (
        (
            list_name,
            a.lower(),
            a,
            "subscribed",
            0,
            0,
            '{"FIRST_NAME":"X"}',
            None,
            "2026-01-01T00:00:00Z",
        )
        for a in addr.tolist()
    )
    conn.executemany("INSERT INTO subscribers VALUES (?,?,?,?,?,?,?,?,?)", rows)
    conn.commit()
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("rows", type=int)
    ap.add_argument("out", type=Path)
    ap.add_argument("--pool", type=int, default=1_000_000, help="customer base size")
    args = ap.parse_args()
    t = time.perf_counter()
    write_csv(orders(args.rows, args.pool), args.out)
    print(f"{args.out}: {args.rows} rows in {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
