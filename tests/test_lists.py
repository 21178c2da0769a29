"""`mailpipe lists` against the sandbox's InboxFirst Mailing Lists API (004_…)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ListConfig, load_config
from pipeline.errors import ConfigError
from pipeline.inboxfirst import check_pushable, list_payload
from pipeline.sandbox.server import running_sandbox

CONFIG = """
[store]
url = "sqlite:///{store}"

[lists.shop]
name = "Shop Customers"
d_from_email = "orders@shop.example.com"
d_from_name = "{from_name}"
custom_headers_enabled = true
custom_headers = "X-Company: Example Shop\\n"
d_autowinner_enabled = true
d_autowinner_percentage = 25.5
d_autowinner_delay_amount = 10
d_autowinner_delay_unit = "hours"
d_seed_list_names = ["Seed List"]

[lists.news]
name = "Newsletter"
d_from_email = "news@shop.example.com"

[sources.s]
kind = "signups"
path = "x.csv"
email = "email"

[jobs.j]
source = "s"
target = "maestro-ondemand"
list = "news"
"""


def write(tmp: Path, from_name: str = "Example Shop") -> str:
    path = tmp / "mailpipe.toml"
    path.write_text(CONFIG.format(store=tmp / "store.db", from_name=from_name))
    return str(path)


def cli(args: list[str], env: dict[str, str], **kw: Any) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False, **kw)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Any]:
    with running_sandbox(load_config(write(tmp_path), env={})) as sandbox:
        yield sandbox


def test_push_show_pull_delete(tmp_path: Path, box: Any) -> None:
    cfg = write(tmp_path)
    env = dict(box.env())
    shown = cli(["lists", "show", "--config", cfg], env=env)
    assert shown.exit_code == 1 and shown.output.count("missing") == 2

    pushed = cli(["lists", "push", "--config", cfg], env=env)
    assert pushed.exit_code == 0, pushed.output
    assert pushed.output.count("created") == 2

    shown = cli(["lists", "show", "--config", cfg, "--json"], env=env)
    assert shown.exit_code == 0
    assert {r["action"] for r in orjson.loads(shown.stdout)} == {"unchanged"}

    pulled = orjson.loads(cli(["lists", "pull", "--config", cfg], env=env).stdout)
    shop = next(r for r in pulled if r["name"] == "Shop Customers")
    assert shop["d_autowinner_percentage"] == "25.5"  # sent and returned as a string
    assert shop["d_seed_lists"] == [{"id": 1, "name": "Seed List"}]
    assert shop["custom_headers"] == "X-Company: Example Shop\n"

    changed = write(tmp_path, from_name="The Example Shop")
    shown = cli(["lists", "show", "--config", changed], env=env)
    assert shown.exit_code == 1 and "differs: d_from_name" in shown.output
    pushed = cli(["lists", "push", "--config", changed, "shop"], env=env)
    assert pushed.exit_code == 0 and pushed.output.startswith("updated")
    pulled = orjson.loads(cli(["lists", "pull", "--config", cfg], env=env).stdout)
    assert next(r for r in pulled if r["id"] == shop["id"])["d_from_name"] == "The Example Shop"

    declined = cli(["lists", "delete", "--config", cfg, "news"], env=env, input="n\n")
    assert declined.exit_code == 1 and "nothing deleted" in declined.stderr
    deleted = cli(["lists", "delete", "--config", cfg, "shop", "--yes"], env=env)
    assert deleted.exit_code == 0 and "deleted mailing list 'Shop Customers'" in deleted.output
    pulled = orjson.loads(cli(["lists", "pull", "--config", cfg], env=env).stdout)
    assert [r["name"] for r in pulled] == ["Newsletter"]
    assert box.requests["lists_code"] == 1 and box.requests["lists_delete"] == 1


def test_wrong_credentials_are_refused(tmp_path: Path, box: Any) -> None:
    env = {**dict(box.env()), "INBOXFIRST_API_KEY": "wrong"}
    result = cli(["lists", "pull", "--config", write(tmp_path)], env=env)
    assert result.exit_code == 2
    assert "HTTP 401" in result.stderr and "wrong" not in result.stderr


def test_push_checks_first_what_the_api_refuses() -> None:
    base = {"name": "L", "d_from_email": "a@example.com"}
    for bad, key in (
        ({"d_autowinner_percentage": "94.855"}, "d_autowinner_percentage"),
        ({"d_seed_list_ids": (1,), "d_seed_list_names": ("S",)}, "d_seed_list_names"),
        ({"custom_headers_enabled": True}, "custom_headers"),
    ):
        lst = ListConfig.model_construct(**ListConfig(**base).model_dump() | bad)
        with pytest.raises(ConfigError) as e:
            check_pushable("mine", lst)
        assert e.value.key.startswith("lists.mine"), e.value.key
        assert key in e.value.message or key in e.value.key
    good = ListConfig(**base, d_autowinner_percentage=94.85)
    assert list_payload(good)["mailing_list"]["d_autowinner_percentage"] == "94.85"


def test_the_api_refuses_and_expires_as_documented(tmp_path: Path, box: Any) -> None:
    url = f"{box.base}/ga/api/v2/mailing_lists"
    token = base64.b64encode(f"{box.creds.inboxfirst_user}:{box.creds.inboxfirst_key}".encode())
    auth = {"Authorization": "Basic " + token.decode()}

    async def go() -> list[tuple[int, dict[str, Any]]]:
        out = []
        async with aiohttp.ClientSession(headers=auth) as s:
            for body in (
                {
                    "mailing_list": {
                        "name": "A",
                        "d_from_email": "a@x.com",
                        "d_autowinner_percentage": 94.85000000000001,
                    }
                },
                {
                    "mailing_list": {
                        "name": "A",
                        "d_from_email": "a@x.com",
                        "d_seed_list_ids": [1],
                        "d_seed_list_names": ["S"],
                    }
                },
                {
                    "mailing_list": {
                        "name": "A",
                        "d_from_email": "a@x.com",
                        "custom_headers_enabled": True,
                    }
                },
                {"mailing_list": {"name": "A", "d_from_email": "a@x.com"}},
            ):
                async with s.post(url, json=body) as r:
                    out.append((r.status, await r.json()))
            made = out[-1][1]["data"]["id"]
            async with s.delete(f"{url}/{made}/confirmed/{'0' * 40}:{int(time.time()) + 60}") as r:
                out.append((r.status, await r.json()))
        return out

    answers = asyncio.run(go())
    for status, doc in answers[:3]:
        assert status == 400
        assert set(doc) == {"data", "error_code", "error_message", "success"}
        assert doc["success"] is False and doc["data"] is None
    assert "two decimals" in answers[0][1]["error_message"]
    assert "only one of" in answers[1][1]["error_message"]
    assert "custom_headers" in answers[2][1]["error_message"]
    assert answers[3][1]["success"] is True
    assert answers[4][1]["success"] is False  # a code the server never gave
    # an expired code (valid for 2 minutes) is refused
    made = answers[3][1]["data"]["id"]
    expired = box.lists._code(made, int(time.time()) - 1)
    with pytest.raises(Exception, match="expired"):
        box.lists.delete(made, expired)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (
            {"custom_headers_enabled": True, "custom_headers": 123},
            "custom_headers must be a string",
        ),
        ({"custom_headers": ["X-A: b"]}, "custom_headers must be a string"),
        ({"d_sender_email": [1]}, "d_sender_email must be a string"),
        ({"d_bounce_email": 5}, "d_bounce_email must be a string"),
        ({"d_autowinner_metric": 5}, "d_autowinner_metric must be a string"),
        ({"d_autowinner_delay_amount": "ten"}, "d_autowinner_delay_amount must be an integer"),
        ({"primary_key_custom_field_id": "abc"}, "primary_key_custom_field_id must be an integer"),
        ({"d_seed_list_ids": ["x", {"a": 1}]}, "d_seed_list_ids must be an array of integers"),
        ({"d_seed_list_names": [1, None]}, "d_seed_list_names must be an array of strings"),
        ({"preview_custom_field_data": [1]}, "preview_custom_field_data must be a hash"),
    ],
)
def test_values_of_the_wrong_type_are_refused_in_the_envelope(
    box: Any, given: dict[str, Any], problem: str
) -> None:
    """004 gives each key's type: a value of another is a 400 in the documented envelope
    (a non-string custom_headers was a 500), on create and on update alike."""
    from pipeline.sandbox.inboxfirst import Refused

    base = {"name": "A", "d_from_email": "a@x.com"}
    with pytest.raises(Refused) as refused:
        box.lists.create({"mailing_list": {**base, **given}})
    assert refused.value.message == problem and refused.value.status == 400
    made = box.lists.create({"mailing_list": base})["id"]
    with pytest.raises(Refused) as refused:
        box.lists.update(made, {"mailing_list": given})
    assert refused.value.message == problem


def test_preview_custom_field_data_is_merged_and_huge_ids_are_not_found(box: Any) -> None:
    url = f"{box.base}/ga/api/v2/mailing_lists"
    token = base64.b64encode(f"{box.creds.inboxfirst_user}:{box.creds.inboxfirst_key}".encode())
    auth = {"Authorization": "Basic " + token.decode()}
    first = {"name": "First", "type": "text", "value": "Bob"}
    last = {"name": "Last", "type": "text", "value": "X"}

    async def go() -> list[tuple[int, Any]]:
        out = []
        async with aiohttp.ClientSession(headers=auth) as s:
            body = {
                "mailing_list": {
                    "name": "A",
                    "d_from_email": "a@x.com",
                    "preview_custom_field_data": {"First": first, "Last": last},
                }
            }
            async with s.post(url, json=body) as r:
                made = (await r.json())["data"]["id"]
            alice = {**first, "value": "Alice"}
            update = {"mailing_list": {"preview_custom_field_data": {"First": alice}}}
            async with s.put(f"{url}/{made}", json=update) as r:
                out.append((r.status, await r.json()))
            huge = 99999999999999999999999
            for method, path in (
                ("PUT", f"{url}/{huge}"),
                ("GET", f"{url}/{huge}/delete_confirmation_code"),
                ("DELETE", f"{url}/{huge}/confirmed/x:1"),
            ):
                async with s.request(method, path, json=update) as r:
                    out.append((r.status, await r.json()))
        return out

    updated, *huge = asyncio.run(go())
    # "the custom fields provided … are merged in with the existing" (004)
    assert updated[0] == 200
    assert updated[1]["data"]["preview_custom_field_data"] == {
        "First": {**first, "value": "Alice"},
        "Last": last,
    }
    for status, doc in huge:  # was a 500 (an integer SQLite cannot hold)
        assert status == 404 and doc["success"] is False and "not found" in doc["error_message"]


@pytest.mark.parametrize(
    ("given", "returned"),
    [("1e1", "10.0"), (" 25 ", "25.0"), (25, "25.0"), (94.85, "94.85"), ("7.50", "7.5")],
)
def test_the_percentage_comes_back_as_a_decimal_string(box: Any, given: Any, returned: str) -> None:
    """004: d_autowinner_percentage "is returned as a string" ("25.0"): in decimal
    notation, whatever notation it was sent in (it was echoed: "1e1", " 25 ")."""
    base = {"name": "A", "d_from_email": "a@x.com"}
    made = box.lists.create({"mailing_list": {**base, "d_autowinner_percentage": given}})
    assert made["d_autowinner_percentage"] == returned


@pytest.mark.parametrize("given", [-5, 150, 1e300, "NaN"])
def test_a_percentage_out_of_range_is_refused(box: Any, given: Any) -> None:
    from pipeline.sandbox.inboxfirst import Refused

    with pytest.raises(Refused):
        box.lists.create(
            {
                "mailing_list": {
                    "name": "A",
                    "d_from_email": "a@x.com",
                    "d_autowinner_percentage": given,
                }
            }
        )
