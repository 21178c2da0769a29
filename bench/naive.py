"""The naive baseline: what a per-row script does (csv.DictReader + email_validator + json.dumps).

    python bench/naive.py IN.csv OUT.jsonl [--rows N]

One Maestro on-demand recipient object per row, as mailpipe's order-confirmation
job builds them, written one per line.
"""

from __future__ import annotations

import argparse
import csv
import json

from email_validator import EmailNotValidError, validate_email

FIELDS = {
    "FIRST_NAME": "first_name",
    "LAST_NAME": "last_name",
    "COUNTRY": "ship_country",
    "ORDER_ID": "order_id",
    "ORDER_TOTAL": "amount",
    "CURRENCY": "currency",
    "SHIPPING_ADDRESS_LINE1": "ship_line1",
    "SHIPPING_ADDRESS_LINE2": "ship_line2",
    "SHIPPING_CITY": "ship_city",
    "SHIPPING_POSTCODE": "ship_postcode",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=0)
    args = ap.parse_args()
    n = bad = 0
    with open(args.src, newline="", encoding="utf-8") as fh, open(args.out, "w") as out:
        for row in csv.DictReader(fh):
            n += 1
            try:
                email = validate_email(row["email"].strip(), check_deliverability=False).normalized
            except EmailNotValidError:
                bad += 1
                continue
            profile = {k: row[c].strip() for k, c in FIELDS.items() if row[c].strip()}
            out.write(
                json.dumps(
                    {
                        "email": email,
                        "profile": profile,
                        "ifNotExistsAddAndSend": True,
                        "ifExistsDoUpdate": False,
                        "ifExistsForceSending": True,
                    }
                )
                + "\n"
            )
            if args.rows and n >= args.rows:
                break
    print(f"{n} rows, {bad} bad")


if __name__ == "__main__":
    main()
