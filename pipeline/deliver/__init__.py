"""The deliver stage: send each batch (or let the engine answer it), record every outcome.

Whatever the mode, deliver writes ``batches/<id>.response.json`` (exactly what
came back, or what the engine answered) and one outcome per recipient in its
stage file, in the platform's own vocabulary:

``status``       completed | failed | ignored (the async-results categories)
``result``       Maestro ``result`` (``SUCCESS``, ``SEND_ERROR``, …; ``FAILED`` for subscribe)
``error``        Maestro ``error`` text
``message``      details (Maestro ``message``, Yesmail ticket or error message)
``reason``       Maestro subscribe ``reason`` object, as JSON text
``ticket``/``state``/``http_status``  Yesmail ticket id, its state, the HTTP status
``events``       ticket events as JSON (``retrying`` for each retry, with its reason)
``earlier_run``  for a record not sent again: the run whose answer it carries
``time``         when the outcome was known
``_transient``   a failure that a later attempt may cure (the ledger lets a later run retry it)
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["OUTCOME_SCHEMA", "conform"]

OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("_rec", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("result", pa.string()),
        pa.field("error", pa.string()),
        pa.field("message", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("ticket", pa.string()),
        pa.field("state", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("events", pa.string()),
        pa.field("earlier_run", pa.string()),
        pa.field("time", pa.string()),
        pa.field("_transient", pa.bool_()),
    ]
)


def conform(table: pa.Table) -> pa.Table:
    """An outcome table in OUTCOME_SCHEMA order; columns a backend left out are null."""
    n = table.num_rows
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
        for f in OUTCOME_SCHEMA
    ]
    return pa.Table.from_arrays(cols, schema=OUTCOME_SCHEMA)
