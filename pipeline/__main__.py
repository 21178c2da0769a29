"""``python -m pipeline``: the same as the ``mailpipe`` command."""

from pipeline.cli import entry

entry()
