"""smtp mode without a server: config checks, templates, message bytes, signed tokens."""

from __future__ import annotations

import binascii
import email
import email.header
import email.policy
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from click.testing import CliRunner
from smtp_servers import TOKEN_KEY, Project

from pipeline.cli import main
from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.mail.compose import Composer, _body, envelope_address, subject_header
from pipeline.mail.settings import is_loopback
from pipeline.mail.templates import Merger, job_template
from pipeline.mail.tokens import TokenError, sign, token_key, verify


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def check(config: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["config", "check", "--config", config])
    return result.exit_code, result.stderr.strip().splitlines()


def raw_config(project: Project, **opts: Any) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(Path(project.config(2525, **opts)).read_text())


def problem(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_config(orjson.loads(orjson.dumps(raw)), env={})
    return e.value


# -- config check ----------------------------------------------------------------------------


def test_the_test_project_config_is_clean(project: Project) -> None:
    assert check(project.config(2525)) == (0, [])


def test_template_naming_an_unknown_field_fails_config_check(project: Project) -> None:
    (project.templates / "confirm" / "body.html").write_text("<p>&FIRST_NAME; &SHOE_SIZE;</p>\n")
    code, lines = check(project.config(2525))
    assert code == 2
    (line,) = lines
    assert "jobs.confirm.template" in line
    assert "confirm/body.html names &SHOE_SIZE;" in line
    assert "fix the name or add the field" in line


def test_template_naming_a_field_the_job_does_not_send(project: Project) -> None:
    (project.templates / "followup" / "subject.txt").write_text("Hi &LAST_NAME;\n")
    code, lines = check(project.config(2525))
    assert code == 2
    assert any("&LAST_NAME;, which job 'followup' does not send" in ln for ln in lines)


def test_html_entities_stay_but_only_in_the_html_part(project: Project) -> None:
    (project.templates / "confirm" / "body.html").write_text("<p>&copy; &amp; &FIRST_NAME;</p>\n")
    assert check(project.config(2525)) == (0, [])
    (project.templates / "confirm" / "body.txt").write_text("&copy; &FIRST_NAME;\n")
    code, lines = check(project.config(2525))
    assert code == 2 and "names &copy;" in lines[0]


def test_yesmail_template_is_found_by_template_id(project: Project) -> None:
    config = project.config(2525)
    text = Path(config).read_text().replace('"T1" = "followup"', "")
    Path(config).write_text(text.replace("enabled = false", "enabled = true"))
    code, lines = check(config)
    assert code == 2
    (line,) = lines
    assert "jobs.followup.template: no template directory" in line
    assert "map templateId 'T1' to one in [delivery.smtp.template_ids]" in line
    (project.templates / "followup").rename(project.templates / "T1")  # named by the id
    assert check(config) == (0, [])


def test_missing_template_files_are_named(project: Project) -> None:
    (project.templates / "confirm" / "body.html").unlink()
    code, lines = check(project.config(2525))
    assert code == 2 and "body.html is missing" in lines[0]
    (project.templates / "confirm" / "body.html").write_text("<p>x</p>\n")
    (project.templates / "confirm" / "subject.txt").write_text("two\nlines\n")
    code, lines = check(project.config(2525))
    assert code == 2 and "exactly one non-empty line" in lines[0]


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (
            lambda r: r["delivery"]["smtp"].update(host="mail.example.com", security="none"),
            "delivery.smtp.security",
            "only to a loopback address",
        ),
        (
            lambda r: r["delivery"]["smtp"].update(username_env="U"),
            "delivery.smtp.password_env",
            "give both",
        ),
        (
            lambda r: r["delivery"]["smtp"].update(unsubscribe_url="http://x.test/u?t={token}"),
            "delivery.smtp.unsubscribe_url",
            "RFC 8058",
        ),
        (
            lambda r: r["delivery"]["smtp"].update(confirm_url="https://x.test/confirm"),
            "delivery.smtp.confirm_url",
            "must contain {token}",
        ),
        (
            lambda r: r["lists"]["shop"].update(custom_headers="Subject: hijacked\n"),
            "lists.shop.custom_headers",
            "written by mailpipe itself",
        ),
        (
            lambda r: r["lists"]["shop"].update(custom_headers="X-Shop: Zoë\n"),
            "lists.shop.custom_headers",
            "not ASCII",
        ),
        (
            lambda r: r["jobs"]["followup"].update(template="followup"),
            "jobs.followup.template",
            "choose their template by templateId",
        ),
        (
            lambda r: r["jobs"]["confirm"].update(template="../etc"),
            "jobs.confirm.template",
            "not a template name",
        ),
        (
            lambda r: r["delivery"]["smtp"].pop("confirm_url"),
            "delivery.smtp.confirm_url",
            "double opt-in",
        ),
        (
            lambda r: r["delivery"]["smtp"].pop("unsubscribe_url"),
            "delivery.smtp.unsubscribe_url",
            "not transactional",
        ),
        (
            lambda r: r["jobs"]["signup"].update(transactional=True),
            "jobs.signup.transactional",
            "only yesmail-send jobs take transactional",
        ),
        (
            lambda r: r["lists"]["shop"].update(d_bounce_email="b@x.test>\r\nRCPT TO:<spy@x.test"),
            "lists.shop.d_bounce_email",
            "is not an email address",
        ),
        (
            lambda r: r["lists"]["shop"].update(d_from_name="Shop\r\nBcc: spy@x.test"),
            "lists.shop.d_from_name",
            "must be one line",
        ),
    ],
    ids=[
        "none-to-a-remote-host",
        "half-credentials",
        "unsubscribe-not-https",
        "confirm-without-token",
        "reserved-custom-header",
        "non-ascii-custom-header",
        "yesmail-template-key",
        "template-path",
        "subscribe-without-confirm-url",
        "mailing-without-unsubscribe-url",
        "transactional-subscribe",
        "bounce-address-with-a-command",
        "from-name-with-a-header",
    ],
)
def test_smtp_config_problems(project: Project, change: Any, key: str, words: str) -> None:
    raw = raw_config(project)
    for job in ("followup", "signup"):  # enabled: smtp mode checks what enabled jobs need
        raw["jobs"][job]["enabled"] = True
    change(raw)
    e = problem(raw)
    assert e.key == key, e.message
    assert words in e.message


def test_loopback_insecure_and_transactional_on_demand_are_fine(project: Project) -> None:
    raw = raw_config(project)
    raw["jobs"]["confirm"]["transactional"] = True
    for host in ("127.0.0.1", "::1", "localhost", "127.9.9.9"):
        raw["delivery"]["smtp"]["host"] = host
        parse_config(orjson.loads(orjson.dumps(raw)), env={})
    raw["delivery"]["smtp"].update(host="relay.example.com", allow_insecure=True)
    parse_config(orjson.loads(orjson.dumps(raw)), env={})
    assert not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_the_example_templates_pass_config_check_in_smtp_mode() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "mailpipe.toml", env={"MAILPIPE_DELIVERY_MODE": "smtp"})
    for name in ("order-confirmation", "newsletter-signup", "order-followup"):
        assert job_template(cfg, cfg.plan(name)).name


# -- templates and merging ----------------------------------------------------------------


def test_merge_formats_each_field_type(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "delivery": {"smtp": {"templates": str(tmp_path)}},
        "lists": {
            "l": {
                "name": "L",
                "d_from_email": "a@shop.test",
                "fields": {
                    "N": {"type": "number"},
                    "B": {"type": "boolean"},
                    "T": {"type": "multi-select", "lookup": ["x", "y"]},
                    "D": {"type": "text", "default": "dflt"},
                },
            }
        },
        "sources": {
            "s": {
                "kind": "orders",
                "path": "x.csv",
                "email": "e",
                "fields": {"N": "n", "B": "b", "T": "t"},
            }
        },
        "jobs": {
            "j": {"source": "s", "target": "maestro-ondemand", "list": "l", "transactional": True}
        },
    }
    d = tmp_path / "j"
    d.mkdir()
    (d / "subject.txt").write_text("&N; &B;\n")
    (d / "body.txt").write_text("&N;|&B;|&T;|&D;|&EMAIL;\n")
    (d / "body.html").write_text("<p>&T;</p>\n")
    cfg = parse_config(raw, env={})
    plan = cfg.plan("j")
    merger = Merger(job_template(cfg, plan), plan)
    rows = pa.table(
        {
            "email": ["a@x.test", "b@x.test"],
            "f:N": pa.array([3, None], pa.int64()),
            "f:B": pa.array([True, False]),
            "f:T": pa.array([["x", "y"], None], pa.list_(pa.string())),
        }
    )
    merged = merger.merge(merger.values(rows, {}), 2)
    assert merged.subject.to_pylist() == ["3 true", " false"]
    assert merged.text.to_pylist() == ["3|true|x, y|dflt|a@x.test\r\n", "|false||dflt|b@x.test\r\n"]


def test_header_problems_name_the_first_field(project: Project) -> None:
    cfg = load_config(project.config(2525), env={})
    plan = cfg.plan("confirm")
    merger = Merger(job_template(cfg, plan), plan)
    values = {
        "ORDER_ID": pa.array(["1", "2\n", "3", "4\r"]),
        "FIRST_NAME": pa.array(["a", "b\r\nX: y", "c", "d"]),
    }
    bad, fields = merger.header_problems(values)
    assert bad.tolist() == [False, True, False, True]
    assert fields == ["ORDER_ID", "ORDER_ID"]


# -- message bytes ---------------------------------------------------------------------------


def test_subject_header_encoded_words_decode_back_and_fold() -> None:
    assert subject_header("Plain ASCII subject") == b"Plain ASCII subject"
    for text in (
        "Grüße aus Köln — Ihre Bestellung 4711 ist unterwegs! " * 3,
        "=?looks encoded?=",
        "日本語の件名" * 9,
    ):
        raw = subject_header(text)
        assert raw != text.encode()
        lines = raw.split(b"\r\n ")
        assert all(len(line) <= 75 for line in lines)
        for line in lines:  # every word holds whole characters
            assert line.startswith(b"=?utf-8?b?") and line.endswith(b"?=")
            binascii.a2b_base64(line[10:-2]).decode("utf-8")
        assert str(email.header.make_header(email.header.decode_header(raw.decode()))) == text


def test_envelope_address() -> None:
    assert envelope_address("ann@example.com") == ("ann@example.com", False)
    assert envelope_address("zoe@bücher.example") == ("zoe@xn--bcher-kva.example", False)
    assert envelope_address("jürgen@example.com") == ("jürgen@example.com", True)


def test_body_encoding() -> None:
    assert _body("plain text\r\n", b"=_b") == (b"7bit", b"plain text\r\n")
    cte, enc = _body("Grüße\r\n", b"=_b")
    assert cte == b"base64" and binascii.a2b_base64(enc).decode() == "Grüße\r\n"
    assert _body("x" * 2000 + "\r\n", b"=_b")[0] == b"base64"  # a line over 998 octets
    assert _body("a =_b line\r\n", b"=_b")[0] == b"base64"  # the boundary inside


def test_composed_message_is_strict_mime(project: Project) -> None:
    cfg = load_config(project.config(2525), env={})
    plan = cfg.plan("confirm")
    merger = Merger(job_template(cfg, plan), plan)
    rows = pa.table(
        {
            "email": ["zoe@bücher.example"],
            "f:FIRST_NAME": ["Zoë"],
            "f:LAST_NAME": ["Müller"],
            "f:GIFT": ["<i>x</i>"],
            "f:ORDER_ID": ["7"],
            "f:TOTAL": ["1.00"],
        }
    )
    links = {"UNSUBSCRIBE_URL": pa.array(["https://shop.test/u?t=abc"])}
    composer = Composer(plan)
    (out,) = composer.compose(
        [0],
        ["zoe@bücher.example"],
        ["k:7"],
        merger.merge(merger.values(rows, links), 1),
        links["UNSUBSCRIBE_URL"],
    )
    assert out.rcpt == "zoe@xn--bcher-kva.example" and not out.utf8
    assert out.sender == "bounces@shop.test"
    assert out.data.endswith(b"\r\n.\r\n")
    data = out.data[:-3].replace(b"\r\n..", b"\r\n.")
    msg = email.message_from_bytes(data, policy=email.policy.strict)
    assert not msg.defects
    assert str(msg["Subject"]) == "Order 7 for Zoë"
    assert out.message_id == composer.message_id("k:7") == str(msg["Message-ID"])
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


# -- tokens ----------------------------------------------------------------------------------


KEY = TOKEN_KEY.encode()


def test_tokens_round_trip_and_refuse_anything_else() -> None:
    token = sign(KEY, "confirm", "news", "ann@example.com", expires=2_000_000_000)
    claims = verify(KEY, token, "confirm", now=1_000_000_000)
    assert (claims.list, claims.email) == ("news", "ann@example.com")
    sig = token.split(".")[1]
    forged_payload = sign(KEY, "confirm", "news", "eve@example.com", 2_000_000_000).split(".")[0]
    for bad in (
        f"{forged_payload}.{sig}",  # someone else's address under ann's signature
        token[:-1] + ("A" if token[-1] != "A" else "B"),
        "",
        "no-dot",
        "a.b.c",
        "ö.ä",
    ):
        with pytest.raises(TokenError, match="not genuine"):
            verify(KEY, bad, "confirm", now=1_000_000_000)
    with pytest.raises(TokenError, match="not genuine"):
        verify(b"another key of 32 bytes!!!!!!!!!", token, "confirm", now=1_000_000_000)
    with pytest.raises(TokenError, match="expired"):
        verify(KEY, token, "confirm", now=2_000_000_001)
    with pytest.raises(TokenError, match="not a unsubscribe token"):
        verify(KEY, token, "unsubscribe", now=1_000_000_000)
    assert verify(KEY, sign(KEY, "unsubscribe", "l", "a@b.c", 0), "unsubscribe").expires == 0


def test_token_key_comes_from_the_environment(project: Project) -> None:
    cfg = load_config(project.config(2525), env={})
    with pytest.raises(ConfigError, match="TEST_TOKEN_KEY is not set"):
        token_key(cfg, env={})
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        token_key(cfg, env={"TEST_TOKEN_KEY": "short"})
    assert token_key(cfg, env={"TEST_TOKEN_KEY": TOKEN_KEY}) == KEY


def test_confirm_without_the_key_is_a_config_error(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_TOKEN_KEY", raising=False)
    result = CliRunner().invoke(main, ["confirm", "--config", project.config(2525), "x.y"])
    assert result.exit_code == 2
    assert "TEST_TOKEN_KEY is not set" in result.stderr


# -- reading replies ---------------------------------------------------------------------------


class _Transport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_reply_reader_takes_every_reply_a_read_brings() -> None:
    import asyncio

    from pipeline.deliver.smtpconn import ReplyReader, SessionLost, SmtpReply

    async def scenario() -> None:
        t = _Transport()
        r = ReplyReader(t)  # type: ignore[arg-type]
        # three replies in one read (pipelined), the third split across two reads
        r.data_received(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n250 2.0.0 Ok\r\n55")
        assert await r.read(2, 1) == [
            SmtpReply(250, "mx.test PIPELINING SIZE 10"),
            SmtpReply(250, "2.0.0 Ok"),
        ]
        r.data_received(b"0 5.1.1 No such user\r\n")
        assert await r.read(1, 1) == [SmtpReply(550, "5.1.1 No such user")]
        with pytest.raises(SessionLost, match=r"did not answer within 0\.05 s"):
            await r.read(1, 0.05)
        r.data_received(b"250 Ok\r\n")
        r.eof_received()
        with pytest.raises(SessionLost, match="closed the connection") as e:
            await r.read(2, 1)
        assert e.value.replies == [SmtpReply(250, "Ok")]  # what came before it went
        bad = ReplyReader(t)  # type: ignore[arg-type]
        bad.data_received(b"HTTP/1.1 400 Bad Request\r\n")
        assert t.aborted
        with pytest.raises(SessionLost, match="not an SMTP reply"):
            await bad.read(1, 1)

    asyncio.run(scenario())
