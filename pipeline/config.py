"""TOML → typed, frozen settings. The one place that reads config and environment.

A config has five sections::

    [run]       where run directories go, chunk size
    [store]     the state database URL
    [delivery]  simulate | http | smtp, and each mode's settings
    [lists.*]   InboxFirst-shaped list settings + Maestro profile fields
    [sources.*] input files and their column → field mapping
    [jobs.*]    source → target on a list, with the platform's options

Any setting can be overridden from the environment as ``MAILPIPE_<SECTION>_<KEY>``
(``MAILPIPE_DELIVERY_MODE=smtp``, ``MAILPIPE_DELIVERY_SMTP_PORT=2525``,
``MAILPIPE_JOBS_ORDER_CONFIRMATION_BATCH_SIZE=100``). Secrets are never config
values: the config names the environment variable that holds them.

Every problem is reported as ``<dotted.key>: <what is wrong>; <what to write>``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

__all__ = [
    "FLAG_NAMES",
    "TARGETS",
    "DeliveryConfig",
    "FieldType",
    "JobConfig",
    "JobPlan",
    "ListConfig",
    "MailpipeConfig",
    "ProfileField",
    "SourceConfig",
    "Target",
    "load_config",
    "parse_config",
]

Target = Literal["maestro-ondemand", "maestro-subscribe", "yesmail-send"]
TARGETS: tuple[Target, ...] = ("maestro-ondemand", "maestro-subscribe", "yesmail-send")
FieldType = Literal["text", "number", "boolean", "single-select", "multi-select"]
FLAG_NAMES = ("ifNotExistsAddAndSend", "ifExistsDoUpdate", "ifExistsForceSending")
MAX_BATCH = 300
ENV_PREFIX = "MAILPIPE_"
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_HEADER_LINE = re.compile(r"^[!-9;-~]+:[ \t]*[^\r\n]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _KeyProblem(ValueError):
    """A problem a model-level check finds with one of the model's keys (reported as that key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class ProfileField(_Model):
    """A Maestro profile field: its type, whether it is mandatory, its default."""

    type: FieldType = "text"
    mandatory: bool = False
    default: str | int | bool | list[str] | None = None
    lookup: tuple[str, ...] = ()
    html: bool = False

    @model_validator(mode="after")
    def _check(self) -> ProfileField:
        if self.type in ("single-select", "multi-select") and not self.lookup:
            raise _KeyProblem(
                "lookup", f'a {self.type} field needs its lookup values: lookup = ["A", "B"]'
            )
        if self.default is not None:
            problem = _default_problem(self)
            if problem:
                raise _KeyProblem("default", f"default {self.default!r} {problem}")
        return self


_PLAIN_TEXT = ProfileField()  # an on-demand merge field (frozen: one instance serves all)


def _default_problem(f: ProfileField) -> str | None:
    d = f.default
    if f.type == "number" and (isinstance(d, bool) or not isinstance(d, int)):
        return "is not an integer; write default = 0"
    if f.type == "boolean" and not isinstance(d, bool):
        return "is not a boolean; write default = true or false"
    if f.type == "text" and not isinstance(d, str):
        return "is not text; write it in quotes"
    if f.type == "single-select" and d not in f.lookup:
        return f"is not one of the lookup values {list(f.lookup)}"
    if f.type == "multi-select" and (not isinstance(d, list) or any(v not in f.lookup for v in d)):
        return f"must be a list of lookup values from {list(f.lookup)}"
    return None


class ListConfig(_Model):
    """One mailing list: the InboxFirst list record plus the Maestro identifiers and fields."""

    name: str
    d_from_email: str
    d_from_name: str = ""
    d_reply_to: str = ""
    d_sender_email: str = ""
    d_bounce_email: str | None = None
    d_virtual_mta: str = ""
    d_url_domain: str = ""
    d_speed: int = Field(default=0, ge=0)
    d_seed_list_ids: tuple[int, ...] | None = None
    d_seed_list_names: tuple[str, ...] | None = None
    d_autowinner_enabled: bool = False
    d_autowinner_percentage: str | float | int | None = None
    d_autowinner_delay_amount: int | None = None
    d_autowinner_delay_unit: Literal["minutes", "hours", "days"] | None = None
    d_autowinner_metric: str | None = None
    has_format: bool = False
    has_confirmed: bool = False
    custom_headers_enabled: bool = False
    custom_headers: str = ""
    mContainer: str | None = None
    mOwner: str | None = None
    mListId: str | None = None
    group: str | None = None
    subscribe_open: bool = True
    fields: dict[str, ProfileField] = Field(default_factory=dict)

    @field_validator("fields")
    @classmethod
    def _names(cls, v: dict[str, ProfileField]) -> dict[str, ProfileField]:
        for name in v:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"field name {name!r} must be letters, digits and _ (FIRST_NAME)")
        return v

    @field_validator("d_autowinner_percentage")
    @classmethod
    def _percentage(cls, v: str | float | int | None) -> str | None:
        if v is None:
            return None
        text = f"{v}" if not isinstance(v, float) else repr(v)
        try:
            dec = Decimal(text)
        except InvalidOperation:
            raise ValueError(f'{v!r} is not a number; write e.g. "25.0"') from None
        if not dec.is_finite():
            raise ValueError(f'{v!r} is not a number; write e.g. "25.0"')
        exponent = dec.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -2:
            raise ValueError(f'{v!r} has more than two decimals; write e.g. "25.50"')
        return text

    @model_validator(mode="after")
    def _inboxfirst_rules(self) -> ListConfig:
        if self.d_seed_list_ids is not None and self.d_seed_list_names is not None:
            raise _KeyProblem(
                "d_seed_list_names",
                "give only one of d_seed_list_ids and d_seed_list_names; remove the other",
            )
        if self.custom_headers_enabled and not self.custom_headers.strip():
            raise _KeyProblem(
                "custom_headers",
                "custom_headers_enabled is true, so custom_headers must be set "
                '(custom_headers = "X-Company: Acme\\n")',
            )
        for line in self.custom_headers.splitlines():
            if line.strip() and not _HEADER_LINE.match(line):
                raise _KeyProblem(
                    "custom_headers",
                    f"line {line!r} is not a header; write 'Name: value' lines",
                )
        return self


class SourceConfig(_Model):
    """Where input files come from and which column holds which field."""

    kind: Literal["orders", "signups"]
    path: str
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    delimiter: str = ","
    quotechar: str = '"'
    encoding: str = "utf-8"
    email: str
    record_id: str | None = None
    record_key: str | None = None
    created_at: str | None = None
    password: str | None = None
    remote_address: str | None = None
    user_agent: str | None = None
    fields: dict[str, str] = Field(default_factory=dict)
    flags: dict[str, str] = Field(default_factory=dict)
    profile_json: str | None = None

    @field_validator("delimiter", "quotechar")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1 or v in "\r\n":
            raise ValueError(f'{v!r} must be exactly one character, e.g. "," or ";"')
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f'unknown encoding {v!r}; write e.g. "utf-8" or "cp1252"') from None
        return v

    @field_validator("flags")
    @classmethod
    def _flag_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name not in FLAG_NAMES:
                raise ValueError(f"unknown flag {name!r}; use one of {', '.join(FLAG_NAMES)}")
        return v

    def columns(self) -> dict[str, str]:
        """Internal column name → source column, for every mapped column."""
        cols = {"email": self.email}
        for role in ("record_id", "record_key", "created_at", "password"):
            col = getattr(self, role)
            if col:
                cols[role] = col
        if self.remote_address:
            cols["remoteAddress"] = self.remote_address
        if self.user_agent:
            cols["userAgent"] = self.user_agent
        if self.profile_json:
            cols["profile_json"] = self.profile_json
        cols.update({f"f:{name}": col for name, col in self.fields.items()})
        cols.update({f"flag:{name}": col for name, col in self.flags.items()})
        return cols

    @property
    def key_column(self) -> str | None:
        """The internal column whose value groups rows into one record, if any."""
        if self.record_key:
            return "record_key"
        return "record_id" if self.record_id else None


class Subscriptions(_Model):
    add: tuple[str, ...] | None = None
    remove: tuple[str, ...] | None = None
    setReferred: Literal["newOnly", "newOrNotSubscribed"] | None = None
    isMemberOf: tuple[str, ...] | None = None


class JobConfig(_Model):
    """One job: rows of a source become payloads for a target on a list."""

    source: str
    target: Target
    list: str
    enabled: bool = True
    batch_size: int = Field(default=MAX_BATCH, ge=1, le=MAX_BATCH)
    fields: tuple[str, ...] | None = None
    # maestro-ondemand
    mail_job: str | None = None
    trigger_url: str | None = None
    token_env: str | None = None
    max_url_bytes: int = Field(default=8000, ge=512)
    ifNotExistsAddAndSend: bool = False
    ifExistsDoUpdate: bool = False
    ifExistsForceSending: bool = False
    merge_fields: tuple[str, ...] = ()
    # maestro-subscribe
    subscribe_url: str | None = None
    # yesmail-send
    templateId: str | None = None
    transactional: bool = False
    updateProfile: bool = False
    subscriptions: Subscriptions | None = None
    recipient_id: str = "email"
    attrs: dict[str, str] = Field(default_factory=dict)
    # smtp mode: the message template (a directory under delivery.smtp.templates)
    template: str | None = None

    @field_validator("merge_fields")
    @classmethod
    def _merge_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"merge field {name!r} must be letters, digits and _")
        return v


class SmtpConfig(_Model):
    """``smtp`` mode: the relay, how to reach it safely and how fast, and the messages.

    ``rate`` is messages per second over the whole pool (0: no limit; a list's
    ``d_speed`` may lower it). Templates live in ``templates``, one directory
    per template; Yesmail jobs find theirs through ``template_ids``. The
    confirmation and unsubscribe links carry tokens signed with the key in
    the environment variable ``token_key_env``.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    allow_insecure: bool = False
    username_env: str | None = None
    password_env: str | None = None
    ca_file: str | None = None
    local_hostname: str | None = None
    timeout: float = Field(default=30.0, gt=0)
    pool_size: int = Field(default=4, ge=1, le=256)
    messages_per_connection: int = Field(default=1000, ge=1)
    rate: float = Field(default=0.0, ge=0)
    templates: str = "configs/templates"
    template_ids: dict[str, str] = Field(default_factory=dict)
    confirm_url: str | None = None
    unsubscribe_url: str | None = None
    token_key_env: str = "MAILPIPE_TOKEN_KEY"
    confirm_ttl_hours: float = Field(default=72.0, gt=0)


class HttpConfig(_Model):
    """``http`` mode and ``mailpipe lists``: endpoints, limits, and where the secrets are.

    ``rate`` is requests per second (0: no limit); a Yesmail ticket is first
    polled after about the time tickets have been taking (at least
    ``poll_interval``, at most ``poll_max_interval`` seconds), then at doubling
    intervals up to ``poll_max_interval``, for at most ``ticket_timeout`` seconds.
    """

    timeout: float = Field(default=30.0, gt=0)
    concurrency: int = Field(default=8, ge=1, le=512)
    rate: float = Field(default=0.0, ge=0)
    yesmail_url: str = "https://api.yesmail.com"
    maestro_url: str = "https://maestro.example.com"
    api_user_env: str = "YESMAIL_API_USER"
    api_key_env: str = "YESMAIL_API_KEY"
    poll_interval: float = Field(default=1.0, gt=0)
    poll_max_interval: float = Field(default=30.0, gt=0)
    ticket_timeout: float = Field(default=600.0, gt=0)
    inboxfirst_url: str = "https://inboxfirst.example.com"
    inboxfirst_user_env: str = "INBOXFIRST_USER"
    inboxfirst_key_env: str = "INBOXFIRST_API_KEY"


class RetryConfig(_Model):
    # 10: under a 30% rate of transient failures (the sandbox's --fail-rate 0.3) a request
    # still fails 0.3**10 = 6e-6 of the time; at 4 it was 0.8%, a row in a demo run
    attempts: int = Field(default=10, ge=1, le=20)
    base_delay: float = Field(default=0.5, ge=0)
    max_delay: float = Field(default=30.0, ge=0)


class DeliveryConfig(_Model):
    mode: Literal["simulate", "http", "smtp"] = "simulate"
    retry: RetryConfig = Field(default_factory=RetryConfig)
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)


class StoreConfig(_Model):
    url: str = "sqlite:///state/mailpipe.db"


class RunConfig(_Model):
    out: str = "out"
    chunk_rows: int = Field(default=65536, ge=1, le=4_194_304)


class WatchConfig(_Model):
    """``mailpipe watch``: a file is complete once unchanged for ``settle`` seconds
    (or when its ``NAME.ready`` marker is there); the drop directory is looked at
    every ``interval`` seconds, and one run takes at most ``max_files`` files."""

    settle: float = Field(default=30.0, ge=0)
    interval: float = Field(default=10.0, gt=0)
    max_files: int = Field(default=1000, ge=1)


MailJobState = Literal["authorized", "closed", "not-authorized"]


class SimulateConfig(_Model):
    """How the simulated platforms look: what the engine answers from, besides the store.

    ``mail_jobs`` lists the Maestro mail jobs that exist and their state; when
    it is empty every job's mail job exists and is authorized. Lists named in
    ``missing_lists`` / ``missing_datasets`` are gone on the platform.
    """

    mail_jobs: dict[str, MailJobState] = Field(default_factory=dict)
    missing_lists: tuple[str, ...] = ()
    missing_datasets: tuple[str, ...] = ()
    bounce_limit: int = Field(default=3, ge=1)
    group_daily_limit: int | None = Field(default=None, ge=1)
    api_user: str = "mailpipe"


class MailpipeConfig(_Model):
    """The whole configuration, validated across sections."""

    run: RunConfig = Field(default_factory=RunConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
    lists: dict[str, ListConfig] = Field(default_factory=dict)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    jobs: dict[str, JobConfig] = Field(default_factory=dict)
    path: str | None = Field(default=None, exclude=True)

    def plan(self, job_name: str) -> JobPlan:
        """Everything one job needs, resolved: its source, list and the fields it sends."""
        job = self.jobs[job_name]
        return JobPlan(
            job_name,
            job,
            job.source,
            self.sources[job.source],
            job.list,
            self.lists[job.list],
            self.job_fields(job_name),
        )

    def job_fields(self, job_name: str) -> tuple[str, ...]:
        """The profile fields a job sends: its ``fields`` or all of its source's fields."""
        job = self.jobs[job_name]
        if job.fields is not None:
            return job.fields
        return tuple(self.sources[job.source].fields)

    def digest(self) -> str:
        """sha256 of the effective settings (no secrets live in them)."""
        data = self.model_dump(mode="json", exclude={"path"})
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True)
class JobPlan:
    """A job with its source and list looked up."""

    name: str
    job: JobConfig
    source_name: str
    source: SourceConfig
    list_name: str
    lst: ListConfig
    fields: tuple[str, ...]

    @property
    def target(self) -> Target:
        return self.job.target

    @property
    def mail_job(self) -> str:
        """The Maestro mail job a maestro-ondemand job triggers (its own name by default)."""
        return self.job.mail_job or self.name

    def field_spec(self, name: str) -> ProfileField:
        """The list's definition of a field; on-demand merge fields are plain text."""
        return self.lst.fields.get(name) or _PLAIN_TEXT


def _cross_check(cfg: MailpipeConfig) -> list[ConfigError]:
    errors: list[ConfigError] = []

    def err(key: str, msg: str) -> None:
        errors.append(ConfigError(key, msg))

    if not cfg.jobs:
        err("jobs", "no jobs are defined; add a [jobs.NAME] table with source, target and list")
    for name in cfg.simulate.missing_lists + cfg.simulate.missing_datasets:
        if name not in cfg.lists:
            err("simulate", f"no list {name!r} to mark missing; write one of {sorted(cfg.lists)}")
    for name, job in cfg.jobs.items():
        key = f"jobs.{name}"
        if job.source not in cfg.sources:
            err(f"{key}.source", f"no source {job.source!r}; write one of {sorted(cfg.sources)}")
            continue
        if job.list not in cfg.lists:
            err(f"{key}.list", f"no list {job.list!r}; write one of {sorted(cfg.lists)}")
            continue
        lst = cfg.lists[job.list]
        src = cfg.sources[job.source]
        for field in job.fields or ():
            if field not in src.fields:
                err(
                    f"{key}.fields",
                    f"source {job.source!r} maps no field {field!r}; "
                    f"add it to [sources.{job.source}.fields] or remove it here",
                )
        sent = cfg.job_fields(name)
        if job.target == "maestro-ondemand":
            known = set(lst.fields) | set(job.merge_fields)
            for field in sent:
                if field not in known:
                    err(
                        f"{key}.fields",
                        f"{field!r} is neither a field of list {job.list!r} nor "
                        f"an on-demand merge field; add it to {key}.merge_fields",
                    )
            clash = set(job.merge_fields) & set(lst.fields)
            if clash:
                err(
                    f"{key}.merge_fields",
                    f"{sorted(clash)} are list fields already; "
                    "on-demand merge fields are extra, one-time values",
                )
        elif job.target == "maestro-subscribe":
            for ident in ("mContainer", "mOwner", "mListId"):
                if not getattr(lst, ident):
                    err(
                        f"lists.{job.list}.{ident}",
                        f"job {name!r} subscribes to this list, so {ident} must be set",
                    )
            for field in sent:
                if field not in lst.fields:
                    err(
                        f"{key}.fields",
                        f"{field!r} is not a field of list {job.list!r}; "
                        "maestro-subscribe sends list fields only",
                    )
        elif job.target == "yesmail-send":
            if not job.templateId:
                err(
                    f"{key}.templateId",
                    'yesmail-send needs the template to send: templateId = "1465362"',
                )
            # the builder reads the id from the job's own columns: a field it does not send is
            # not there, and an unmapped record_id would silently drop "id"
            if job.recipient_id not in ("email", "record_id", *sent):
                err(
                    f"{key}.recipient_id",
                    f"{job.recipient_id!r} is not a field this job sends; write "
                    f'"email", "record_id" or one of {list(sent)}',
                )
            elif job.recipient_id == "record_id" and not src.record_id:
                err(
                    f"{key}.recipient_id",
                    f"source {job.source!r} maps no record_id column; set "
                    f'sources.{job.source}.record_id or write recipient_id = "email"',
                )
            for field in job.attrs:
                if field not in sent:
                    err(f"{key}.attrs", f"{field!r} is not a field this job sends")
        if job.target != "maestro-ondemand":
            for opt in (*FLAG_NAMES, "merge_fields"):
                if opt in job.model_fields_set:
                    err(f"{key}.{opt}", f"only maestro-ondemand jobs take {opt}; remove it")
        if job.target != "yesmail-send":
            for opt in ("templateId", "transactional", "updateProfile", "subscriptions", "attrs"):
                if opt == "transactional" and job.target == "maestro-ondemand":
                    continue  # smtp mode: a transactional message has no List-Unsubscribe
                if opt in job.model_fields_set:
                    err(f"{key}.{opt}", f"only yesmail-send jobs take {opt}; remove it")
        if src.flags and job.target != "maestro-ondemand":
            err(
                f"sources.{job.source}.flags",
                f"per-row flags only apply to maestro-ondemand, but job {name!r} is {job.target}",
            )
        if src.profile_json and job.target != "maestro-ondemand":
            err(
                f"sources.{job.source}.profile_json",
                f"a per-row profile object only applies to maestro-ondemand, "
                f"but job {name!r} is {job.target}",
            )
    from pipeline.mail.settings import smtp_problems  # smtp mode's keys, no file reads

    errors += [ConfigError(key, msg) for key, msg in smtp_problems(cfg)]
    return errors


# -- loading ----------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> MailpipeConfig:
    """Read a TOML file, apply ``MAILPIPE_*`` overrides, validate. Raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "",
            f"{p}: config file not found; pass --config PATH "
            "(configs/mailpipe.toml is the documented example)",
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("", f"{p}: cannot read config ({e})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{p}: not valid TOML ({e}); fix the syntax there") from None
    return parse_config(raw, env=os.environ if env is None else env, path=str(p))


def parse_config(
    raw: dict[str, Any], env: Mapping[str, str] | None = None, path: str | None = None
) -> MailpipeConfig:
    """Validate a config dict (after environment overrides)."""
    raw = apply_env_overrides(raw, env or {})
    try:
        cfg = MailpipeConfig.model_validate({**raw, "path": path})
    except ValidationError as e:
        raise _first_error(e) from None
    problems = _cross_check(cfg)
    if problems:
        raise problems[0]
    return cfg


def check_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem of a config file, one line each (empty list when it is fine)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        try:
            load_config(path, env)
        except ConfigError as e:
            return [e.message]
        raise
    try:
        raw = apply_env_overrides(raw, os.environ if env is None else env)
        cfg = MailpipeConfig.model_validate({**raw, "path": str(path)})
    except ConfigError as e:
        return [e.message]
    except ValidationError as e:
        return [line for _, line in _problems(e)]
    problems = [p.message for p in _cross_check(cfg)]
    from pipeline.mail.templates import template_problems  # reads the template files

    return problems + [p.message for p in template_problems(cfg)]


def _problems(e: ValidationError) -> list[tuple[str, str]]:
    """(dotted key, line) per problem; a union's complaints about one value count once."""
    lines: dict[str, str] = {}
    for err in e.errors():
        lines.setdefault(".".join(_error_loc(err)) or "config", _format_error(err))
    return list(lines.items())


def _first_error(e: ValidationError) -> ConfigError:
    probs = _problems(e)
    error = ConfigError(
        "",
        "; ".join(line for _, line in probs[:3])
        + (f" (and {len(probs) - 3} more: run `mailpipe config check`)" if len(probs) > 3 else ""),
    )
    error.key = probs[0][0]
    return error


def _error_loc(err: Any) -> list[str]:
    """The config keys an error is about: union member labels (``str``, ``int``…) left out."""
    loc: list[str] = []
    model: Any = MailpipeConfig
    for part in err["loc"]:
        if isinstance(part, int):  # an item of an array
            loc.append(str(part))
            continue
        if part.startswith(("function-", "union[")):
            continue
        if isinstance(model, _DictOf):
            loc.append(part)
            model = model.value
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None:  # inside a plain value: the rest names union members, not keys
            continue
        loc.append(part)
        model = _model_of(fields[part].annotation) if part in fields else None
    problem = (err.get("ctx") or {}).get("error")
    if isinstance(problem, _KeyProblem):
        loc.append(problem.key)
    return loc


def _format_error(err: Any) -> str:
    loc = _error_loc(err)
    key = ".".join(loc) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        hint = _did_you_mean(loc)
        return f"{key}: unknown key{hint}; remove it or fix its spelling"
    if kind == "missing":
        return f"{key}: required; add {loc[-1]} = ..."
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if kind.startswith(
        ("int_", "bool_", "float_", "string_", "literal_", "less_than", "greater_than")
    ):
        return f"{key}: {msg} (got {got!r})"
    return f"{key}: {msg}"


def _did_you_mean(loc: list[str]) -> str:
    model: Any = MailpipeConfig
    for part in loc[:-1]:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            if model is not None and _dict_value_model(model) is not None:
                model = _dict_value_model(model)
            continue
        model = _model_of(info.annotation)
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(loc[-1], names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_of(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (dict,):
        return _DictOf(get_args(annotation)[1])
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
        return None
    if origin is Annotated:
        return _model_of(get_args(annotation)[0])
    return annotation


class _DictOf:
    def __init__(self, value: Any) -> None:
        self.value = value


def _dict_value_model(model: Any) -> Any:
    return model.value if isinstance(model, _DictOf) else None


# -- environment overrides ---------------------------------------------------


def apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with every ``MAILPIPE_<SECTION>_<KEY>`` applied.

    The variable name is matched against the schema (and the names of lists,
    sources and jobs, with ``-`` read as ``_``), longest key first, so
    ``MAILPIPE_JOBS_ORDER_CONFIRMATION_BATCH_SIZE`` reaches
    ``jobs.order-confirmation.batch_size``. Variables whose first word is not a
    section (secrets, for instance) are left alone.
    """
    out: dict[str, Any] = orjson.loads(orjson.dumps(raw))
    sections = set(MailpipeConfig.model_fields) - {"path"}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        tokens = name[len(ENV_PREFIX) :].lower().split("_")
        if not tokens or tokens[0] not in sections:
            continue
        path, annotation = _resolve(tokens, MailpipeConfig, out)
        if path is None:
            raise ConfigError(
                name,
                "matches no setting; check the spelling "
                "(MAILPIPE_<SECTION>_<KEY>, e.g. MAILPIPE_DELIVERY_MODE)",
            )
        _set_path(out, path, _parse_env_value(env[name], annotation))
    return out


def _resolve(tokens: list[str], model: Any, raw: Any) -> tuple[list[str] | None, Any]:
    if not tokens:
        return None, None
    if isinstance(model, _DictOf):
        keys = list(raw) if isinstance(raw, dict) else []
        for n in range(len(tokens), 0, -1):
            want = "_".join(tokens[:n])
            for k in keys:
                if k.lower().replace("-", "_") == want:
                    if n == len(tokens):
                        return None, None
                    sub, ann = _resolve(tokens[n:], model.value, raw[k])
                    return ([k, *sub], ann) if sub is not None else (None, None)
        return None, None
    fields = getattr(model, "model_fields", None)
    if not fields:
        return None, None
    lowered = {f.lower(): f for f in fields}
    for n in range(len(tokens), 0, -1):
        want = "_".join(tokens[:n])
        if want not in lowered:
            continue
        field = lowered[want]
        annotation = fields[field].annotation
        if n == len(tokens):
            return [field], annotation
        sub_model = _model_of(annotation)
        sub_raw = raw.get(field, {}) if isinstance(raw, dict) else {}
        sub, ann = _resolve(tokens[n:], sub_model, sub_raw)
        if sub is not None:
            return [field, *sub], ann
    return None, None


def _parse_env_value(value: str, annotation: Any) -> Any:
    if _is_str(annotation):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _is_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    args = [a for a in get_args(annotation) if a is not type(None)]
    return get_origin(annotation) in (Union, types.UnionType) and args == [str]


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
