"""The naive way to send personalized mail: smtplib, one EmailMessage per recipient, one connection.

What a script written in an afternoon does: read the orders with
csv.DictReader, fill the same templates mailpipe uses with str.replace, build
an ``email.message.EmailMessage`` (text plus an HTML alternative) for each
recipient, and ``send_message`` it over one smtplib connection.

    python bench/smtpnaive.py ORDERS.csv PORT [--rows N]
"""

from __future__ import annotations

import argparse
import csv
import html
import smtplib
from email.message import EmailMessage
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "configs" / "templates" / "order-confirmation"
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


def fill(template: str, row: dict[str, str], escape: bool = False) -> str:
    for name, column in FIELDS.items():
        value = row.get(column) or ""
        template = template.replace(f"&{name};", html.escape(value) if escape else value)
    return template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("orders", type=Path)
    ap.add_argument("port", type=int)
    ap.add_argument("--rows", type=int, default=None)
    args = ap.parse_args()
    subject = (TEMPLATES / "subject.txt").read_text().strip()
    text = (TEMPLATES / "body.txt").read_text()
    body_html = (TEMPLATES / "body.html").read_text()
    sent = failed = 0
    with (
        args.orders.open(newline="", encoding="utf-8") as fh,
        smtplib.SMTP("127.0.0.1", args.port) as smtp,
    ):
        for row in csv.DictReader(fh):
            if args.rows is not None and sent + failed >= args.rows:
                break
            msg = EmailMessage()
            msg["From"] = "Example Shop <orders@shop.example.com>"
            msg["To"] = row["email"]
            msg["Subject"] = fill(subject, row)
            msg.set_content(fill(text, row))
            msg.add_alternative(fill(body_html, row, escape=True), subtype="html")
            try:
                smtp.send_message(msg, from_addr="bounces@shop.example.com")
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPNotSupportedError):
                failed += 1  # e.g. a non-ASCII address and a server without SMTPUTF8
                continue
            sent += 1
    print(f"failed {failed}, sent {sent}")


if __name__ == "__main__":
    main()
