"""Message templates with Maestro merge fields, compiled once per job, merged column-wise.

A template is a directory under ``[delivery.smtp] templates``::

    configs/templates/order-confirmation/
      subject.txt    one line:  Your order &ORDER_ID;
      body.txt       the text/plain part
      body.html      the text/html part

``&FIELD;`` names a field of the job's list, one of its on-demand merge
fields, a field the job sends (Yesmail attributes), or a built-in:
``EMAIL``, ``CONFIRM_URL`` (maestro-subscribe jobs) and ``UNSUBSCRIBE_URL``
(jobs that are not transactional). Anything else is an error of ``mailpipe
config check``; so is a field the job has no value for. In ``body.html`` an
``&name;`` that is an HTML entity (``&amp;``) and no field stays as written.

Values are HTML-escaped in the HTML part unless the list declares the field
``html = true`` (whose tags are then dropped from the text part). Merging is
one Arrow kernel call per part for a whole chunk of recipients; a value that
would put a line break into the Subject header is reported by
:meth:`Merger.header_problems` and its record is refused, never sent.
"""

from __future__ import annotations

import html.entities
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import repeat_text, to_bool_np
from pipeline.config import JobPlan, MailpipeConfig
from pipeline.errors import ConfigError
from pipeline.mail.settings import template_name, transactional

__all__ = [
    "FILES",
    "Merged",
    "Merger",
    "Part",
    "Template",
    "builtin_fields",
    "job_template",
    "template_problems",
]

FILES = {"subject": "subject.txt", "text": "body.txt", "html": "body.html"}
_MERGE = re.compile(r"&([A-Za-z][A-Za-z0-9_]*);")
_ENTITIES = frozenset(html.entities.html5)
_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#x27;"))


@dataclass(frozen=True)
class Part:
    """Literal text and field names, alternating: ``lit, FIELD, lit, …, lit``."""

    pieces: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return self.pieces[1::2]


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    subject: Part
    text: Part
    html: Part

    @property
    def fields(self) -> set[str]:
        return {*self.subject.fields, *self.text.fields, *self.html.fields}


@dataclass(frozen=True)
class Merged:
    """Per recipient: the merged subject, text and HTML (CRLF line ends in the bodies)."""

    subject: pa.Array
    text: pa.Array
    html: pa.Array


def builtin_fields(plan: JobPlan) -> tuple[str, ...]:
    out = ["EMAIL"]
    if plan.target == "maestro-subscribe":
        out.append("CONFIRM_URL")
    if not transactional(plan.job):
        out.append("UNSUBSCRIBE_URL")
    return tuple(out)


# -- loading and checking ---------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"{path} is missing; a template needs {', '.join(FILES.values())}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _compile(text: str, is_html: bool, fields: set[str]) -> Part:
    pieces: list[str] = []
    pos = 0
    for m in _MERGE.finditer(text):
        name = m.group(1)
        if is_html and name not in fields and f"{name};" in _ENTITIES:
            continue  # an HTML entity such as &amp; stays as written
        pieces += [text[pos : m.start()], name]
        pos = m.end()
    pieces.append(text[pos:])
    return Part(tuple(pieces))


def _load(directory: Path, name: str, fields: set[str], hint: str | None = None) -> Template:
    path = directory / name
    if not path.is_dir():
        raise ValueError(
            f"no template directory {path}; create it with {', '.join(FILES.values())}"
            + (hint or "")
        )
    subject = _read(path / FILES["subject"]).removesuffix("\n")
    if "\n" in subject or not subject.strip():
        raise ValueError(f"{path / FILES['subject']} must hold exactly one non-empty line")
    bodies = {}
    for part in ("text", "html"):
        body = _read(path / FILES[part])
        body = body if body.endswith("\n") else body + "\n"
        bodies[part] = body.replace("\n", "\r\n")
    return Template(
        name,
        path,
        _compile(subject, False, fields),
        _compile(bodies["text"], False, fields),
        _compile(bodies["html"], True, fields),
    )


def _field_problems(cfg: MailpipeConfig, plan: JobPlan, template: Template) -> list[str]:
    """Each field the template names that the job cannot fill, with the fix."""
    lst, job = plan.lst, plan.job
    builtins = builtin_fields(plan)
    known = set(lst.fields) | set(job.merge_fields) | set(plan.fields) | set(builtins)
    out = []
    for part in ("subject", "text", "html"):
        for name in dict.fromkeys(getattr(template, part).fields):
            where = template.path / FILES[part]
            if name not in known:
                out.append(
                    f"{where} names &{name};, which is neither a field of list "
                    f"{plan.list_name!r}, an on-demand merge field of job {plan.name!r}, a "
                    f"field the job sends, nor one of {', '.join(builtins)}; fix the name or "
                    "add the field"
                )
            elif name not in builtins and name not in plan.fields:
                spec = lst.fields.get(name)
                if spec is None or spec.default is None:
                    out.append(
                        f"{where} names &{name};, which job {plan.name!r} does not send; map "
                        f"it in [sources.{plan.source_name}.fields] and list it in "
                        f"jobs.{plan.name}.fields"
                    )
    return out


def job_template(cfg: MailpipeConfig, plan: JobPlan) -> Template:
    """The job's template, loaded and checked. Raises :class:`ConfigError`."""
    problems, template = _check(cfg, plan)
    if template is None or problems:
        raise ConfigError(f"jobs.{plan.name}.template", problems[0])
    return template


def _check(cfg: MailpipeConfig, plan: JobPlan) -> tuple[list[str], Template | None]:
    fields = set(plan.lst.fields) | set(plan.job.merge_fields) | set(plan.fields)
    fields |= set(builtin_fields(plan))
    hint = None
    if plan.target == "yesmail-send" and plan.job.templateId not in cfg.delivery.smtp.template_ids:
        hint = f", or map templateId {plan.job.templateId!r} to one in [delivery.smtp.template_ids]"
    try:
        name = template_name(cfg, plan.name)
        template = _load(Path(cfg.delivery.smtp.templates), name, fields, hint)
    except ValueError as e:
        return [str(e)], None
    return _field_problems(cfg, plan, template), template


def template_problems(cfg: MailpipeConfig) -> list[ConfigError]:
    """Problems of the templates the config uses: in smtp mode every enabled job's; in any
    mode those named explicitly (a job's ``template``, a mapped Yesmail ``templateId``)."""
    out: list[ConfigError] = []
    smtp = cfg.delivery.smtp
    for name, job in cfg.jobs.items():
        if job.source not in cfg.sources or job.list not in cfg.lists:
            continue  # reported already
        named = job.template is not None or (
            job.target == "yesmail-send" and (job.templateId or "") in smtp.template_ids
        )
        if not named and not (cfg.delivery.mode == "smtp" and job.enabled):
            continue
        problems, _ = _check(cfg, cfg.plan(name))
        out += [ConfigError(f"jobs.{name}.template", p) for p in problems]
    return out


# -- merging -------------------------------------------------------------------------------


def _as_text(col: pa.Array) -> pa.Array:
    """A profile column as the text a merge field shows (lists joined by ", ")."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = pc.binary_join(col, ", ")
    elif not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return pc.fill_null(col, "")


def _escape(col: pa.Array) -> pa.Array:
    for raw, entity in _ESCAPES:
        col = pc.replace_substring(col, raw, entity)
    return col


def _crlf(col: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(col, r"\r\n|\r|\n", "\r\n")


class Merger:
    """A template bound to one job: recipients' rows in, merged parts out."""

    def __init__(self, template: Template, plan: JobPlan) -> None:
        self.template = template
        self.plan = plan
        self.html_fields = {n for n in template.fields if plan.field_spec(n).html}

    def values(self, rows: pa.Table, extra: Mapping[str, pa.Array]) -> dict[str, pa.Array]:
        """Each field's text per recipient: ``extra`` (built-ins), the row's value, or the
        list field's default."""
        n = rows.num_rows
        out: dict[str, pa.Array] = {}
        for name in self.template.fields:
            if name in extra:
                col = extra[name]
            elif name == "EMAIL":
                col = rows.column("email").combine_chunks()
            elif f"f:{name}" in rows.column_names:
                col = rows.column(f"f:{name}").combine_chunks()
            else:
                spec = self.plan.lst.fields[name]
                default = spec.default
                text = ", ".join(default) if isinstance(default, list) else str(default)
                if isinstance(default, bool):
                    text = text.lower()
                col = repeat_text(text, n)
            out[name] = _as_text(col)
        return out

    def header_problems(self, values: Mapping[str, pa.Array]) -> tuple[np.ndarray, list[str]]:
        """Which recipients have a line break in a value bound for the Subject header, and
        for each of them the field (in subject order; the first one found)."""
        n = len(next(iter(values.values()))) if values else 0
        bad = np.zeros(n, dtype=bool)
        field = np.full(n, None, dtype=object)
        for name in dict.fromkeys(self.template.subject.fields):
            hit = to_bool_np(pc.match_substring_regex(values[name], r"[\r\n]"))
            field[hit & ~bad] = name
            bad |= hit
        return bad, field[bad].tolist()

    def merge(self, values: Mapping[str, pa.Array], n: int) -> Merged:
        text_vals: dict[str, pa.Array] = {}
        html_vals: dict[str, pa.Array] = {}
        for name in {*self.template.text.fields, *self.template.html.fields}:
            col = _crlf(values[name])
            if name in self.html_fields:
                html_vals[name] = col
                text_vals[name] = pc.replace_substring_regex(col, r"<[^>]*>", "")
            else:
                html_vals[name] = _escape(col)
                text_vals[name] = col
        return Merged(
            _join(self.template.subject, values, n),
            _join(self.template.text, text_vals, n),
            _join(self.template.html, html_vals, n),
        )


def _join(part: Part, values: Mapping[str, pa.Array], n: int) -> pa.Array:
    """The part for every recipient: one element-wise join of literals and value columns."""
    if not part.fields:
        return repeat_text(part.pieces[0], n)
    args: list[pa.Array | str] = [
        values[p] if i % 2 else p for i, p in enumerate(part.pieces) if i % 2 or p
    ]
    return pc.binary_join_element_wise(*args, "")
