"""mailpipe: order and signup files → documented email-platform payloads."""

__version__ = "0.1.0"
