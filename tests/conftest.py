"""Shared fixtures: the example config, and small configs built in tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.config import MailpipeConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "cases"
SEEDS = ROOT.parent / "shared" / "seeds"


@pytest.fixture
def example_config() -> MailpipeConfig:
    return load_config(ROOT / "configs" / "mailpipe.toml", env={})


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run with the repository root as the working directory (sample_data paths)."""
    monkeypatch.chdir(ROOT)
    yield ROOT


def small_config(**overrides: Any) -> MailpipeConfig:
    """A minimal valid config: one list, one CSV source, one job per target."""
    raw: dict[str, Any] = {
        "store": {"url": "sqlite:///state/test.db"},
        "lists": {
            "shop": {
                "name": "Shop",
                "d_from_email": "shop@example.com",
                "mContainer": "2",
                "mOwner": "N10",
                "mListId": "HL#12",
                "group": "G",
                "fields": {
                    "FIRST_NAME": {"type": "text", "mandatory": True},
                    "LAST_NAME": {"type": "text"},
                    "AGE": {"type": "number"},
                    "VIP": {"type": "boolean", "default": False},
                    "COLOR": {"type": "single-select", "lookup": ["red", "green"]},
                    "TAGS": {"type": "multi-select", "lookup": ["a", "b", "c"]},
                },
            },
        },
        "sources": {
            "orders": {
                "kind": "orders",
                "path": "orders.csv",
                "email": "email",
                "record_id": "order_id",
                "fields": {"FIRST_NAME": "first_name", "LAST_NAME": "last_name"},
            },
        },
        "jobs": {
            "confirm": {
                "source": "orders",
                "target": "maestro-ondemand",
                "list": "shop",
                "ifNotExistsAddAndSend": True,
            },
        },
    }
    for key, value in overrides.items():
        raw[key] = value
    return parse_config(orjson.loads(orjson.dumps(raw)), env={})


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]
