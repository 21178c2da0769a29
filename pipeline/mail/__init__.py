"""The messages of ``smtp`` mode: settings, templates, composition, signed links.

* :mod:`.settings` — what ``[delivery.smtp]`` and the jobs must say for smtp
  mode (checked with the rest of the config, no file reads), and the values
  derived from it (template name, rate, transactional or not);
* :mod:`.templates` — template directories (subject, text, HTML with Maestro
  merge fields ``&FIELD;``), checked against the job's fields and merged a
  whole column of recipients at a time;
* :mod:`.compose` — the bytes of each message (MIME multipart/alternative,
  encoded headers, Message-ID from the ledger key) and its envelope;
* :mod:`.tokens` — the signed, expiring tokens of confirmation and
  unsubscribe links, and ``mailpipe confirm``.

Sending lives in :mod:`pipeline.deliver.smtp` and its connection pool.
"""
