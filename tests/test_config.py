"""The config: the documented example, every error as one line with key and fix, overrides, CLI."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ROOT

from pipeline.cli import main
from pipeline.config import MailpipeConfig, check_config, load_config, parse_config
from pipeline.errors import ConfigError

EXAMPLE = ROOT / "configs" / "mailpipe.toml"


@pytest.fixture(autouse=True)
def _no_mailpipe_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI reads os.environ: keep the caller's MAILPIPE_* variables out of these tests."""
    for name in list(os.environ):
        if name.startswith("MAILPIPE_"):
            monkeypatch.delenv(name)
    yield


def example_raw() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))


def write_toml(path: Path, raw: dict[str, Any]) -> Path:
    """A small TOML writer for the shapes configs use (tables, scalars, arrays, inline dicts)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    def key(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else value(k)

    lines: list[str] = []

    def table(prefix: list[str], d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix:
            lines.append("[" + ".".join(key(p) for p in prefix) + "]")
        lines.extend(f"{key(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table([*prefix, k], v)

    table([], raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=env or {})
    return info.value


# -- the documented example -------------------------------------------------------------


def test_example_config_loads_as_documented(example_config: MailpipeConfig) -> None:
    cfg = example_config
    # the three jobs the README walks through come first (later jobs demo result codes)
    assert list(cfg.jobs)[:3] == ["order-confirmation", "newsletter-signup", "order-followup"]

    oc = cfg.jobs["order-confirmation"]
    assert oc.target == "maestro-ondemand"
    assert oc.ifNotExistsAddAndSend is True
    assert oc.ifExistsForceSending is True
    assert oc.ifExistsDoUpdate is False

    ns = cfg.jobs["newsletter-signup"]
    assert ns.target == "maestro-subscribe"
    lst = cfg.lists[ns.list]
    assert (lst.mContainer, lst.mOwner, lst.mListId) == ("2", "N10", "HL#12")
    assert all(isinstance(v, str) for v in (lst.mContainer, lst.mOwner, lst.mListId))

    of = cfg.jobs["order-followup"]
    assert of.target == "yesmail-send"
    assert of.transactional is False
    assert of.templateId
    assert of.subscriptions is not None and of.subscriptions.isMemberOf
    assert all(job.batch_size <= 300 for job in cfg.jobs.values())
    # every job resolves to a plan (source and list exist)
    for name in cfg.jobs:
        assert cfg.plan(name).name == name


def test_example_config_loads_from_disk_with_empty_env() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.path == str(EXAMPLE)
    assert cfg.delivery.mode == "simulate"
    assert check_config(EXAMPLE, env={}) == []


# -- one line per error, naming the key and what to write -------------------------------------

Mutation = Callable[[dict[str, Any]], Any]


def job(raw: dict[str, Any], name: str) -> dict[str, Any]:
    j: dict[str, Any] = raw["jobs"][name]
    return j


ERROR_CASES: list[tuple[str, Mutation, str, str]] = [
    (
        "unknown key",
        lambda r: job(r, "order-confirmation").update(batch_sise=50),
        "jobs.order-confirmation.batch_sise",
        "did you mean 'batch_size'?",
    ),
    (
        "unknown key in a nested table",
        lambda r: r["lists"]["shop"]["fields"]["FIRST_NAME"].update(mandtory=True),
        "lists.shop.fields.FIRST_NAME.mandtory",
        "did you mean 'mandatory'?",
    ),
    (
        "unknown section",
        lambda r: r.update(job={}),
        "job",
        "did you mean 'jobs'?",
    ),
    (
        "wrong type",
        lambda r: job(r, "order-confirmation").update(batch_size="many"),
        "jobs.order-confirmation.batch_size",
        "valid integer",
    ),
    (
        "wrong type for a boolean flag",
        lambda r: job(r, "order-confirmation").update(ifNotExistsAddAndSend="maybe"),
        "jobs.order-confirmation.ifNotExistsAddAndSend",
        "valid boolean",
    ),
    (
        "wrong type for a value of several types",
        lambda r: r["lists"]["shop"].update(d_autowinner_percentage=[25]),
        "lists.shop.d_autowinner_percentage",
        "(got [25])",
    ),
    (
        "job names a missing list",
        lambda r: job(r, "order-confirmation").update(list="shopp"),
        "jobs.order-confirmation.list",
        "; write one of [",
    ),
    (
        "job names a missing source",
        lambda r: job(r, "order-followup").update(source="order"),
        "jobs.order-followup.source",
        "; write one of [",
    ),
    (
        "batch_size 301",
        lambda r: job(r, "order-confirmation").update(batch_size=301),
        "jobs.order-confirmation.batch_size",
        "less than or equal to 300",
    ),
    (
        "batch_size 0",
        lambda r: job(r, "newsletter-signup").update(batch_size=0),
        "jobs.newsletter-signup.batch_size",
        "greater than or equal to 1",
    ),
    (
        "custom_headers_enabled without custom_headers",
        lambda r: r["lists"]["shop"].pop("custom_headers"),
        "lists.shop.custom_headers",
        'custom_headers = "X-Company: Acme\\n"',
    ),
    (
        "custom_headers that are not headers",
        lambda r: r["lists"]["shop"].update(custom_headers="just text\n"),
        "lists.shop.custom_headers",
        "'Name: value'",
    ),
    (
        "d_autowinner_percentage with 3 decimals",
        lambda r: r["lists"]["shop"].update(d_autowinner_percentage="25.125"),
        "lists.shop.d_autowinner_percentage",
        'more than two decimals; write e.g. "25.50"',
    ),
    (
        "d_autowinner_percentage float with 3 decimals",
        lambda r: r["lists"]["shop"].update(d_autowinner_percentage=94.855),
        "lists.shop.d_autowinner_percentage",
        "more than two decimals",
    ),
    (
        "d_autowinner_percentage not a number",
        lambda r: r["lists"]["shop"].update(d_autowinner_percentage="NaN"),
        "lists.shop.d_autowinner_percentage",
        'not a number; write e.g. "25.0"',
    ),
    (
        "both seed list keys",
        lambda r: r["lists"]["shop"].update(d_seed_list_ids=[1], d_seed_list_names=["Seeds"]),
        "lists.shop.d_seed_list_names",
        "give only one of d_seed_list_ids and d_seed_list_names",
    ),
    (
        "single-select without lookup",
        lambda r: r["lists"]["shop"]["fields"]["COUNTRY"].pop("lookup"),
        "lists.shop.fields.COUNTRY.lookup",
        'lookup = ["A", "B"]',
    ),
    (
        "multi-select without lookup",
        lambda r: r["lists"]["shop"]["fields"].update(TAGS={"type": "multi-select"}),
        "lists.shop.fields.TAGS.lookup",
        'lookup = ["A", "B"]',
    ),
    (
        "text default of the wrong type",
        lambda r: r["lists"]["shop"]["fields"]["FIRST_NAME"].update(default=5),
        "lists.shop.fields.FIRST_NAME.default",
        "write it in quotes",
    ),
    (
        "number default of the wrong type",
        lambda r: r["lists"]["shop"]["fields"].update(AGE={"type": "number", "default": "3"}),
        "lists.shop.fields.AGE.default",
        "write default = 0",
    ),
    (
        "boolean default of the wrong type",
        lambda r: r["lists"]["shop"]["fields"].update(VIP={"type": "boolean", "default": "yes"}),
        "lists.shop.fields.VIP.default",
        "write default = true or false",
    ),
    (
        "select default not in the lookup",
        lambda r: r["lists"]["shop"]["fields"]["COUNTRY"].update(default="XX"),
        "lists.shop.fields.COUNTRY.default",
        "lookup values",
    ),
    (
        "yesmail job without templateId",
        lambda r: job(r, "order-followup").pop("templateId"),
        "jobs.order-followup.templateId",
        'templateId = "1465362"',
    ),
    (
        "maestro-only flag on a yesmail job",
        lambda r: job(r, "order-followup").update(ifExistsForceSending=True),
        "jobs.order-followup.ifExistsForceSending",
        "only maestro-ondemand jobs take ifExistsForceSending; remove it",
    ),
    (
        "maestro-only flag set to false on a yesmail job",
        lambda r: job(r, "order-followup").update(ifNotExistsAddAndSend=False),
        "jobs.order-followup.ifNotExistsAddAndSend",
        "remove it",
    ),
    (
        "yesmail-only option on a maestro job",
        lambda r: job(r, "order-confirmation").update(templateId="1"),
        "jobs.order-confirmation.templateId",
        "only yesmail-send jobs take templateId; remove it",
    ),
    (
        "yesmail id from a field the job does not send",
        lambda r: job(r, "order-followup").update(recipient_id="COUNTRY"),
        "jobs.order-followup.recipient_id",
        'write "email", "record_id" or one of',
    ),
    (
        "yesmail id from a record_id the source does not map",
        lambda r: (
            r["sources"]["orders"].pop("record_id"),
            job(r, "order-followup").update(recipient_id="record_id"),
        ),
        "jobs.order-followup.recipient_id",
        "set sources.orders.record_id",
    ),
    (
        "subscribe list without its Maestro ids",
        lambda r: r["lists"]["newsletter"].pop("mListId"),
        "lists.newsletter.mListId",
        "mListId must be set",
    ),
    (
        "required key missing",
        lambda r: r["sources"]["orders"].pop("email"),
        "sources.orders.email",
        "add email = ...",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key", "hint"),
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_every_error_is_one_line_with_key_and_fix(mutate: Mutation, key: str, hint: str) -> None:
    raw = example_raw()
    mutate(raw)
    e = error_of(raw)
    assert "\n" not in e.message
    assert e.message.startswith(f"{key}: "), e.message
    assert e.key == key
    assert hint in e.message, e.message


def test_missing_list_and_source_errors_list_the_names_to_write() -> None:
    raw = example_raw()
    job(raw, "order-confirmation")["list"] = "shopp"
    assert f"write one of {sorted(raw['lists'])}" in error_of(raw).message
    raw = example_raw()
    job(raw, "order-confirmation")["source"] = "order"
    assert f"write one of {sorted(raw['sources'])}" in error_of(raw).message


def test_two_decimals_and_floats_that_print_as_two_decimals_are_accepted() -> None:
    for value in ("25.0", "25.50", 25, 94.85, 0.1):
        raw = example_raw()
        raw["lists"]["shop"]["d_autowinner_percentage"] = value
        lst = parse_config(raw, env={}).lists["shop"]
        assert lst.d_autowinner_percentage == str(value)


def test_one_seed_list_key_is_fine() -> None:
    raw = example_raw()
    raw["lists"]["shop"]["d_seed_list_names"] = ["Seed List", "Two"]
    assert parse_config(raw, env={}).lists["shop"].d_seed_list_names == ("Seed List", "Two")


def test_custom_headers_disabled_need_none() -> None:
    raw = example_raw()
    raw["lists"]["shop"].update(custom_headers_enabled=False, custom_headers="")
    assert parse_config(raw, env={}).lists["shop"].custom_headers == ""


def test_several_schema_errors_stop_with_one_line() -> None:
    raw = example_raw()
    job(raw, "order-confirmation")["batch_size"] = 0
    raw["lists"]["shop"]["d_autowinner_percentage"] = "1.234"
    e = error_of(raw)
    assert "\n" not in e.message
    assert "jobs.order-confirmation.batch_size" in e.message
    assert "lists.shop.d_autowinner_percentage" in e.message


# -- environment overrides ---------------------------------------------------------------------


def test_env_overrides() -> None:
    env = {
        "MAILPIPE_DELIVERY_MODE": "smtp",
        "MAILPIPE_DELIVERY_SMTP_PORT": "2525",
        "MAILPIPE_JOBS_ORDER_CONFIRMATION_BATCH_SIZE": "50",
        "MAILPIPE_LISTS_NEWSLETTER_MLISTID": "HL#13",
        "MAILPIPE_LISTS_NEWSLETTER_MCONTAINER": "3",
        "MAILPIPE_JOBS_ORDER_FOLLOWUP_TEMPLATEID": "1460611",
        "MAILPIPE_JOBS_ORDER_CONFIRMATION_IFEXISTSDOUPDATE": "true",
    }
    cfg = load_config(EXAMPLE, env=env)
    assert cfg.delivery.mode == "smtp"
    assert cfg.delivery.smtp.port == 2525 and type(cfg.delivery.smtp.port) is int
    assert cfg.jobs["order-confirmation"].batch_size == 50
    # string settings stay strings, even when they look like numbers or TOML
    assert cfg.lists["newsletter"].mListId == "HL#13"
    assert cfg.lists["newsletter"].mContainer == "3"
    assert cfg.jobs["order-followup"].templateId == "1460611"
    assert cfg.jobs["order-confirmation"].ifExistsDoUpdate is True
    # nothing else moved
    assert cfg.jobs["newsletter-signup"].batch_size == 300
    assert cfg.lists["shop"].mListId == "SHOP"


def test_env_override_is_validated_like_the_file() -> None:
    e = error_of(example_raw(), {"MAILPIPE_JOBS_ORDER_CONFIRMATION_BATCH_SIZE": "301"})
    assert e.message.startswith("jobs.order-confirmation.batch_size: ")


def test_misspelt_env_variable_is_named() -> None:
    e = error_of(example_raw(), {"MAILPIPE_DELIVERY_MODEE": "smtp"})
    assert e.key == "MAILPIPE_DELIVERY_MODEE"
    assert e.message.startswith("MAILPIPE_DELIVERY_MODEE: ")
    assert "MAILPIPE_DELIVERY_MODE" in e.message and "\n" not in e.message


def test_env_for_a_job_that_does_not_exist_is_named() -> None:
    e = error_of(example_raw(), {"MAILPIPE_JOBS_ORDER_CONFIRMATON_BATCH_SIZE": "5"})
    assert e.key == "MAILPIPE_JOBS_ORDER_CONFIRMATON_BATCH_SIZE"


def test_unrelated_env_variables_are_ignored() -> None:
    env = {
        "MAILPIPE_SMTP_PASSWORD": "hunter2",
        "MAILPIPE_TOKEN_ORDER_CONFIRMATION": "tok",
        "MAILPIPE_CONFIG": "other.toml",
        "HOME": "/root",
    }
    assert load_config(EXAMPLE, env=env).digest() == load_config(EXAMPLE, env={}).digest()


# -- check_config and the CLI -------------------------------------------------------------------


def test_check_config_returns_every_schema_problem_one_per_line(tmp_path: Path) -> None:
    raw = example_raw()
    job(raw, "order-confirmation")["batch_size"] = 0
    job(raw, "order-followup")["batch_sise"] = 5
    raw["lists"]["shop"]["d_autowinner_percentage"] = "1.234"
    raw["lists"]["newsletter"]["fields"]["FIRST_NAME"]["default"] = 1
    problems = check_config(write_toml(tmp_path / "bad.toml", raw), env={})
    assert all("\n" not in p for p in problems)
    assert sorted(p.split(":")[0] for p in problems) == sorted(
        [
            "jobs.order-confirmation.batch_size",
            "jobs.order-followup.batch_sise",
            "lists.shop.d_autowinner_percentage",
            "lists.newsletter.fields.FIRST_NAME.default",
        ]
    )


def test_check_config_returns_every_cross_check_problem(tmp_path: Path) -> None:
    raw = example_raw()
    job(raw, "order-confirmation")["list"] = "nope"
    job(raw, "order-followup").pop("templateId")
    job(raw, "newsletter-signup")["ifExistsDoUpdate"] = True
    problems = check_config(write_toml(tmp_path / "bad.toml", raw), env={})
    assert [p.split(":")[0] for p in problems] == [
        "jobs.order-confirmation.list",
        "jobs.newsletter-signup.ifExistsDoUpdate",
        "jobs.order-followup.templateId",
    ]


def test_check_config_reports_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("[jobs\nx = 1\n", encoding="utf-8")
    (line,) = check_config(bad, env={})
    assert "not valid TOML" in line and "\n" not in line
    (line,) = check_config(tmp_path / "missing.toml", env={})
    assert "config file not found" in line


def test_check_config_applies_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "ok.toml", example_raw())
    assert check_config(path, env={}) == []
    (line,) = check_config(path, env={"MAILPIPE_DELIVERY_MODEE": "smtp"})
    assert line.startswith("MAILPIPE_DELIVERY_MODEE: ")


def test_cli_config_check_ok_on_the_example() -> None:
    result = CliRunner().invoke(main, ["config", "check", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout
    for name in ("order-confirmation", "newsletter-signup", "order-followup"):
        assert name in result.stdout


def test_cli_config_check_fails_with_the_key(tmp_path: Path) -> None:
    raw = example_raw()
    job(raw, "order-confirmation")["batch_size"] = 301
    path = write_toml(tmp_path / "bad.toml", raw)
    result = CliRunner().invoke(main, ["config", "check", "--config", str(path)])
    assert result.exit_code == 2
    assert "jobs.order-confirmation.batch_size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_cli_config_check_reads_env(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["config", "check", "--config", str(EXAMPLE)],
        env={"MAILPIPE_DELIVERY_SMTP_PROT": "2525"},
    )
    assert result.exit_code == 2
    assert "MAILPIPE_DELIVERY_SMTP_PROT" in result.stderr


def test_write_toml_round_trips_the_example(tmp_path: Path) -> None:
    """Guards the helper the file-based tests use."""
    raw = example_raw()
    path = write_toml(tmp_path / "copy.toml", raw)
    assert tomllib.loads(path.read_text(encoding="utf-8")) == raw
