"""The mailpipe command end to end, through CliRunner, on files in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner
from conftest import CASES, ROOT
from rundir_contract import check_run_dir

from pipeline.cli import main

CONFIG = """
[run]
out = "{out}"

[store]
url = "sqlite:///{state}/mailpipe.db"

[lists.shop]
name = "Shop"
d_from_email = "shop@example.com"
mContainer = "2"
mOwner = "N10"
mListId = "HL#12"

[lists.shop.fields.FIRST_NAME]
type = "text"
mandatory = true

[lists.shop.fields.LAST_NAME]
type = "text"

[sources.orders]
kind = "orders"
path = "{data}/orders*.csv"
email = "email"
record_id = "order_id"

[sources.orders.fields]
FIRST_NAME = "first_name"
LAST_NAME = "last_name"
TOTAL = "amount"

[jobs.confirm]
source = "orders"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
merge_fields = ["TOTAL"]

[jobs.followup]
source = "orders"
target = "yesmail-send"
list = "shop"
templateId = "1465362"
transactional = true
"""

GOOD = (
    "order_id,email,first_name,last_name,amount\n"
    "1,ann@example.com,Ann,Lee,10.00\n"
    "2,bob@example.com,Bob,Ray,20.00\n"
    "2,,,,\n"
    "3,cy@example.com,Cy,Day,5.00\n"
)


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "mailpipe.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out", state=tmp_path / "state", data=data))
    return {"config": str(cfg), "data": data, "out": tmp_path / "out", "tmp": tmp_path}


def run(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def last_run(out: Path) -> Path:
    return sorted(p for p in out.iterdir() if p.is_dir())[-1]


def test_every_command_has_help() -> None:
    def walk(cmd: click.Command, path: list[str]) -> None:
        result = run([*path, "--help"])
        assert result.exit_code == 0, path
        assert "Usage:" in result.output
        assert cmd.help or cmd.short_help, f"{' '.join(path)} has no help text"
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(main, [])


def test_clean_run_exits_0_and_keeps_the_row_invariant(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD)
    result = run(["run", "--config", setup["config"], "--json"])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout)
    rows = check_run_dir(summary["run_dir"])
    assert len(rows) == 8  # 4 rows x 2 jobs
    assert summary["status"] == {"completed": 8}
    # the line items of order 2 are one recipient: same batch, same outcome
    confirm = [r for r in rows if r["job"] == "confirm"]
    assert confirm[1]["email"] == confirm[2]["email"] == "bob@example.com"
    assert confirm[1]["result"] == confirm[2]["result"] == "SUCCESS"
    request = orjson.loads(
        (Path(summary["run_dir"]) / "batches" / "maestro-ondemand-0001.request.json").read_bytes()
    )
    assert [r["email"] for r in request["recip"]] == [
        "ann@example.com",
        "bob@example.com",
        "cy@example.com",
    ]


def test_bad_rows_exit_1_and_become_rejects(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD + "4,not-an-email,Dee,Eve,1\n5,x@example.com\n")
    result = run(["run", "--config", setup["config"], "--job", "confirm"])
    assert result.exit_code == 1
    rows = check_run_dir(last_run(setup["out"]))
    by_line = {r["line"]: r for r in rows}
    assert by_line[6]["result"] == "INVALID_EMAIL"
    assert by_line[6]["error"] == "Invalid email address"
    assert by_line[7]["result"] == "PARSE_ERROR"
    rejects = [
        orjson.loads(x)
        for x in (last_run(setup["out"]) / "rejects.jsonl").read_bytes().splitlines()
    ]
    assert [(r["line"], r["code"]) for r in rejects] == [(6, "INVALID_EMAIL"), (7, "PARSE_ERROR")]
    assert rejects[1]["raw"] == "5,x@example.com"


def test_hostile_csv_keeps_the_invariant(setup: dict[str, Any]) -> None:
    body = (
        b"\xef\xbb\xbforder_id,email,first_name,last_name,amount\r\n"
        b'1,ann@example.com,"Ann\r\nMarie",Lee,1\r\n'
        b"\r\n"
        b"2,bob@example.com,Bob\r\n"
        b"3,cy@example.com,C\xff,Day,3\r\n"
        b"4,dee@example.com," + b"x" * 100_000 + b",Long,4\r\n"
        b'5,eve@example.com,"Eve ""E""",Q,5\r\n'
    )
    (setup["data"] / "orders.csv").write_bytes(body)
    result = run(["run", "--config", setup["config"]])
    assert result.exit_code == 1
    rows = check_run_dir(last_run(setup["out"]))
    confirm = [r for r in rows if r["job"] == "confirm"]
    assert [r["line"] for r in confirm] == [2, 5, 6, 7, 8]
    assert [r["status"] for r in confirm] == [
        "completed",
        "failed",
        "failed",
        "completed",
        "completed",
    ]
    manifest = orjson.loads((last_run(setup["out"]) / "manifest.json").read_bytes())
    assert manifest["inputs"][0]["blank_lines"] == 1
    assert manifest["inputs"][0]["rows"] == 5


def test_a_bad_file_fails_alone(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders-a.csv").write_text(GOOD)
    (setup["data"] / "orders-b.csv").write_bytes(b"")
    (setup["data"] / "orders-c.csv").write_text("id,mail\n1,x@example.com\n")
    result = run(["run", "--config", setup["config"], "--job", "confirm"])
    assert result.exit_code == 1
    assert "orders-b.csv: file is empty" in result.stderr
    assert "orders-c.csv: missing column" in result.stderr
    rows = check_run_dir(last_run(setup["out"]))
    assert len(rows) == 4
    assert {r["status"] for r in rows} == {"completed"}


def test_nothing_to_do_exits_0(setup: dict[str, Any]) -> None:
    result = run(["run", "--config", setup["config"]])
    assert result.exit_code == 0, result.output
    assert check_run_dir(last_run(setup["out"])) == []


def test_same_file_twice_sends_nothing_twice(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD)
    path = str(setup["data"] / "orders.csv")
    result = run(["run", "--config", setup["config"], "--job", "confirm", path, path])
    assert result.exit_code == 0
    rows = check_run_dir(last_run(setup["out"]))
    assert [r["status"] for r in rows] == ["completed"] * 4 + ["ignored"] * 4
    assert "already appeared in this run" in rows[4]["message"]


def test_stages_can_be_run_again(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD)
    result = run(["run", "--config", setup["config"], "--until", "build"])
    assert result.exit_code == 0
    d = last_run(setup["out"])
    assert (d / "batches" / "maestro-ondemand-0001.request.json").exists()
    assert not (d / "results.jsonl").exists()
    assert not list((d / "batches").glob("*.response.json"))
    assert run(["deliver", str(d)]).exit_code == 0
    first = run(["report", str(d)])
    assert first.exit_code == 0
    rows = check_run_dir(d)
    again = run(["report", str(d)])
    assert again.exit_code == 0
    strip = [{k: v for k, v in r.items() if k != "time"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in check_run_dir(d)]


def test_a_stage_needs_the_one_before(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD)
    run(["run", "--config", setup["config"], "--until", "extract"])
    result = run(["build", str(last_run(setup["out"]))])
    assert result.exit_code == 2
    assert "stage 'normalize' has not completed" in result.stderr


def test_config_errors_exit_2(setup: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        Path(setup["config"])
        .read_text()
        .replace("[jobs.confirm]", "[jobs.confirm]\nbatch_size = 301")
    )
    result = run(["run", "--config", str(bad)])
    assert result.exit_code == 2
    assert "jobs.confirm.batch_size" in result.stderr
    result = run(["run", "--config", setup["config"], "--job", "nope"])
    assert result.exit_code == 2
    assert "no job 'nope'" in result.stderr
    assert not setup["out"].exists() or not any(setup["out"].iterdir())


def test_env_override_reaches_the_run(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD)
    result = run(
        ["run", "--config", setup["config"], "--job", "confirm"],
        env={"MAILPIPE_JOBS_CONFIRM_BATCH_SIZE": "2"},
    )
    assert result.exit_code == 0
    rows = check_run_dir(last_run(setup["out"]))
    assert [r["batch"] for r in rows] == ["maestro-ondemand-0001"] * 3 + ["maestro-ondemand-0002"]


def test_results_command_prints_counts(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD + "9,bad,X,Y,1\n")
    run(["run", "--config", setup["config"]])
    result = run(["results", str(last_run(setup["out"]))])
    assert result.exit_code == 1
    assert "INVALID_EMAIL" in result.output
    assert "confirm" in result.output and "followup" in result.output


def test_log_json_lines_on_stderr(setup: dict[str, Any]) -> None:
    (setup["data"] / "orders.csv").write_text(GOOD)
    result = run(["run", "--config", setup["config"], "--log-json"])
    lines = [orjson.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert any(x["message"] == "run finished" and x["level"] == "info" for x in lines)


def test_demo_config_shows_every_code(in_repo: Path, tmp_path: Path) -> None:
    """The example config on the sample data: every code the demo promises appears."""
    env = {
        "MAILPIPE_STORE_URL": f"sqlite:///{tmp_path}/demo.db",
        "MAILPIPE_RUN_OUT": str(tmp_path / "out"),
    }
    for args in (
        ["subscribers", "import", "sample_data/subscribers.csv"],
        ["suppression", "import", "sample_data/suppression.csv"],
    ):
        assert run(args, env=env).exit_code == 0
    result = run(["run"], env=env)
    assert result.exit_code == 1
    rows = check_run_dir(last_run(tmp_path / "out"))
    results = {r["result"] for r in rows if r["target"] == "maestro-ondemand"}
    expected = {
        "SUCCESS",
        "PARSE_ERROR",
        "MAIL_JOB_NOT_FOUND",
        "ILLEGAL_JOB_STATE",
        "TRIGGER_CLOSED",
        "DATASET_NOT_FOUND",
        "HOSTED_LIST_NOT_FOUND",
        "PROFILE_VALIDATION_ERROR",
        "ADDRESS_NOT_FOUND",
        "ADDRESS_REJECTED_BY_SUPPRESSION_LIST",
        "ADDRESS_REJECTED_BY_LIST_PROTECTION",
        "SEND_ERROR",
        "INVALID_EMAIL",
        "MISSING_EMAIL",
        "INVALID_DO_UPDATE_FLAG",
        "INVALID_FORCE_ADD_FLAG",
        "INVALID_FORCE_DELIVERY_FLAG",
        "INVALID_PROFILE",
    }
    assert expected <= results, expected - results
    reasons = {
        orjson.loads(r["reason"])["type"] if isinstance(r["reason"], str) else r["reason"]["type"]
        for r in rows
        if r["reason"]
    }
    assert reasons == {
        "PARAMETER_VALIDATION_ERROR",
        "SUBSCRIBE_NOT_POSSIBLE",
        "ALREADY_SUBSCRIBED",
        "AUTHENTICATION_REQUIRED",
        "PROFILE_VALIDATION_ERROR",
    }
    assert any(
        r["http_status"] == 409 and r["message"].startswith("Subscriber must be a memberOf")
        for r in rows
    )
    assert any(r["target"] == "yesmail-send" and r["status"] == "completed" for r in rows)


def test_cases_dir_exists() -> None:
    assert CASES.is_dir() and ROOT.joinpath("configs", "mailpipe.toml").is_file()
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_smtp_mode_refuses_a_job_without_a_template_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing template in any job of the run stops it up front (exit 2), not after
    the earlier jobs were sent."""
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs" / "mailpipe.toml"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    got = CliRunner().invoke(main, ["run", "--config", str(cfg), "--mode", "smtp"])
    assert got.exit_code == 2
    assert "jobs.manual-confirmation.template" in got.stderr
    assert not (tmp_path / "out").exists()  # no run started, nothing sent


def test_a_reader_that_goes_away_is_not_an_internal_error(setup: dict[str, Any]) -> None:
    """`mailpipe run | head -0`: the run is done all the same; its exit code stands."""
    import subprocess
    import sys

    (setup["data"] / "orders.csv").write_text(GOOD)
    read, write = os.pipe()
    os.close(read)  # nobody will read the summary
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--config", setup["config"]],
            stdout=write,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write)
    assert b"internal error" not in done.stderr, done.stderr.decode()
    assert done.returncode == 0  # every row completed, as in the clean-run test
    assert check_run_dir(last_run(setup["out"]))


def test_results_table_counts_by_job_status_and_code(setup: dict[str, Any]) -> None:
    """One row per (job, status, code): ignored rows keep the code the ledger settled
    them with, a duplicate has none; the same table from results.jsonl alone, even
    with a line longer than the JSON reader's first block size."""
    (setup["data"] / "orders.csv").write_text(GOOD)
    assert run(["run", "--config", setup["config"]]).exit_code == 0
    second = setup["tmp"] / "orders-2.csv"
    second.write_text(
        GOOD
        + "4,dee@example.com,Dee,Eve,1\n"  # new: completed
        + "5,not-an-email,X,Y,1\n"  # failed: INVALID_EMAIL / 400
        + "6,,X,Y,1\n"  # failed: MISSING_EMAIL / 400
        + "4,dee@example.com,Dee,Eve,1\n"  # same record key as line 6: ignored, no code
        + f"7,{'x' * 2_000_000},X,Y,1\n"  # failed: INVALID_EMAIL / 400, a 2 MB line
    )
    assert run(["run", "--config", setup["config"], str(second)]).exit_code == 1
    d = last_run(setup["out"])
    table = [
        "job       target            status     code           rows",
        "confirm   maestro-ondemand  completed  SUCCESS           1",
        "confirm   maestro-ondemand  failed     INVALID_EMAIL     2",
        "confirm   maestro-ondemand  failed     MISSING_EMAIL     1",
        "confirm   maestro-ondemand  ignored    SUCCESS           4",
        "confirm   maestro-ondemand  ignored                      1",
        "followup  yesmail-send      completed  202/completed     1",
        "followup  yesmail-send      failed     400               3",
        "followup  yesmail-send      ignored    202/completed     4",
        "followup  yesmail-send      ignored                      1",
        "total                                                   18",
    ]
    result = run(["results", str(d)])
    assert result.exit_code == 1  # some row failed, as for the run
    assert result.stdout.splitlines() == table
    as_json = run(["results", "--json", str(d)])
    assert as_json.exit_code == 1
    doc = orjson.loads(as_json.stdout)
    assert doc["run_dir"] == str(d) and doc["total"] == 18
    assert [tuple(c.values()) for c in doc["counts"]] == [
        ("confirm", "maestro-ondemand", "completed", "SUCCESS", 1),
        ("confirm", "maestro-ondemand", "failed", "INVALID_EMAIL", 2),
        ("confirm", "maestro-ondemand", "failed", "MISSING_EMAIL", 1),
        ("confirm", "maestro-ondemand", "ignored", "SUCCESS", 4),
        ("confirm", "maestro-ondemand", "ignored", None, 1),
        ("followup", "yesmail-send", "completed", "202/completed", 1),
        ("followup", "yesmail-send", "failed", "400", 3),
        ("followup", "yesmail-send", "ignored", "202/completed", 4),
        ("followup", "yesmail-send", "ignored", None, 1),
    ]
    (d / "results.parquet").unlink()
    assert run(["results", str(d)]).stdout.splitlines() == table


@pytest.mark.parametrize(
    ("stdout_tty", "stderr_tty", "log_json", "bars"),
    [
        (True, True, False, True),
        (False, True, False, False),  # `mailpipe run --json > out.json` on a terminal
        (True, False, False, False),  # stderr to a log file
        (False, False, False, False),  # cron
        (True, True, True, False),  # --log-json: stderr carries JSON lines
    ],
)
def test_progress_bars_only_when_stdout_and_stderr_are_terminals(
    monkeypatch: pytest.MonkeyPatch, stdout_tty: bool, stderr_tty: bool, log_json: bool, bars: bool
) -> None:
    import sys

    from pipeline.cli import wants_progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr_tty)
    assert wants_progress(log_json) is bars


def test_rejected_signups_never_show_their_password(tmp_path: Path) -> None:
    """A signup row that becomes a reject keeps its raw text in rejects.jsonl, but not its
    password: a row that was read has the value hidden wherever it appears, a broken
    JSON line the value of its password key."""
    signups = tmp_path / "signups.jsonl"
    rows = [
        '{"email": "bad-address", "first_name": "A", "password": "TopSecretPw1"}',
        '{"email": "b@example.com", "birth_year": "abc", "password": "Pw\\"Quoted2"}',
        '{"email": "c@example.com", "password": "BrokenSecret3", ',
        '{"email": "ok@example.com", "first_name": "D", "password": "FineSecret4"}',
    ]
    signups.write_text("\n".join(rows) + "\n")
    env = {
        "MAILPIPE_SOURCES_SIGNUPS_PATH": str(signups),
        "MAILPIPE_STORE_URL": f"sqlite:///{tmp_path}/s.db",
        "MAILPIPE_RUN_OUT": str(tmp_path / "out"),
    }
    config = str(ROOT / "configs" / "mailpipe.toml")
    result = run(["run", "--config", config, "--job", "newsletter-signup"], env=env)
    assert result.exit_code == 1, result.output
    d = last_run(tmp_path / "out")
    rejects = [orjson.loads(x) for x in (d / "rejects.jsonl").read_bytes().splitlines()]
    assert [r["line"] for r in rejects] == [1, 2, 3]
    assert rejects[0]["raw"] == '{"email": "bad-address", "first_name": "A", "password": "***"}'
    assert rejects[1]["raw"] == '{"email": "b@example.com", "birth_year": "abc", "password": "***"}'
    assert rejects[2]["raw"] == '{"email": "c@example.com", "password": "***", '
    secrets = ("TopSecretPw1", "Quoted2", "BrokenSecret3", "FineSecret4")
    for path in d.rglob("*"):
        if path.is_file() and "stages" not in path.parts:  # stage files: 0600, they send it
            text = path.read_bytes()
            assert not any(s.encode() in text for s in secrets), path


def test_a_reject_line_that_cannot_be_split_is_not_shown_when_it_may_hold_a_password() -> None:
    from pipeline.results import hide_password

    assert hide_password("1,a@example.com,s3cret,extra", None, "pw", True) == "***"
    assert hide_password('1,a@example.com,"s""3"', 's"3', "pw", False) == '1,a@example.com,"***"'
    assert hide_password("1,a@example.com,", None, "pw", False) == "1,a@example.com,"
    assert hide_password('{"pw": 12345, "x": 1}', None, "pw", True) == '{"pw": "***", "x": 1}'
