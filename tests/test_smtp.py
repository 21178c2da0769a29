"""smtp mode end to end: real aiosmtpd servers on port 0, runs through the CLI.

A recording server checks the messages themselves; fault servers (one
handler swapped) check the outcome of each kind of failure; every run
directory goes through the row invariant.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from rundir_contract import check_run_dir
from smtp_servers import (
    PLAIN_ORDERS,
    TOKEN_KEY,
    DataFault,
    Project,
    RcptFault,
    Recorder,
    Server,
    make_certificate,
    server_tls,
)

from pipeline.cli import main


@pytest.fixture(autouse=True)
def token_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN_KEY", TOKEN_KEY)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def run(args: list[str]) -> Result:
    return CliRunner().invoke(main, args, catch_exceptions=False)


def smtp_run(config: str, *extra: str) -> tuple[Result, list[dict[str, Any]]]:
    """`mailpipe run --json`; the result and the checked results.jsonl rows."""
    result = run(["run", "--config", config, "--json", *extra])
    assert result.exit_code in (0, 1), result.output
    summary = orjson.loads(result.stdout)
    return result, check_run_dir(summary["run_dir"])


def by_email(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["email"]: r for r in rows if r["email"]}


def events(row: dict[str, Any]) -> list[dict[str, str]]:
    value = row["events"]
    return (orjson.loads(value) if isinstance(value, str) else value) or []


def content(part: Any) -> str:
    """A MIME part's decoded text, line ends as in Python."""
    return str(part.get_content()).replace("\r\n", "\n")


def suppress(project: Project, config: str, address: str) -> None:
    path = project.data / "suppression.csv"
    path.write_text(f"email,reason,added_at\n{address},complaint,2026-01-01\n")
    assert run(["suppression", "import", "--config", config, str(path)]).exit_code == 0


# -- the messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_messages_arrive_as_specified(project: Project, pipelining: bool) -> None:
    rec = Recorder(pipelining=pipelining)
    with Server(rec) as srv:
        config = project.config(srv.port, pool_size=1)
        suppress(project, config, "sup@example.com")
        result, rows = smtp_run(config)
    assert result.exit_code == 1  # the header injection and the bad address fail
    got = by_email(rows)
    completed = {r["email"] for r in rows if r["status"] == "completed"}
    # messages received = recipients completed (zoe's two line items are one recipient)
    assert completed == {"ann@example.com", "zoe@bücher.example", "bob@example.com"}
    assert len(rec.received) == len(completed)
    assert all(r.mail_from == "bounces@shop.test" for r in rec.received)
    # one connection: RSET between its messages
    assert rec.commands.count("RSET") == len(rec.received) - 1

    (ann,) = rec.to("ann@example.com")
    msg = ann.message()
    assert msg["From"].addresses[0].display_name == "Zoë's Shop"
    assert msg["From"].addresses[0].addr_spec == "orders@shop.test"
    assert str(msg["Reply-To"]) == "help@shop.test"
    assert str(msg["Sender"]) == "mailer@shop.test"
    assert str(msg["To"]) == "ann@example.com"
    assert str(msg["Subject"]) == "Order 1 for Ann"
    assert re.fullmatch(r"<[0-9a-f]{32}@shop\.test>", str(msg["Message-ID"]))
    assert msg["Date"].datetime is not None
    assert str(msg["MIME-Version"]) == "1.0"
    assert str(msg["X-Company"]) == "Example Shop"
    assert re.fullmatch(
        r"<https://shop\.test/unsubscribe\?t=[\w.-]+>", str(msg["List-Unsubscribe"])
    )
    assert str(msg["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    assert msg.get_content_type() == "multipart/alternative"
    text, html_part = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert html_part.get_content_type() == "text/html"
    body = content(text)
    assert "Hello Ann Lee," in body
    assert "\n.a line that starts with a dot\n" in body  # dot-stuffed on the wire, intact here
    assert "gift: Gift wrap" in body  # an html = true field: tags dropped in the text part
    assert "<p><b>Gift</b> wrap</p>" in content(html_part)  # and kept in the HTML part
    assert "&amp; co" in content(html_part)  # an HTML entity of the template stays

    (zoe,) = rec.to("zoe@xn--bcher-kva.example")  # the IDN domain in ASCII form
    z = zoe.message()
    assert str(z["Subject"]) == "Order 2 for Zoë"
    assert b"=?utf-8?" in zoe.data.split(b"\r\n\r\n")[0]  # encoded words on the wire
    assert "Hello Zoë Müller," in content(next(z.iter_parts()))
    assert "SMTPUTF8" not in zoe.mail_options

    (bob,) = rec.to("bob@example.com")
    t, h = bob.message().iter_parts()
    assert "Hello Bob O'Brien & <Sons>," in content(t)
    assert "Hello Bob O&#x27;Brien &amp; &lt;Sons&gt; &amp; co" in content(h)

    # the injection: refused with the field named, never sent, no second header anywhere
    eve = got["eve@example.com"]
    assert eve["status"] == "failed" and eve["result"] == "INVALID_PROFILE"
    assert eve["error"] == "Invalid profile property"
    assert "FIRST_NAME" in eve["message"]
    assert not rec.to("eve@example.com")
    for r in rec.received:
        assert r.message()["Bcc"] is None
        assert b"evil.example" not in r.data
    assert got["sup@example.com"]["result"] == "ADDRESS_REJECTED_BY_SUPPRESSION_LIST"
    assert not rec.to("sup@example.com")

    # the response file: the engine's answer and what the server said, per recipient
    run_dir = Path(orjson.loads(result.stdout)["run_dir"])
    (response,) = (run_dir / "batches").glob("*.response.json")
    doc = orjson.loads(response.read_bytes())
    assert doc["smtp"]["port"] == srv.port
    # five recipients in the batch; the injection never reached the engine
    assert len(doc["engine"]) == 4 and len(doc["recipients"]) == 5
    entries = {e["email"]: e for e in doc["recipients"]}
    assert entries["ann@example.com"]["code"] == 250
    assert entries["ann@example.com"]["reply"].startswith("250 2.0.0 Ok: queued as")
    assert entries["ann@example.com"]["message_id"] == str(msg["Message-ID"])
    assert entries["eve@example.com"]["sent"] is False
    assert entries["sup@example.com"]["sent"] is False


def test_message_id_is_the_same_on_a_resend(project: Project) -> None:
    rec = Recorder()
    with Server(rec) as srv:
        config = project.config(srv.port)
        smtp_run(config, "--job", "confirm")
        smtp_run(config, "--job", "confirm", "--resend", "confirm")
    first, second = rec.to("ann@example.com")
    assert first.message()["Message-ID"] == second.message()["Message-ID"]
    (bob,) = rec.to("bob@example.com")[:1]
    assert bob.message()["Message-ID"] != first.message()["Message-ID"]


@pytest.mark.parametrize("offered", [True, False], ids=["offered", "not-offered"])
def test_internationalized_address_needs_smtputf8(project: Project, offered: bool) -> None:
    project.orders(PLAIN_ORDERS + "9,jürgen@example.com,Jürgen,X,9.00,\n")
    rec = Recorder()
    with Server(rec, smtputf8=offered) as srv:
        _, rows = smtp_run(project.config(srv.port))
    got = by_email(rows)
    jurgen = got["jürgen@example.com"]
    if offered:
        assert jurgen["status"] == "completed"
        (msg,) = rec.to("jürgen@example.com")
        assert "SMTPUTF8" in msg.mail_options
        assert str(msg.message()["To"]) == "jürgen@example.com"
    else:
        assert jurgen["status"] == "failed" and jurgen["result"] == "SEND_ERROR"
        assert "SMTPUTF8" in jurgen["message"]
        assert not rec.to("jürgen@example.com")
    # the others go on either way
    assert sum(r["status"] == "completed" for r in rows) == 5 + offered
    assert len(rec.received) == 5 + offered


# -- faults ---------------------------------------------------------------------------------

BUSY = "450 4.2.1 Mailbox busy, try later"
UNKNOWN = "550 5.1.1 No such user here"


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_450_on_rcpt_is_retried_then_completed(project: Project, pipelining: bool) -> None:
    project.orders(PLAIN_ORDERS)
    rec = RcptFault(BUSY, lambda a: True, times=1, pipelining=pipelining)
    with Server(rec) as srv:
        result, rows = smtp_run(project.config(srv.port))
    assert result.exit_code == 0
    assert all(r["status"] == "completed" and r["result"] == "SUCCESS" for r in rows)
    for r in rows:
        (ev,) = events(r)
        assert ev["state"] == "retrying"
        assert "450 4.2.1 Mailbox busy, try later" in ev["message"]
    assert len(rec.received) == 5


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_450_for_good_fails_after_the_last_try(project: Project, pipelining: bool) -> None:
    project.orders(PLAIN_ORDERS)
    rec = RcptFault(BUSY, lambda a: a.startswith("bob"), times=0, pipelining=pipelining)
    with Server(rec) as srv:
        result, rows = smtp_run(project.config(srv.port, attempts=3))
    assert result.exit_code == 1
    bob = by_email(rows)["bob@example.com"]
    assert bob["status"] == "failed" and bob["result"] == "SEND_ERROR"
    assert bob["error"] == "Sending failed"
    assert BUSY in bob["message"] and "gave up after 3 tries" in bob["message"]
    assert [e["state"] for e in events(bob)] == ["retrying", "retrying"]
    assert rec.seen["bob@example.com"] == 3
    assert {r["email"] for r in rows if r["status"] == "completed"} == {
        f"{n}@example.com" for n in ("ann", "cy", "dee", "eli")
    }


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_550_on_rcpt_fails_at_once(project: Project, pipelining: bool) -> None:
    project.orders(PLAIN_ORDERS)
    rec = RcptFault(UNKNOWN, lambda a: a.startswith("bob"), pipelining=pipelining)
    with Server(rec) as srv:
        result, rows = smtp_run(project.config(srv.port))
    assert result.exit_code == 1
    bob = by_email(rows)["bob@example.com"]
    assert bob["status"] == "failed" and bob["result"] == "SEND_ERROR"
    assert bob["message"] == UNKNOWN
    assert events(bob) == []
    assert rec.seen["bob@example.com"] == 1
    # the messages after it on the same connection went out
    assert len(rec.received) == 4


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_421_and_disconnect_during_data_is_retried(project: Project, pipelining: bool) -> None:
    project.orders(PLAIN_ORDERS)
    rec = DataFault(times=1, pipelining=pipelining)
    with Server(rec) as srv:
        # pipelined, a message whose envelope went out with a 421'd content is retried too:
        # enough tries for that
        result, rows = smtp_run(project.config(srv.port, attempts=6))
    assert result.exit_code == 0
    for r in rows:
        assert r["status"] == "completed"
        reasons = [e["message"] for e in events(r)]
        assert reasons and all("421" in why for why in reasons)
        if not pipelining:
            assert len(reasons) == 1
    # every recipient's content reached the server twice: 421 and closed, then accepted
    assert sorted(rec.seen.values()) == [2] * 5
    assert len(rec.received) == 5


def test_server_slower_than_the_timeout(project: Project) -> None:
    project.orders(PLAIN_ORDERS)
    rec = DataFault(times=0, delay=1.5)
    with Server(rec) as srv:
        result, rows = smtp_run(project.config(srv.port, timeout=0.3, attempts=2))
    assert result.exit_code == 1
    for r in rows:
        assert r["status"] == "failed" and r["result"] == "SEND_ERROR"
        assert "did not answer within 0.3 s" in r["message"]
        assert "gave up after 2 tries" in r["message"]
        (ev,) = events(r)
        assert "did not answer within 0.3 s" in ev["message"]


def test_server_dropping_every_third_connection(project: Project) -> None:
    project.orders(PLAIN_ORDERS)
    rec = Recorder()
    with Server(rec, drop_every=3) as srv:
        result, rows = smtp_run(project.config(srv.port, per_connection=1, attempts=4))
    assert result.exit_code == 0
    assert all(r["status"] == "completed" for r in rows)
    dropped = [e for r in rows for e in events(r)]
    assert dropped and all("connection" in e["message"] for e in dropped)
    assert sorted(r.rcpt_tos[0] for r in rec.received) == sorted(r["email"] for r in rows)


def test_rerun_after_faults_sends_only_what_did_not_complete(project: Project) -> None:
    project.orders(PLAIN_ORDERS)
    faulty = _Rules({"bob@example.com": BUSY, "cy@example.com": UNKNOWN})
    with Server(faulty) as srv:
        _, rows = smtp_run(project.config(srv.port, attempts=2))
    status = {r["email"]: r["status"] for r in rows}
    assert status == {
        "ann@example.com": "completed",
        "bob@example.com": "failed",  # 450 after the last try: transient
        "cy@example.com": "failed",  # 550: permanent
        "dee@example.com": "completed",
        "eli@example.com": "completed",
    }
    again = Recorder()
    with Server(again) as srv:
        result, rows = smtp_run(project.config(srv.port, attempts=2))
    assert result.exit_code == 0
    assert [r.rcpt_tos for r in again.received] == [["bob@example.com"]]
    got = by_email(rows)
    assert got["bob@example.com"]["status"] == "completed"
    for name in ("ann", "cy", "dee", "eli"):
        assert got[f"{name}@example.com"]["status"] == "ignored"
        assert got[f"{name}@example.com"]["earlier_run"]


class _Rules(Recorder):
    """RCPT answered from a table: address -> reply (the others accepted)."""

    def __init__(self, rules: dict[str, str]) -> None:
        super().__init__()
        self.rules = rules

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.rules:
            return self.rules[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_rate_limit_spaces_the_messages(project: Project) -> None:
    project.orders(PLAIN_ORDERS)
    rec = Recorder()
    with Server(rec) as srv:
        config = project.config(srv.port, rate=10, pool_size=3)
        t0 = time.monotonic()
        smtp_run(config)
        took = time.monotonic() - t0
    assert len(rec.received) == 5
    assert took >= 0.4  # 5 messages at 10 a second: at least 4 intervals of 0.1 s


# -- TLS and AUTH ------------------------------------------------------------------------

PASSWORD = "s3cret-Pa55word-that-must-not-leak"


def _tls_project(project: Project, port: int, cert: Path, security: str) -> str:
    extra = (
        f'ca_file = "{cert}"\nusername_env = "TEST_SMTP_USER"\npassword_env = "TEST_SMTP_PASSWORD"'
    )
    return project.config(port, security=security, smtp_extra=extra)


def test_starttls_and_auth_and_the_password_never_written(
    project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    project.orders(PLAIN_ORDERS)
    cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("TEST_SMTP_USER", "mailer")
    monkeypatch.setenv("TEST_SMTP_PASSWORD", PASSWORD)
    rec = Recorder()
    server = Server(
        rec,
        tls_context=server_tls(cert, key),
        require_starttls=True,
        credentials=("mailer", PASSWORD),
    )
    with server as srv:
        config = _tls_project(project, srv.port, cert, "starttls")
        result, rows = smtp_run(config)
        check = run(["smtp", "check", "--config", config])
    assert all(r["status"] == "completed" for r in rows)
    assert len(rec.received) == 5
    assert check.exit_code == 0, check.output
    assert "TLS" in check.stdout and "certificate verified" in check.stdout
    assert "logged in" in check.stdout
    outputs = result.output + check.output
    assert PASSWORD not in outputs
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "results.jsonl" for p in written)
    for path in written:
        assert PASSWORD.encode() not in path.read_bytes(), path


def test_refused_login_stops_the_run_and_leaves_rows_for_the_next(
    project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    project.orders(PLAIN_ORDERS)
    cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("TEST_SMTP_USER", "mailer")
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong-" + PASSWORD)
    rec = Recorder()
    server = Server(
        rec,
        tls_context=server_tls(cert, key),
        require_starttls=True,
        credentials=("mailer", PASSWORD),
    )
    with server as srv:
        config = _tls_project(project, srv.port, cert, "starttls")
        result = run(["run", "--config", config])
        assert result.exit_code == 2
        assert "refused the login" in result.stderr
        assert "$TEST_SMTP_USER" in result.stderr and "$TEST_SMTP_PASSWORD" in result.stderr
        assert PASSWORD not in result.output
        assert rec.received == []
        # nothing was marked failed: the next run with the right password sends them all
        monkeypatch.setenv("TEST_SMTP_PASSWORD", PASSWORD)
        _, rows = smtp_run(config)
    assert [r["status"] for r in rows] == ["completed"] * 5
    assert len(rec.received) == 5
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert PASSWORD.encode() not in path.read_bytes(), path


def test_implicit_tls_and_an_untrusted_certificate(
    project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    project.orders(PLAIN_ORDERS)
    cert, key = make_certificate(tmp_path)
    rec = Recorder()
    with Server(rec, ssl_context=server_tls(cert, key)) as srv:
        config = project.config(srv.port, security="tls", smtp_extra=f'ca_file = "{cert}"')
        _, rows = smtp_run(config)
        assert [r["status"] for r in rows] == ["completed"] * 5
        # without the CA the certificate is not trusted: the run stops, nothing is sent
        other = Project(tmp_path / "other")
        other.orders(PLAIN_ORDERS)
        result = run(["run", "--config", other.config(srv.port, security="tls")])
    assert result.exit_code == 2
    assert "TLS failed" in result.stderr and "ca_file" in result.stderr
    assert len(rec.received) == 5


def test_unreachable_server_stops_the_run(project: Project) -> None:
    project.orders(PLAIN_ORDERS)
    with Server(Recorder()) as srv:
        port = srv.port  # closed again: nothing listens there any more
    result = run(["run", "--config", project.config(port, attempts=2)])
    assert result.exit_code == 2
    assert "connection attempts in a row failed" in result.stderr


def test_relay_gone_mid_run_keeps_what_was_sent_and_leaves_the_rest(project: Project) -> None:
    project.orders(PLAIN_ORDERS)
    rec = Recorder()
    with Server(rec, drop_after=2) as srv:  # two connections, then none that answers
        config = project.config(srv.port, per_connection=1, pool_size=1, attempts=2)
        result = run(["run", "--config", config])
    assert result.exit_code == 2
    assert "connection attempts in a row failed" in result.stderr
    sent = sorted(r.rcpt_tos[0] for r in rec.received)
    assert len(sent) == 2
    # the next run sends exactly the three that were not, and reports the two as done
    again = Recorder()
    with Server(again) as srv:
        _, rows = smtp_run(project.config(srv.port))
    resent = sorted(r.rcpt_tos[0] for r in again.received)
    assert len(resent) == 3 and not set(resent) & set(sent)
    status = {r["email"]: r["status"] for r in rows}
    assert all(status[e] == "ignored" for e in sent)
    assert all(status[e] == "completed" for e in resent)


# -- targets other than on-demand ------------------------------------------------------------


def test_yesmail_job_uses_the_template_mapped_from_its_template_id(project: Project) -> None:
    project.orders(PLAIN_ORDERS)
    rec = RcptFault(UNKNOWN, lambda a: a.startswith("cy"))
    with Server(rec) as srv:
        result, rows = smtp_run(project.config(srv.port), "--job", "followup")
    assert result.exit_code == 1
    got = by_email(rows)
    ann = got["ann@example.com"]
    assert ann["status"] == "completed" and ann["http_status"] == 202 and ann["ticket"]
    assert [e["state"] for e in events(ann)][-1] == "completed"
    (msg,) = rec.to("ann@example.com")
    assert str(msg.message()["Subject"]) == "How is order 1, Ann?"
    assert msg.message()["List-Unsubscribe"] is None  # the job is transactional
    cy = got["cy@example.com"]
    assert cy["status"] == "failed" and cy["http_status"] == 202
    assert cy["message"] == UNKNOWN


def test_subscribe_confirmation_and_mailpipe_confirm(project: Project) -> None:
    from pipeline.mail.tokens import sign
    from pipeline.store import Store

    rec = Recorder()
    with Server(rec, smtputf8=True) as srv:
        config = project.config(srv.port)
        _, rows = smtp_run(config, "--job", "signup")
    assert [r["result"] for r in rows] == ["SUCCESS", "SUCCESS"]
    (msg,) = rec.to("new@example.com")
    m = msg.message()
    assert m["List-Unsubscribe"] is None  # a confirmation is transactional
    text = content(next(m.iter_parts()))
    token = re.search(r"https://shop\.test/confirm\?t=([\w.-]+)", text).group(1)  # type: ignore[union-attr]

    def state(email: str) -> str:
        store = Store(project.store_url)
        try:
            with store.begin() as conn:
                return str(store.subscribers_of(conn, ["news"], [email])[("news", email)]["state"])
        finally:
            store.close()

    assert state("new@example.com") == "pending"
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    refused = run(["confirm", "--config", config, forged])
    assert refused.exit_code == 1 and "not genuine" in refused.stderr
    assert state("new@example.com") == "pending"
    ok = run(["confirm", "--config", config, token])
    assert ok.exit_code == 0 and "now subscribed" in ok.stdout
    assert state("new@example.com") == "subscribed"
    again = run(["confirm", "--config", config, token])
    assert again.exit_code == 0 and "already confirmed" in again.stdout
    expired = sign(TOKEN_KEY.encode(), "confirm", "news", "zoé@example.com", expires=1)
    late = run(["confirm", "--config", config, expired])
    assert late.exit_code == 1 and "expired" in late.stderr
    unsubscribe = sign(TOKEN_KEY.encode(), "unsubscribe", "news", "zoé@example.com", expires=0)
    wrong = run(["confirm", "--config", config, unsubscribe])
    assert wrong.exit_code == 1 and "not a confirm token" in wrong.stderr
    assert state("zoé@example.com") == "pending"


def test_smtp_check_says_what_the_server_offers_and_sends_nothing(project: Project) -> None:
    rec = Recorder(pipelining=True)
    with Server(rec, smtputf8=True) as srv:
        ok = run(["smtp", "check", "--config", project.config(srv.port)])
        starttls = run(["smtp", "check", "--config", project.config(srv.port, security="starttls")])
    assert ok.exit_code == 0, ok.output
    out = ok.stdout
    assert re.search(r"PIPELINING\s+offered", out) and re.search(r"SMTPUTF8\s+offered", out)
    assert re.search(r"SIZE\s+\d+ bytes at most", out)
    assert "nothing was sent" in out
    assert starttls.exit_code == 1
    assert "does not offer STARTTLS" in starttls.stderr
    assert rec.received == []
