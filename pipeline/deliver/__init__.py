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
``events``       ticket events as JSON (``retrying`` for each retry, with its reason)
``time``         when the outcome was known
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["OUTCOME_SCHEMA"]

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
        pa.field("time", pa.string()),
    ]
)
