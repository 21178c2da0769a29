"""HTTP delivery against the sandbox on loopback: the same results as simulate, retries,
bisection, the 401 stop, and the seeds' own subscribe URL. No mocks: a real sandbox
(aiohttp, port 0) answers from a real store."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner
from conftest import ROOT
from rundir_contract import check_run_dir

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.sandbox.server import SandboxOptions, running_sandbox

CONFIG = """
[run]
out = "{out}"

[store]
url = "sqlite:///{store}"

[delivery.retry]
attempts = 12
base_delay = 0.001
max_delay = 0.01

[delivery.http]
poll_interval = 0.002
poll_max_interval = 0.01
concurrency = {concurrency}

[simulate]
mail_jobs = {{ confirm = "authorized" }}

[lists.shop]
name = "Shop"
d_from_email = "shop@example.com"
mContainer = "2"
mOwner = "N10"
mListId = "HL#12"
group = "G"

[lists.shop.fields.FIRST_NAME]
type = "text"
mandatory = true

[lists.shop.fields.CUSTOMER_NO]
type = "text"

[sources.orders]
kind = "orders"
path = "{data}/orders*.csv"
email = "email"
record_id = "order_id"

[sources.orders.flags]
ifNotExistsAddAndSend = "add"

[sources.orders.fields]
FIRST_NAME = "first_name"
CUSTOMER_NO = "customer_no"

[sources.plain-orders]
kind = "orders"
path = "{data}/orders*.csv"
email = "email"
record_id = "order_id"

[sources.plain-orders.fields]
FIRST_NAME = "first_name"
CUSTOMER_NO = "customer_no"

[sources.signups]
kind = "signups"
path = "{data}/signups*.csv"
email = "email"
password = "password"

[sources.signups.fields]
FIRST_NAME = "first_name"

[jobs.confirm]
source = "orders"
target = "maestro-ondemand"
list = "shop"
trigger_url = "https://maestro.example.com/trigger/confirm?token={{token}}"
token_env = "TEST_CONFIRM_TOKEN"
ifExistsForceSending = true
batch_size = 3

[jobs.signup]
source = "signups"
target = "maestro-subscribe"
list = "shop"
subscribe_url = "https://maestro.example.com"
batch_size = 4

[jobs.followup]
source = "plain-orders"
target = "yesmail-send"
list = "shop"
fields = ["FIRST_NAME", "CUSTOMER_NO"]
recipient_id = "CUSTOMER_NO"
templateId = "1465362"
transactional = false
subscriptions = {{ isMemberOf = ["Shop News"] }}
batch_size = 5
"""

# orders: the same address in several batches with different flags (order matters),
# existing subscribers, a suppressed one, a missing mandatory field, a subscriber who is
# not in "Shop News" (Yesmail 409) and a new one without customer number (400)
ORDERS = (
    "order_id,email,first_name,customer_no,add\n"
    "1,ann@example.com,Ann,C1,false\n"
    "2,bob@example.com,Bob,C2,true\n"
    "3,kim@example.com,Kim,C9,false\n"
    "4,ann@example.com,Ann,C1,true\n"
    "5,dee@example.com,,C4,true\n"
    "6,eve@example.com,Eve,C5,true\n"
    "7,kim@example.com,Kim,C9,true\n"
    "8,sup@example.com,Sup,C6,true\n"
    "9,fay@example.com,Fay,,true\n"
    "10,gus@example.com,Gus,C7,true\n"
    "11,hal@example.com,Hal,C8,true\n"
    "12,kim@example.com,Kim,C9,false\n"
    "13,new@example.com,New,,true\n"
)
SIGNUPS = (
    "email,first_name,password\n"
    "new.one@example.com,New,pw-one-secret\n"
    "bob@example.com,Bob,pw-bob-secret\n"
    "first.last@example.com,,pw-first\n"
    "new.one@example.com,New,pw-one-secret\n"
    "zed@example.com,Zed,pw-zed\n"
)
SUBSCRIBERS = (
    "email,list,state,subscriptions,FIRST_NAME\n"
    "bob@example.com,shop,subscribed,Shop News,Bob\n"
    "cy@example.com,shop,subscribed,Shop News,Cy\n"
    "ann@example.com,shop,unsubscribed,Shop News,Ann\n"
    "eve@example.com,shop,subscribed,Shop News,Eve\n"
    "sup@example.com,shop,subscribed,Shop News,Sup\n"
    "fay@example.com,shop,subscribed,Shop News,Fay\n"
    "gus@example.com,shop,subscribed,,Gus\n"
    "hal@example.com,shop,subscribed,Shop News,Hal\n"
    "dee@example.com,shop,subscribed,Shop News,\n"
)
SUPPRESSION = "email,reason,added_at\nsup@example.com,complaint,2026-01-01T00:00:00Z\n"


def cli(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False, **kw)


def last_run(out: Path) -> Path:
    return sorted(p for p in out.iterdir() if p.is_dir())[-1]


class Setup:
    """A config, its inputs, and one seeded store copied for each side of a comparison."""

    def __init__(self, tmp: Path, concurrency: int = 8) -> None:
        self.tmp = tmp
        data = tmp / "data"
        data.mkdir()
        (data / "orders.csv").write_text(ORDERS)
        (data / "signups.csv").write_text(SIGNUPS)
        self.template = CONFIG.replace("{data}", str(data)).replace(
            "{concurrency}", str(concurrency)
        )
        seed = self.config("seed")
        (tmp / "subscribers.csv").write_text(SUBSCRIBERS)
        (tmp / "suppression.csv").write_text(SUPPRESSION)
        for what, path in (("subscribers", "subscribers.csv"), ("suppression", "suppression.csv")):
            done = cli([what, "import", "--config", seed, str(tmp / path)])
            assert done.exit_code == 0, done.output

    def config(self, name: str) -> str:
        """A config whose store starts as a copy of the seeded one, and its own out dir."""
        path = self.tmp / f"{name}.toml"
        store = self.tmp / f"{name}.db"
        if name != "seed" and not store.exists():
            # the backup API: a plain file copy would miss what is still in the WAL
            with sqlite3.connect(self.tmp / "seed.db") as src, sqlite3.connect(store) as dst:
                src.backup(dst)
        path.write_text(self.template.format(out=self.tmp / f"out-{name}", store=store))
        return str(path)

    def out(self, name: str) -> Path:
        return self.tmp / f"out-{name}"


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@pytest.fixture
def sandbox(setup: Setup) -> Iterator[Any]:
    with running_sandbox(load_config(setup.config("sandbox"), env={})) as box:
        yield box


def env_of(box: Any, setup: Setup, **extra: str) -> dict[str, str]:
    return {**dict(box.env()), **extra}


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results without what differs between runs: times, ticket ids, event times."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k not in ("time", "ticket")}
        if r["events"]:
            r["events"] = [(e["state"], e["message"]) for e in r["events"]]
        out.append(r)
    return out


@pytest.mark.parametrize("chunk_rows", ["65536", "4"])
def test_http_run_gives_the_simulate_results(setup: Setup, sandbox: Any, chunk_rows: str) -> None:
    """The same results as simulate, in one chunk a job, and in chunks of a batch or two:
    http mode sends a chunk while recording the one before, in order all the same."""
    env = env_of(sandbox, setup, MAILPIPE_RUN_CHUNK_ROWS=chunk_rows)
    sim = cli(["run", "--config", setup.config("sim"), "--mode", "simulate"], env=env)
    http = cli(["run", "--config", setup.config("client"), "--mode", "http"], env=env)
    assert sim.exit_code == http.exit_code == 1, http.output  # some rows fail on purpose
    sim_rows = check_run_dir(last_run(setup.out("sim")))
    http_rows = check_run_dir(last_run(setup.out("client")))
    assert comparable(http_rows) == comparable(sim_rows)
    # the cases really happened, each in its documented vocabulary
    by = {(r["job"], r["line"]): r for r in http_rows}
    assert by[("confirm", 2)]["result"] == "ADDRESS_NOT_FOUND"  # ann, no add flag
    assert by[("confirm", 5)]["result"] == "ADDRESS_REJECTED_BY_LIST_PROTECTION"  # unsubscribed
    assert by[("confirm", 9)]["result"] == "ADDRESS_REJECTED_BY_SUPPRESSION_LIST"
    # kim: unknown and not to be added, then added, then known: order decides
    assert [by[("confirm", line)]["result"] for line in (4, 8, 13)] == [
        "ADDRESS_NOT_FOUND",
        "SUCCESS",
        "SUCCESS",
    ]
    assert by[("signup", 3)]["reason"]["type"] == "ALREADY_SUBSCRIBED"
    assert by[("signup", 4)]["reason"]["type"] == "PROFILE_VALIDATION_ERROR"
    assert {r["http_status"] for r in http_rows if r["job"] == "followup"} == {202, 400, 409}
    assert sandbox.requests["trigger"] == 5  # 13 orders, 3 a batch
    assert sandbox.requests["subscribe"] == 5  # one call per signup
    assert sandbox.requests["ticket"] >= 1 and sandbox.requests["async_results"] >= 1
    # the response files are the platforms' bodies, the same in both modes
    for name in ("maestro-ondemand-0001", "maestro-subscribe-0001"):
        files = [
            last_run(setup.out(side)) / "batches" / f"{name}.response.json"
            for side in ("sim", "client")
        ]
        assert orjson.loads(files[0].read_bytes()) == orjson.loads(files[1].read_bytes())


def test_only_the_offending_recipients_fail_on_400_and_409(setup: Setup, sandbox: Any) -> None:
    result = cli(
        ["run", "--config", setup.config("client"), "--mode", "http", "--job", "followup"],
        env=env_of(sandbox, setup),
    )
    assert result.exit_code == 1
    run = last_run(setup.out("client"))
    rows = check_run_dir(run)
    failed = {r["email"]: r for r in rows if r["status"] == "failed"}
    assert set(failed) == {
        "fay@example.com",
        "new@example.com",
        "gus@example.com",
        "kim@example.com",
    }
    # no customer number (the job's recipient id): refused before sending, with the answer
    # the platform gives a new subscriber without an id, instead of a 400 on its request
    # (fay is known to the platform, but that cannot be told before sending)
    for email, line in (("fay@example.com", 10), ("new@example.com", 14)):
        assert failed[email]["http_status"] == 400 and failed[email]["batch"] is None
        assert failed[email]["message"] == "A new subscriber requires both id and email"
        assert failed[email]["line"] == line
    rejects = [orjson.loads(ln) for ln in (run / "rejects.jsonl").read_bytes().splitlines()]
    assert {(r["line"], r["field"], r["reason"], r["code"]) for r in rejects} == {
        (line, "CUSTOMER_NO", "A new subscriber requires both id and email", "400")
        for line in (10, 14)
    }
    # so no request carries a recipient without its id
    sent = [
        rec
        for f in (run / "batches").glob("yesmail-send-*.request.json")
        for rec in orjson.loads(f.read_bytes())["body"]["recipients"]
    ]
    assert len(sent) == 11 and all(rec.get("id") for rec in sent)
    for email in ("gus@example.com", "kim@example.com"):  # not members of Shop News
        assert failed[email]["http_status"] == 409
        assert failed[email]["message"] == "Subscriber must be a memberOf one of '[Shop News]'."
    others = [r for r in rows if r["email"] not in failed]
    assert others and all(r["status"] == "completed" and r["http_status"] == 202 for r in others)
    assert all(r["state"] == "completed" for r in others)
    # batches of several were split: more requests than batches, all with the batch as ref
    attempts = [
        a
        for f in (last_run(setup.out("client")) / "batches").glob("yesmail-send-*.response.json")
        for a in orjson.loads(f.read_bytes())["attempts"]
    ]
    assert sandbox.requests["send"] == len(attempts) > 3
    states = [e["state"] for e in others[0]["events"]]
    assert states == ["accepted", "processing", "completed"]


@pytest.fixture
def recording_sandbox(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The sandbox, keeping the URL of every send and subscribe request as it arrived."""
    from pipeline.sandbox.server import Sandbox

    seen: dict[str, list[str]] = {"send": [], "subscribe": []}

    def recording(route: str) -> Any:
        handler = getattr(Sandbox, route)

        async def handle(self: Sandbox, request: web.Request) -> web.StreamResponse:
            seen[route].append(f"{request.scheme}://{request.host}{request.raw_path}")
            return await handler(self, request)  # type: ignore[no-any-return]

        return handle

    for route in seen:
        monkeypatch.setattr(Sandbox, route, recording(route))
    with running_sandbox(load_config(setup.config("sandbox"), env={})) as box:
        box.seen = seen
        yield box


def test_request_files_name_the_url_the_sandbox_received(
    setup: Setup, recording_sandbox: Any
) -> None:
    """A request file holds what is sent, its URL included: with the endpoints pointed at
    the sandbox (MAILPIPE_DELIVERY_HTTP_YESMAIL_URL, …), the URL of every Yesmail request
    file is the one the sandbox got, and each subscribe call went to its file's URL."""
    box = recording_sandbox
    args = ["run", "--config", setup.config("client"), "--mode", "http"]
    result = cli([*args, "--job", "followup", "--job", "signup"], env=env_of(box, setup))
    assert result.exit_code == 1, result.output  # some rows fail on purpose
    batches = last_run(setup.out("client")) / "batches"

    def urls(target: str) -> set[str]:
        files = batches.glob(f"{target}-*.request.json")
        return {orjson.loads(f.read_bytes())["url"] for f in files}

    assert box.seen["send"]  # bisected requests repeat their batch's URL
    assert set(box.seen["send"]) == urls("yesmail-send")
    assert all(u.startswith(box.base + "/v2/emails/send?responseRef=") for u in box.seen["send"])
    assert box.seen["subscribe"]
    assert {u.split("?")[0] for u in box.seen["subscribe"]} == urls("maestro-subscribe")


def test_transient_failures_are_retried_and_recorded(setup: Setup) -> None:
    cfg = load_config(setup.config("sandbox"), env={})
    options = SandboxOptions(fail_rate=0.3, fail_status=503, seed=7)
    with running_sandbox(cfg, options) as box:
        result = cli(
            [
                "run",
                "--config",
                setup.config("client"),
                "--mode",
                "http",
                "--job",
                "confirm",
                "--job",
                "followup",
            ],
            env=env_of(box, setup),
        )
        injected = box.requests["injected-failure"]
    assert result.exit_code == 1
    rows = check_run_dir(last_run(setup.out("client")))
    assert injected > 0
    # the only failures are the documented answers, never a 503
    assert all(r["http_status"] != 503 for r in rows)
    sent = [r for r in rows if r["batch"]]
    retried = [
        r for r in sent if r["events"] and any(e["state"] == "retrying" for e in r["events"])
    ]
    assert retried
    for r in retried:
        reasons = [e["message"] for e in r["events"] if e["state"] == "retrying"]
        assert all("HTTP 503" in m for m in reasons)
    # the same outcomes as without failures
    sim = cli(
        [
            "run",
            "--config",
            setup.config("sim"),
            "--mode",
            "simulate",
            "--job",
            "confirm",
            "--job",
            "followup",
        ],
        env=env_of(box, setup),
    )
    assert sim.exit_code == 1
    plain = [
        {k: v for k, v in r.items() if k not in ("events", "time", "ticket")}
        for r in check_run_dir(last_run(setup.out("sim")))
    ]
    assert [
        {k: v for k, v in r.items() if k not in ("events", "time", "ticket")} for r in rows
    ] == plain


def test_every_row_completes_under_a_30_percent_503_rate(tmp_path: Path) -> None:
    """The issue's proof: --fail-rate 0.3 --fail-status 503, every row still completed."""
    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(f"{i},user{i}@example.com,User{i},C{i},true\n" for i in range(60))
    (data / "orders.csv").write_text("order_id,email,first_name,customer_no,add\n" + rows)
    (data / "signups.csv").write_text("email,first_name,password\n")
    cfg_text = CONFIG.replace("{data}", str(data)).replace("{concurrency}", "8")
    cfg_text = cfg_text.replace('subscriptions = { isMemberOf = ["Shop News"] }', "")
    cfg_text = cfg_text.replace("transactional = false", "transactional = true")
    for name in ("sandbox", "client"):
        (tmp_path / f"{name}.toml").write_text(
            cfg_text.format(out=tmp_path / f"out-{name}", store=tmp_path / f"{name}.db")
        )
    box_cfg = load_config(tmp_path / "sandbox.toml", env={})
    with running_sandbox(box_cfg, SandboxOptions(fail_rate=0.3, fail_status=503, seed=3)) as box:
        result = cli(
            [
                "run",
                "--config",
                str(tmp_path / "client.toml"),
                "--mode",
                "http",
                "--job",
                "confirm",
                "--job",
                "followup",
            ],
            env=dict(box.env()),
        )
    assert result.exit_code == 0, result.output
    out = check_run_dir(last_run(tmp_path / "out-client"))
    assert len(out) == 120 and all(r["status"] == "completed" for r in out)
    assert any(e["state"] == "retrying" for r in out for e in (r["events"] or []))


@pytest.mark.parametrize("chunk_rows", ["65536", "5"])
def test_401_stops_the_run_and_fails_nothing(setup: Setup, sandbox: Any, chunk_rows: str) -> None:
    """Stopped by a 401, in one chunk or with the next chunk already claimed: nothing is
    marked sent or failed, and no claim is left to be taken for in doubt."""
    env = env_of(
        sandbox,
        setup,
        YESMAIL_API_KEY="not-the-key",
        MAILPIPE_DELIVERY_HTTP_CONCURRENCY="1",
        MAILPIPE_RUN_CHUNK_ROWS=chunk_rows,
    )
    result = cli(
        ["run", "--config", setup.config("client"), "--mode", "http", "--job", "followup"], env=env
    )
    assert result.exit_code == 2
    assert "check Api-User/Api-Key" in result.stderr
    assert "not-the-key" not in result.output + result.stderr
    assert sandbox.requests["send"] == 1  # nothing was sent after the 401
    run = last_run(setup.out("client"))
    assert not (run / "results.jsonl").exists()
    manifest = orjson.loads((run / "manifest.json").read_bytes())
    assert manifest["stages"]["deliver"]["state"] == "failed"
    with sqlite3.connect(setup.tmp / "client.ledger.db") as db:
        states = {s for (s,) in db.execute("SELECT state FROM ledger WHERE job = 'followup'")}
        claims = db.execute("SELECT count(*) FROM claims").fetchone()[0]
    assert "failed" not in states and "completed" not in states
    assert claims == 0


def test_a_refused_security_token_stops_the_run(setup: Setup, sandbox: Any) -> None:
    env = env_of(sandbox, setup, TEST_CONFIRM_TOKEN="wrong-token")
    result = cli(
        ["run", "--config", setup.config("client"), "--mode", "http", "--job", "confirm"], env=env
    )
    assert result.exit_code == 2
    assert "security token" in result.stderr and "$TEST_CONFIRM_TOKEN" in result.stderr
    assert "wrong-token" not in result.stderr


def test_an_undocumented_body_fails_the_batch_with_internal_error(setup: Setup) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="<html>Maintenance until 6pm</html>", content_type="text/html")

    with _serve(handler) as url:
        env = {
            "MAILPIPE_JOBS_CONFIRM_TRIGGER_URL": f"{url}/x?token={{token}}",
            "TEST_CONFIRM_TOKEN": "t0ken",
        }
        result = cli(
            ["run", "--config", setup.config("client"), "--mode", "http", "--job", "confirm"],
            env=env,
        )
    assert result.exit_code == 1
    rows = check_run_dir(last_run(setup.out("client")))
    sent = [r for r in rows if r["batch"]]
    assert sent and all(r["result"] == "INTERNAL_ERROR" for r in sent)
    assert all(r["error"] == "Internal execution error" for r in sent)
    assert all("Maintenance until 6pm" in r["message"] for r in sent)
    response = orjson.loads(
        (
            last_run(setup.out("client")) / "batches" / "maestro-ondemand-0001.response.json"
        ).read_bytes()
    )
    assert response == {"status": 200, "body": "<html>Maintenance until 6pm</html>"}


class _serve:
    """A foreign HTTP server (not ours) on port 0, for answers the sandbox never gives."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def __enter__(self) -> str:
        import threading

        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = self.runner.addresses[0][1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()


def test_secrets_never_reach_a_written_file(setup: Setup, sandbox: Any) -> None:
    env = env_of(sandbox, setup)
    result = cli(
        ["run", "--config", setup.config("client"), "--mode", "http", "--log-json"], env=env
    )
    assert result.exit_code == 1
    run = last_run(setup.out("client"))
    keys = [sandbox.creds.token("confirm"), sandbox.creds.api_key]
    passwords = ["pw-one-secret", "pw-bob-secret"]  # sent in mSubscriber, never written back
    for path in [*run.rglob("*"), setup.tmp / "client.toml"]:
        if not path.is_file():
            continue
        data = path.read_bytes()
        # the stage files keep the input rows as read (passwords included): not HTTP's to judge
        written = keys if "stages" in path.parts else keys + passwords
        for secret in written:
            assert secret.encode() not in data, f"{secret[:4]}… in {path}"
    for secret in keys + passwords:
        assert secret not in result.output + result.stderr
    request = orjson.loads((run / "batches" / "maestro-ondemand-0001.request.json").read_bytes())
    assert request["url"].endswith("/trigger/confirm?token=***")


def test_the_seeds_subscribe_url_is_answered_success(tmp_path: Path) -> None:
    """`mailpipe sandbox --config configs/mailpipe.toml` as shipped, fetched with urllib."""
    env = {**os.environ, "MAILPIPE_STORE_URL": f"sqlite:///{tmp_path}/sandbox.db"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "sandbox",
            "--config",
            "configs/mailpipe.toml",
            "--port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("export MAILPIPE_DELIVERY_HTTP_YESMAIL_URL="), first
        base = first.strip().split("=", 1)[1]
        url = (
            f"{base}/list/action/addSubscriberExternally.do?mContainer=2&mOwner=N10"
            "&mListId=HL%2312&mSubscriber=%7B%22email%22%3A%22first.last%40example.com%22%7D"
        )
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            assert orjson.loads(resp.read()) == {"result": "SUCCESS"}
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_print_env_matches_the_running_sandbox(setup: Setup) -> None:
    cfg_path = setup.config("sandbox")
    printed = cli(["sandbox", "--config", cfg_path, "--port", "8025", "--print-env"])
    assert printed.exit_code == 0
    again = cli(["sandbox", "--config", cfg_path, "--port", "8025", "--print-env"])
    assert again.stdout == printed.stdout  # stable for a config and store
    lines = dict(
        line.removeprefix("export ").split("=", 1) for line in printed.stdout.split("\n") if line
    )
    with running_sandbox(load_config(cfg_path, env={})) as box:
        live = dict(box.env("http://127.0.0.1:8025"))
    import shlex

    assert {k: shlex.split(v)[0] for k, v in lines.items()} == live
    assert live["MAILPIPE_JOBS_CONFIRM_TRIGGER_URL"] == (
        "http://127.0.0.1:8025/trigger/confirm?token={token}"
    )
    assert live["TEST_CONFIRM_TOKEN"] and live["YESMAIL_API_KEY"] and live["INBOXFIRST_API_KEY"]


def test_the_sandbox_holds_200_concurrent_connections(setup: Setup) -> None:
    cfg = load_config(setup.config("sandbox"), env={})
    with running_sandbox(cfg, SandboxOptions(latency=0.3)) as box:

        async def hammer() -> tuple[list[int], float]:
            loop = asyncio.get_running_loop()
            conn = aiohttp.TCPConnector(limit=0, force_close=True)
            async with aiohttp.ClientSession(connector=conn) as session:

                async def one(i: int) -> int:
                    sub = orjson.dumps(
                        {"email": f"c{i}@example.com", "profile": {"FIRST_NAME": "C"}}
                    ).decode()
                    url = (
                        f"{box.base}/list/action/addSubscriberExternally.do?mContainer=2"
                        f"&mOwner=N10&mListId=HL%2312&mSubscriber={_quote(sub)}"
                    )
                    async with session.get(url) as resp:
                        body = await resp.json()
                        return resp.status if body == {"result": "SUCCESS"} else -1

                t0 = loop.time()
                statuses = await asyncio.gather(*(one(i) for i in range(200)))
                return statuses, loop.time() - t0

        statuses, seconds = asyncio.run(hammer())
    assert statuses == [200] * 200
    # every request waited 0.3 s inside the server: they were open at the same time
    assert seconds < 0.3 * 10


def _quote(text: str) -> str:
    from pipeline.payloads.base import url_quote

    return url_quote(text)


def test_a_job_without_its_token_in_the_environment_is_a_config_error(setup: Setup) -> None:
    env = {"MAILPIPE_JOBS_CONFIRM_TRIGGER_URL": "http://127.0.0.1:9/trigger/confirm?token={token}"}
    result = cli(
        ["run", "--config", setup.config("client"), "--mode", "http", "--job", "confirm"], env=env
    )
    assert result.exit_code == 2
    assert "TEST_CONFIRM_TOKEN" in result.stderr


def test_an_unreachable_server_stops_the_run(setup: Setup) -> None:
    env = {
        "MAILPIPE_DELIVERY_HTTP_YESMAIL_URL": "http://127.0.0.1:9",
        "YESMAIL_API_USER": "u",
        "YESMAIL_API_KEY": "k",
        "MAILPIPE_DELIVERY_RETRY_ATTEMPTS": "2",
    }
    result = cli(
        ["run", "--config", setup.config("client"), "--mode", "http", "--job", "followup"], env=env
    )
    assert result.exit_code == 2
    assert "cannot connect" in result.stderr and "is the server running?" in result.stderr
    with sqlite3.connect(setup.tmp / "client.ledger.db") as db:
        states = {s for (s,) in db.execute("SELECT state FROM ledger")}
    assert "failed" not in states


def test_requests_sharing_an_address_wait_for_each_other() -> None:
    import numpy as np
    import pyarrow as pa

    from pipeline.deliver.http import unit_dependencies

    emails = pa.array(["a@x.com", "b@x.com", "A@x.com", "c@x.com", None, "b@x.com", None])
    unit = np.array([0, 0, 1, 1, 1, 2, 2])
    # unit 1 has a's second occurrence (case-insensitive); unit 2 b's; nulls tie nothing
    assert unit_dependencies(emails, unit, 3) == [[], [0], [0]]


def test_requests_whose_recipients_commute_do_not_wait() -> None:
    import numpy as np
    import pyarrow as pa

    from pipeline.deliver.http import unit_dependencies

    emails = pa.array(["a@x.com", "b@x.com", "c@x.com", "A@x.com", "b@x.com", "c@x.com"])
    unit = np.array([0, 0, 0, 1, 1, 2])
    # a: one id in both units; b: two ids; c: an id missing
    ids = pa.array(["1", "2", "3", "1", "9", None])
    assert unit_dependencies(emails, unit, 3) == [[], [0], [0]]
    assert unit_dependencies(emails, unit, 3, ids) == [[], [0], [0]]
    ids = pa.array(["1", "2", "3", "1", "2", "3"])  # every address with one id
    assert unit_dependencies(emails, unit, 3, ids) == [[], [], []]
    ids = pa.array(["1", "2", "3", "1", "2", "4"])  # only c's rows differ
    assert unit_dependencies(emails, unit, 3, ids) == [[], [], [0]]


def test_yesmail_requests_commute_only_without_subscriptions_or_profile_updates(
    setup: Setup,
) -> None:
    import pyarrow as pa

    from pipeline.payloads import builder_for

    cfg = load_config(setup.config("client"), env={})
    rows = pa.table(
        {
            "email": ["a@x.com", "b@x.com"],
            "record_id": ["1", "2"],
            "f:CUSTOMER_NO": ["C1", ""],
        }
    )
    followup = cfg.jobs["followup"]
    assert followup.subscriptions is not None  # isMemberOf: order matters
    assert builder_for(cfg.plan("followup")).commutes(rows) is None
    plain = followup.model_copy(update={"subscriptions": None})
    cfg.jobs["followup"] = plain
    assert builder_for(cfg.plan("followup")).commutes(rows).to_pylist() == ["C1", None]
    cfg.jobs["followup"] = plain.model_copy(update={"updateProfile": True})
    assert builder_for(cfg.plan("followup")).commutes(rows) is None


def test_a_stop_in_one_chunk_stops_the_chunks_under_way_beside_it() -> None:
    from pipeline.deliver.http import run_in_order
    from pipeline.errors import DeliveryStopped

    started: list[tuple[str, int]] = []
    stops: list[Exception] = []

    async def both() -> tuple[Any, Any]:
        gate = asyncio.Event()

        async def first(k: int, _release: Callable[[], None]) -> int:
            started.append(("first", k))
            raise DeliveryStopped("HTTP 401: check Api-User/Api-Key", code=401)

        async def second(k: int, _release: Callable[[], None]) -> int:
            started.append(("second", k))
            if k == 0:
                gate.set()
                await asyncio.sleep(0.01)  # under way when the stop comes: answered
            return k

        async def later() -> Any:
            await gate.wait()
            return await run_in_order([[], []], first, stops=stops)

        return await asyncio.gather(later(), run_in_order([[], [0]], second, stops=stops))

    (_, stop1), (out2, stop2) = asyncio.run(both())
    assert isinstance(stop1, DeliveryStopped) and isinstance(stop2, DeliveryStopped)
    assert stop1 is not stop2  # each chunk's stop carries that chunk's answers
    assert stop2.code == 401 and "check Api-User/Api-Key" in str(stop2)
    assert out2 == [0, None]  # its second request waited for the first, then did not start
    assert ("second", 1) not in started


def test_a_freed_slot_goes_to_a_follow_up_before_new_requests() -> None:
    from pipeline.deliver.transport import _Slots

    async def scenario() -> tuple[list[str], int]:
        slots = _Slots(2)
        order: list[str] = []
        busy = 0
        most = 0

        async def request(name: str, follow_up: bool, hold: float) -> None:
            nonlocal busy, most
            await slots.acquire(follow_up)
            try:
                busy += 1
                most = max(most, busy)
                order.append(name)
                await asyncio.sleep(hold)
            finally:
                busy -= 1
                slots.release()

        first = [asyncio.create_task(request(f"send{i}", False, 0.02)) for i in range(2)]
        await asyncio.sleep(0)  # both slots taken
        later = [asyncio.create_task(request(f"send{i}", False, 0.0)) for i in range(2, 4)]
        cancelled = asyncio.create_task(request("poll-cancelled", True, 0.0))
        polls = [asyncio.create_task(request(f"poll{i}", True, 0.0)) for i in range(2)]
        await asyncio.sleep(0)
        cancelled.cancel()  # a waiter that goes away takes no slot with it
        await asyncio.gather(*first, *later, *polls, cancelled, return_exceptions=True)
        return order, most

    order, most = asyncio.run(scenario())
    assert order == ["send0", "send1", "poll0", "poll1", "send2", "send3"]
    assert most == 2


def test_only_the_documented_recip_answers_are_read() -> None:
    from pipeline.deliver.http_maestro import parse_recip_answer

    ok = b'[{"result":"SUCCESS"},{"result":"SEND_ERROR","error":"Sending failed","message":"x"}]'
    assert parse_recip_answer(ok, 2) == [
        ("SUCCESS", None, None),
        ("SEND_ERROR", "Sending failed", "x"),
    ]
    whole = b'{"result":"TRIGGER_CLOSED","error":"Trigger closed"}'
    assert parse_recip_answer(whole, 3) == [("TRIGGER_CLOSED", "Trigger closed", None)] * 3
    for bad in (
        b"OK",
        b'[{"result":"SUCCESS"}]',  # one answer for two recipients
        b'[{"result":"SUCCESS"},{"result":"NOT_A_CODE","error":"?"}]',
        b'[{"result":"SUCCESS"},{"result":"SEND_ERROR"}]',  # error is always there
    ):
        assert parse_recip_answer(bad, 2) is None


def test_retries_that_run_out_fail_the_rows_as_transient(setup: Setup) -> None:
    cfg = load_config(setup.config("sandbox"), env={})
    with running_sandbox(cfg, SandboxOptions(fail_rate=1.0, fail_status=503)) as box:
        env = {**dict(box.env()), "MAILPIPE_DELIVERY_RETRY_ATTEMPTS": "2"}
        result = cli(
            ["run", "--config", setup.config("client"), "--mode", "http", "--job", "confirm"],
            env=env,
        )
        assert box.requests["injected-failure"] == 2 * 5  # 5 batches, 2 attempts each
    assert result.exit_code == 1
    sent = [r for r in check_run_dir(last_run(setup.out("client"))) if r["batch"]]
    assert sent and all(r["result"] == "INTERNAL_ERROR" for r in sent)
    assert all("HTTP 503" in r["message"] and "after 2 attempts" in r["message"] for r in sent)
    assert all([e["state"] for e in r["events"]] == ["retrying"] for r in sent)
    with sqlite3.connect(setup.tmp / "client.ledger.db") as db:
        rows = db.execute("SELECT state, transient FROM ledger WHERE job = 'confirm'").fetchall()
    assert rows and all(state == "failed" and transient for state, transient in rows)


def test_a_released_request_lets_the_requests_after_it_start() -> None:
    from pipeline.deliver.http import run_in_order

    log: list[str] = []

    async def send(k: int, release: Callable[[], None]) -> int:
        log.append(f"start {k}")
        if k == 0:
            release()  # judged: what is left (a ticket to follow) changes nothing for unit 1
            await asyncio.sleep(0.01)
        log.append(f"end {k}")
        return k

    out, stop = asyncio.run(run_in_order([[], [0]], send))
    assert out == [0, 1] and stop is None
    assert log.index("start 1") < log.index("end 0")


def test_the_sandbox_store_is_checkpointed_by_a_thread_not_by_commits(tmp_path: Path) -> None:
    import time

    from pipeline.checkpoint import Checkpointer
    from pipeline.store import Store

    path = tmp_path / "box.db"
    store = Store(f"sqlite:///{path}")
    checkpointer = Checkpointer(store, every=0.05)

    def in_the_database_file() -> bool:  # immutable: reads the file, not the log
        with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
            found = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'")
            return bool(found.fetchone()[0])

    with store.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        conn.exec_driver_sql("CREATE TABLE t (x)")
    assert not in_the_database_file()
    checkpointer.start()
    try:
        deadline = time.monotonic() + 5
        while not in_the_database_file():
            assert time.monotonic() < deadline, "no checkpoint within 5 s"
            time.sleep(0.02)
    finally:
        checkpointer.stop()
        store.close()


def test_a_yesmail_request_is_answered_once_what_it_changed_is_committed(
    setup: Setup, sandbox: Any
) -> None:
    """The sandbox commits a request's changes (on a thread) before it answers 202: another
    connection to the store file sees them, and the next request is judged on them."""
    from pipeline.store import sqlite_file

    db = sqlite_file(sandbox.store.url)
    assert db is not None

    def post(body: dict[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"{sandbox.base}/v2/emails/send",
            data=orjson.dumps(body),
            headers={
                "Api-User": sandbox.creds.api_user,
                "Api-Key": sandbox.creds.api_key,
                "Content-Type": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, orjson.loads(e.read())

    def sent(recipient: dict[str, Any], transactional: bool) -> dict[str, Any]:
        return {
            "content": {"templateId": "1"},
            "transactional": transactional,
            "recipients": [recipient],
        }

    joins = {"email": "joins@example.com", "id": "J", "subscriptions": {"add": ["Banjo"]}}
    assert post(sent(joins, True))[0] == 202
    with sqlite3.connect(db) as other:  # a connection of its own: committed rows only
        assert other.execute(
            "SELECT y.id, s.division FROM ym_subscribers y JOIN ym_subscriptions s "
            "USING (email_key) WHERE email_key = 'joins@example.com'"
        ).fetchall() == [("J", "Banjo")]
    member = {"email": "joins@example.com", "subscriptions": {"isMemberOf": ["Banjo"]}}
    assert post(sent(member, False))[0] == 202
    stranger = {**member, "email": "stranger@example.com", "id": "S"}
    assert post(sent(stranger, False)) == (
        409,
        {"status": 409, "message": "Subscriber must be a memberOf one of '[Banjo]'."},
    )


def test_an_http_rerun_in_chunks_sends_nothing_again(setup: Setup, sandbox: Any) -> None:
    """Chunks whose records the ledger settled are not sent (even while the chunk before
    is being recorded); a grown file sends only its new rows, in their own chunk."""
    env = env_of(sandbox, setup, MAILPIPE_RUN_CHUNK_ROWS="4")
    args = ["run", "--config", setup.config("client"), "--mode", "http", "--job", "confirm"]
    assert cli(args, env=env).exit_code == 1  # some rows fail on purpose
    first_dir = last_run(setup.out("client"))
    first = check_run_dir(first_dir)
    calls = sandbox.requests["trigger"]
    data = setup.tmp / "data" / "orders.csv"
    data.write_text(data.read_text() + "14,zoe@example.com,Zoe,C10,true\n")
    assert cli(args, env=env).exit_code == 0
    again = check_run_dir(last_run(setup.out("client")))
    assert [r["status"] for r in again[:-1]] == ["ignored"] * len(first)
    assert {r["earlier_run"] for r in again[:-1]} == {first_dir.name}
    assert again[-1]["status"] == "completed" and again[-1]["email"] == "zoe@example.com"
    assert sandbox.requests["trigger"] == calls + 1  # only Zoe's batch went out


def test_tickets_are_first_polled_after_the_time_tickets_take(setup: Setup) -> None:
    """Once tickets have completed, the next ones are first read after about as long as
    those took: mostly one GET a ticket, not a GET every poll_interval (2 ms here)."""
    options = SandboxOptions(ticket_delay=0.03)  # 60 ms from accepted to completed
    with running_sandbox(load_config(setup.config("sandbox"), env={}), options) as box:
        env = env_of(
            box,
            setup,
            MAILPIPE_RUN_CHUNK_ROWS="4",  # chunk after chunk
            MAILPIPE_DELIVERY_HTTP_POLL_MAX_INTERVAL="1",
        )
        done = cli(
            ["run", "--config", setup.config("client"), "--mode", "http", "--job", "followup"],
            env=env,
        )
        assert done.exit_code == 1, done.output  # some rows fail on purpose
        tickets, reads = len(box.tickets), box.requests["ticket"]
    assert tickets >= 3
    # polled every 2, 4, 8 … ms, each ticket would be read about 5 times
    assert reads < 3 * tickets, (reads, tickets)


def test_the_next_chunk_goes_while_the_tickets_of_the_one_before_are_followed(
    setup: Setup,
) -> None:
    """A chunk is sent once the platform has judged the one before (its 202s are in), not
    after that one's tickets completed: with tickets taking 0.4 s, each batch (a chunk of
    its own here) is accepted before the batch before it has completed; the results are
    still those of simulate."""
    options = SandboxOptions(ticket_delay=0.2)  # 0.4 s from accepted to completed
    # batches of 4: the 11 recipients with a customer number make 3 batches, each with
    # recipients the platform accepts (fay and new, without one, are refused before)
    size = {"MAILPIPE_JOBS_FOLLOWUP_BATCH_SIZE": "4"}
    with running_sandbox(load_config(setup.config("sandbox"), env={}), options) as box:
        env = env_of(box, setup, MAILPIPE_RUN_CHUNK_ROWS="4", **size)
        args = ["run", "--config", setup.config("client"), "--mode", "http", "--job", "followup"]
        assert cli(args, env=env).exit_code == 1  # some rows fail on purpose
        tickets = [t.document() for t in box.tickets.values()]
    accepted: dict[str, str] = {}
    completed: dict[str, str] = {}
    for t in tickets:
        batch, times = t["response"]["ref"], {e["state"]: e["time"] for e in t["events"]}
        accepted[batch] = min(accepted.get(batch, times["accepted"]), times["accepted"])
        completed[batch] = max(completed.get(batch, times["completed"]), times["completed"])
    batches = sorted(accepted)
    assert len(batches) >= 3
    for before, after in itertools.pairwise(batches):
        assert accepted[after] < completed[before], (before, after)
    sim_args = ["run", "--config", setup.config("sim"), "--mode", "simulate", "--job", "followup"]
    assert cli(sim_args, env=size).exit_code == 1
    http_rows = check_run_dir(last_run(setup.out("client")))
    assert comparable(http_rows) == comparable(check_run_dir(last_run(setup.out("sim"))))


def test_a_prepared_chunk_is_sent_from_its_prepared_items_and_a_subset_rebuilds(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HttpBackend.prepare`` builds the request bodies ahead; the chunk's claimed part
    (a subset) must not inherit them, or it would send recipients it did not claim."""
    import numpy as np
    import pyarrow as pa

    from pipeline.deliver.http import ChunkItems, HttpBackend, chunk_items
    from pipeline.deliver.runner import Chunk

    cfg = load_config(setup.config("unit"), env={})
    plan = cfg.plan("followup")
    monkeypatch.setenv(cfg.delivery.http.api_user_env or "", "user")
    monkeypatch.setenv(cfg.delivery.http.api_key_env or "", "key")
    backend = HttpBackend(cfg, plan)
    rows = pa.table(
        {
            "_rec": pa.array([0, 1, 2], pa.int64()),
            "_esc": pa.array([False] * 3),
            "email": ["a@example.com", "b@example.com", "a@example.com"],
            "record_id": ["1", "2", "3"],
            **{  # as normalize leaves them: each recipient has its id (CUSTOMER_NO)
                f"f:{name}": pa.array([f"{name}-{i}" for i in range(3)], pa.string())
                for name in plan.fields
                if plan.field_spec(name).type != "number"
            },
            **{
                f"f:{name}": pa.array([None] * 3, pa.int64())
                for name in plan.fields
                if plan.field_spec(name).type == "number"
            },
        }
    )
    chunk = Chunk(plan.target, rows, np.array([1, 2]), np.array([0, 2, 3]))
    fresh = chunk_items(backend.builder, chunk)
    backend.prepare(chunk)
    assert isinstance(chunk.prepared, ChunkItems)
    assert chunk_items(backend.builder, chunk) is chunk.prepared
    assert bytes(chunk.prepared.data) == bytes(fresh.data)
    assert chunk.prepared.deps == fresh.deps == [[], [0]]  # a@ is in both requests
    part = chunk.subset(np.array([False, True, True]))
    assert part.prepared is None
    items = chunk_items(backend.builder, part)
    sent = [
        orjson.loads(bytes(items.data[items.offsets[i] : items.offsets[i + 1] - 1]))["email"]
        for i in range(2)
    ]
    assert sent == ["b@example.com", "a@example.com"]  # the claimed rows, and only those
    assert items.deps == [[], []]


def test_a_one_recipient_ticket_moves_to_its_data_with_the_uri_parameters(setup: Setup) -> None:
    """Over HTTP, as 003_… shows a single recipient: accepted (response with uri and ref,
    the rest null) → completed with ``data`` {messageId, sentTime}; no async results."""
    cfg = load_config(setup.config("sandbox"), env={})
    with running_sandbox(cfg, SandboxOptions(ticket_delay=0.05)) as box:
        headers = {"Api-User": box.creds.api_user, "Api-Key": box.creds.api_key}
        hook = "http://requestb.in/pd212hpd"
        query = "responseRef=PO%20611&responseUri=" + _quote(hook)
        body = {
            "content": {"templateId": "1465362"},
            "recipients": [{"email": "jerry.garcia@yesmail.com", "id": "jerry"}],
        }
        req = urllib.request.Request(
            f"{box.base}/v2/emails/send?{query}",
            data=orjson.dumps(body),
            headers={**headers, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
            first = orjson.loads(resp.read())
            location = resp.headers["Content-Location"]
        assert first["state"] == "accepted"
        assert first["request"]["uri"] == (
            f"{box.base}/v2/emails/send?responseRef=PO%20611&responseUri=http%3A%2F%2Frequestb.in"
            "%2Fpd212hpd"
        )
        assert first["response"] == dict(
            uri=hook, ref="PO 611", time=None, code=None, location=None, data=None
        )
        for _ in range(100):
            with urllib.request.urlopen(
                urllib.request.Request(location, headers=headers), timeout=10
            ) as resp:
                ticket = orjson.loads(resp.read())
            if ticket["state"] == "completed":
                break
            time.sleep(0.02)
        assert [e["state"] for e in ticket["events"]] == ["accepted", "completed"]
        data = ticket["response"]["data"]
        assert ticket["response"] == {"uri": hook, "ref": "PO 611", "data": data}
        assert re.fullmatch(r"\d{12}", data["messageId"])
        assert data["sentTime"] == ticket["lastUpdate"] == ticket["events"][-1]["time"]


def test_a_call_the_engine_fails_on_fails_alone() -> None:
    """Calls answered together: when the engine raises for the group, each is answered
    alone, and only the one it fails on gets the error (a 500), not its neighbours."""
    from pipeline.sandbox.server import _Aggregator

    judged: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        judged.append(list(items))
        if "bad" in items:
            raise ValueError("cannot judge 'bad'")
        return [f"ok {x}" for x in items]

    async def engine(fn: Callable[[list[str]], list[str]], items: list[str]) -> list[str]:
        return fn(items)

    async def main() -> list[Any]:
        agg: _Aggregator[str, str] = _Aggregator(run, engine)
        return await asyncio.gather(
            agg.submit(["a"]), agg.submit(["bad"]), agg.submit(["c", "d"]), return_exceptions=True
        )

    a, bad, cd = asyncio.run(main())
    assert a == ["ok a"] and cd == ["ok c", "ok d"]
    assert isinstance(bad, ValueError)
    assert judged[0] == ["a", "bad", "c", "d"]  # together first, then each alone
    assert judged[1:] == [["a"], ["bad"], ["c", "d"]]


def test_the_sandbox_refuses_bytes_that_are_not_utf8_and_answers_arrays(setup: Setup) -> None:
    """Percent-escapes that are not UTF-8 are refused (PARSE_ERROR; subscribe:
    PARAMETER_VALIDATION_ERROR), not stored with U+FFFD in their place; an escaped U+FFFD
    is text like any other. A refused job answers an array ``recip`` with an array."""
    cfg = load_config(setup.config("sandbox"), env={})
    with running_sandbox(cfg) as box:
        trigger = f"{box.base}/trigger/confirm?token={box.creds.token('confirm')}&recip="

        def get(url: str) -> Any:
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
                return orjson.loads(resp.read())

        latin1 = "%7B%22email%22%3A%22y%FF%40example.com%22%2C%22ifNotExistsAddAndSend%22%3Atrue%7D"
        assert get(trigger + latin1) == {
            "result": "PARSE_ERROR",
            "error": "Parse error in JSON data",
            "message": "The recip parameter is not URL-encoded UTF-8",
        }
        subscribe = (
            f"{box.base}/list/action/addSubscriberExternally.do?mContainer=2&mOwner=N10"
            "&mListId=HL%2312&mSubscriber=%7B%22email%22%3A%22x%E9%40example.com%22%7D"
        )
        assert get(subscribe) == {
            "result": "FAILED",
            "reason": {
                "type": "PARAMETER_VALIDATION_ERROR",
                "message": "The mSubscriber parameter is not URL-encoded UTF-8",
            },
        }
        fffd = orjson.dumps(
            {
                "email": "z@example.com",
                "ifNotExistsAddAndSend": True,
                "profile": {"FIRST_NAME": "\ufffd"},
            }
        ).decode()
        assert get(trigger + _quote(fffd)) == {"result": "SUCCESS"}
        with box.store.begin() as conn:
            found = box.store.subscribers_of(
                conn, ["shop"], ["z@example.com", "y\ufffd@example.com"]
            )
        assert list(found) == [("shop", "z@example.com")]
        assert orjson.loads(found[("shop", "z@example.com")]["profile"]) == {"FIRST_NAME": "\ufffd"}

        box.store.sync_mail_jobs({"confirm": "closed"})
        two = orjson.dumps([{"email": "a@example.com"}, {"email": "b@example.com"}]).decode()
        closed = {"result": "TRIGGER_CLOSED", "error": "Trigger closed"}
        assert get(trigger + _quote(two)) == [closed, closed]


def test_the_external_subscribe_url_leads_to_a_page(setup: Setup) -> None:
    """AUTHENTICATION_REQUIRED's externalSubscribeURL is served (it was a 404)."""
    cfg = load_config(setup.config("sandbox"), env={})
    with running_sandbox(cfg) as box:
        url = (
            f"{box.base}/list/subscribe.html?mContainer=2&mOwner=N10&mListId=HL%2312"
            "&email=a%3Cb%40example.com"
        )
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
            page = resp.read().decode()
        assert "Subscribe to Shop" in page and "a&lt;b@example.com" in page
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url.replace("HL%2312", "NOPE"), timeout=10)
        assert missing.value.code == 404


def test_the_final_ticket_is_posted_to_the_response_uri(setup: Setup) -> None:
    """003_…'s responseUri: the sandbox posts the completed ticket there, once."""
    import http.server
    import threading

    got: list[tuple[str, bytes]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            got.append((self.path, self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        cfg = load_config(setup.config("sandbox"), env={})
        with running_sandbox(cfg) as box:
            headers = {"Api-User": box.creds.api_user, "Api-Key": box.creds.api_key}
            uri = f"http://127.0.0.1:{hook.server_address[1]}/hook?x=1"
            body = {
                "content": {"templateId": "1465362"},
                "recipients": [
                    {"email": "a@example.com", "id": "a"},
                    {"email": "b@example.com", "id": "b"},
                ],
            }
            req = urllib.request.Request(
                f"{box.base}/v2/emails/send?responseRef=R1&responseUri={_quote(uri)}",
                data=orjson.dumps(body),
                headers={**headers, "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                ticket_id = orjson.loads(resp.read())["id"]
            ticket = box.tickets[ticket_id]
            for _ in range(500):  # posted once the ticket completed, its answer read
                if ticket.posted is not None:
                    break
                time.sleep(0.01)
            assert ticket.posted == 204
    finally:
        hook.shutdown()
    [(path, posted)] = got
    assert path == "/hook?x=1"
    doc = orjson.loads(posted)
    assert doc["id"] == ticket_id and doc["state"] == "completed"
    assert doc["response"]["uri"] == uri and doc["response"]["ref"] == "R1"
    assert doc["response"]["location"].startswith(f"{box.base}/v2/async-results/")
