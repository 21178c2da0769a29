"""The stage runner: extract → normalize → build → deliver → report, over a run directory.

Each stage is a function of a :class:`~pipeline.rundir.RunDir`: it reads what
the previous stage wrote there and records its own state and timing in the
manifest, so any stage can be run again on its own. :func:`run_pipeline`
creates a run directory and chains them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from pipeline import __version__, release_memory
from pipeline.build import BUILD_SCHEMA, BatchCounter, JobBuild, build_job
from pipeline.config import MailpipeConfig, parse_config
from pipeline.errors import ConfigError, InputFileError, RunDirError
from pipeline.extract import (
    FileStats,
    expand_inputs,
    extract_file,
    extracted_schema,
    file_sha256,
)
from pipeline.flow import run_chain
from pipeline.normalize import InputRef, Normalizer, Window
from pipeline.results import ReportWriter
from pipeline.rundir import STAGES, RunDir, now_iso

if TYPE_CHECKING:
    from pipeline.ledger import Ledger

__all__ = ["Progress", "RunOutcome", "open_run", "run_pipeline", "run_stage", "start_run"]

Progress = Callable[[str, int], None]
log = logging.getLogger("mailpipe")


@dataclass
class RunOutcome:
    """What a run (or a stage) ended with; the CLI maps it to an exit code."""

    run: RunDir
    summary: dict[str, Any]

    @property
    def failed_rows(self) -> int:
        return int(self.summary.get("status", {}).get("failed", 0))

    @property
    def failed_files(self) -> list[str]:
        return [i["path"] for i in self.summary.get("inputs", []) if i.get("error")]

    @property
    def exit_code(self) -> int:
        """0: every row completed or ignored; 1: some row failed or a file could not be read."""
        return 1 if self.failed_rows or self.failed_files else 0


def _noop(stage: str, rows: int) -> None:
    return None


@dataclass(frozen=True)
class RunOptions:
    """How a run treats the ledger and its input; kept in the manifest for stage re-runs.

    ``resend``: jobs whose records are sent again even when the ledger settled
    them; ``in_doubt``: what to do with records a crashed run may or may not
    have sent (``skip`` or ``resend``); ``window``: backfill's created-at window
    (epoch seconds); ``dry_run``: simulate, store and ledger untouched;
    ``rate``: at most this many recipients a second.
    """

    resend: tuple[str, ...] = ()
    in_doubt: str = "skip"
    window: tuple[int, int] | None = None
    dry_run: bool = False
    rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "resend": list(self.resend),
            "in_doubt": self.in_doubt,
            "window": list(self.window) if self.window else None,
            "dry_run": self.dry_run,
            "rate": self.rate,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RunOptions:
        data = data or {}
        w = data.get("window")
        return cls(
            tuple(data.get("resend") or ()),
            data.get("in_doubt") or "skip",
            (int(w[0]), int(w[1])) if w else None,
            bool(data.get("dry_run")),
            data.get("rate"),
        )


@contextlib.contextmanager
def _ledger(run: RunDir, cfg: MailpipeConfig) -> Iterator[Ledger]:
    """The ledger this run writes to, its store closed after use."""
    from pipeline.ledger import open_ledger  # SQLAlchemy: imported when a run needs the store

    # a dry run reads the ledger (what was sent stays unsent) but its writes are rolled back
    dry = RunOptions.from_json(run.manifest().get("options")).dry_run
    ledger = open_ledger(cfg.store.url, run.run_id, dry_run=dry)
    try:
        yield ledger
    finally:
        ledger.close()


def _normalizer(
    run: RunDir, cfg: MailpipeConfig, name: str, refs: Sequence[InputRef], ledger: Ledger | None
) -> Normalizer:
    opts = RunOptions.from_json(run.manifest().get("options"))
    window = Window(*opts.window) if opts.window else None
    return Normalizer(
        cfg.plan(name),
        refs,
        ledger=ledger,
        resend=name in opts.resend,
        window=window,
        scratch=run.path,
    )


# -- starting a run -------------------------------------------------------------


def start_run(
    cfg: MailpipeConfig,
    jobs: Sequence[str] | None = None,
    inputs: Sequence[str] = (),
    out: str | None = None,
    run_id: str | None = None,
    options: RunOptions | None = None,
) -> RunDir:
    """Create the run directory: the config it runs with, its jobs and input files."""
    names = list(jobs) if jobs else [n for n, j in cfg.jobs.items() if j.enabled]
    for name in names:
        if name not in cfg.jobs:
            raise ConfigError("--job", f"no job {name!r}; choose from {', '.join(cfg.jobs)}")
    if not names:
        raise ConfigError("jobs", "no enabled job to run; pass --job NAME or set enabled = true")
    sources = list(dict.fromkeys(cfg.jobs[n].source for n in names))
    files = _assign_inputs(cfg, sources, list(inputs))
    run = RunDir.create(out or cfg.run.out, run_id)
    run.write_json(
        "stages/config.json",
        cfg.model_dump(mode="json", exclude={"path"}, exclude_unset=True),
        private=False,
    )
    entries: list[dict[str, Any]] = []
    for src in sources:
        for path in files[src]:
            entries.append({"id": len(entries), "source": src, "path": path})
    run.write_manifest(
        {
            "run_id": run.run_id,
            "mailpipe": __version__,
            "created": now_iso(),
            "config": {"path": cfg.path, "digest": cfg.digest()},
            "mode": cfg.delivery.mode,
            "jobs": names,
            "inputs": entries,
            "stages": {s: {"state": "pending"} for s in STAGES},
            "counts": {},
            "options": (options or RunOptions()).to_json(),
        }
    )
    return run


def sources_for_name(
    cfg: MailpipeConfig, name: str, sources: Sequence[str] | None = None
) -> list[str]:
    """The sources (of ``sources``, default all) whose path glob's file-name part matches."""
    names = cfg.sources if sources is None else sources
    return [s for s in names if fnmatch.fnmatch(name, os.path.basename(cfg.sources[s].path))]


def _assign_inputs(
    cfg: MailpipeConfig, sources: list[str], inputs: list[str]
) -> dict[str, list[str]]:
    """Files per source: the glob, or the files given on the command line."""
    if not inputs:
        return {s: expand_inputs(cfg.sources[s].path) for s in sources}
    if len(sources) == 1:
        return {sources[0]: inputs}
    out: dict[str, list[str]] = {s: [] for s in sources}
    for path in inputs:
        hits = sources_for_name(cfg, os.path.basename(path), sources)
        if len(hits) != 1:
            raise ConfigError(
                "INPUT",
                f"cannot tell which source {path!r} feeds "
                f"({', '.join(sources)}); pass --job to pick the jobs of one source",
            )
        out[hits[0]].append(path)
    return out


def open_run(
    path: str | os.PathLike[str],
    cfg: MailpipeConfig | None = None,
    env: dict[str, str] | None = None,
) -> tuple[RunDir, MailpipeConfig]:
    """Reopen a run directory with the config it was started with (or ``cfg``)."""
    run = RunDir(path)
    run.manifest()
    if cfg is None:
        snap = orjson.loads(run.file("stages/config.json").read_bytes())
        cfg = parse_config(
            snap, env=env or dict(os.environ), path=str(run.file("stages/config.json"))
        )
    return run, cfg


# -- stages --------------------------------------------------------------------------


def run_stage(run: RunDir, cfg: MailpipeConfig, stage: str, progress: Progress = _noop) -> Any:
    """Run one stage on a run directory, recording its state and timing."""
    fn = _STAGE_FUNCS[stage]
    if stage != "extract":
        run.require(STAGES[STAGES.index(stage) - 1])
    manifest = run.manifest()
    manifest["stages"][stage] = {"state": "running", "started": now_iso()}
    run.write_manifest(manifest)
    t0 = time.perf_counter()
    try:
        result = fn(run, cfg, progress)
    except BaseException as e:
        manifest = run.manifest()
        manifest["stages"][stage].update(state="failed", error=str(e)[:500])
        run.write_manifest(manifest)
        raise
    manifest = run.manifest()
    manifest["stages"][stage].update(
        state="completed", finished=now_iso(), seconds=round(time.perf_counter() - t0, 3)
    )
    for later in STAGES[STAGES.index(stage) + 1 :]:
        manifest["stages"][later] = {"state": "pending"}
    run.write_manifest(manifest)
    return result


def _sources_of(manifest: dict[str, Any], cfg: MailpipeConfig) -> dict[str, list[dict[str, Any]]]:
    """The run's sources in job order, each with its input entries."""
    out: dict[str, list[dict[str, Any]]] = {cfg.jobs[j].source: [] for j in manifest["jobs"]}
    for entry in manifest["inputs"]:
        out.setdefault(entry["source"], []).append(entry)
    return out


def _extracted(
    run: RunDir,
    cfg: MailpipeConfig,
    src: str,
    entries: list[dict[str, Any]],
    progress: Progress,
    digest: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Extract one source's files into its stage file, yielding the batches as they come.

    Each entry gets its file's stats (rows, rejects, sha256, error).
    """
    source = cfg.sources[src]
    with run.stage_writer("extract", src, extracted_schema(source)) as out:
        for entry in entries:
            stats = FileStats(entry["path"])
            try:
                for batch in extract_file(entry["path"], entry["id"], source, stats, digest=digest):
                    out.write_batch(batch)
                    progress("extract", batch.num_rows)
                    yield batch
            except InputFileError as e:
                stats.error = e.message
            except (OSError, ValueError) as e:  # a file that breaks mid-way
                stats.error = f"{entry['path']}: could not be read to the end ({e})"
            entry.update(
                format=stats.format,
                sha256=stats.sha256 or entry.get("sha256"),
                bytes=stats.bytes,
                rows=stats.rows,
                rejects=stats.rejects,
                blank_lines=stats.blank_lines,
                error=stats.error,
            )


def _extract(run: RunDir, cfg: MailpipeConfig, progress: Progress) -> None:
    manifest = run.manifest()
    for src, entries in _sources_of(manifest, cfg).items():
        for _ in _extracted(run, cfg, src, entries, progress):
            pass
    run.update_manifest(inputs=manifest["inputs"])


class _NormalizeStep:
    """Normalize one job's batches into its stage file, passing them on."""

    def __init__(
        self, norm: Normalizer, out: pa.ipc.RecordBatchStreamWriter, progress: Progress
    ) -> None:
        self.norm, self.out, self.progress = norm, out, progress

    def _emit(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            self.out.write_batch(b)
            self.progress("normalize", b.num_rows)
            yield b

    def feed(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        return self._emit(self.norm.feed(batch))

    def finish(self) -> Iterator[pa.RecordBatch]:
        return self._emit(self.norm.finish())


def _normalize(run: RunDir, cfg: MailpipeConfig, progress: Progress) -> None:
    manifest = run.manifest()
    refs = _input_refs(manifest["inputs"])
    detail = manifest.setdefault("counts", {}).setdefault("jobs", {})
    with _ledger(run, cfg) as ledger:
        for name in manifest["jobs"]:
            plan = cfg.plan(name)
            norm = _normalizer(run, cfg, name, refs, ledger)
            with run.stage_writer("normalize", name, norm.schema) as out:
                step = _NormalizeStep(norm, out, progress)
                for batch in run.stage_reader("extract", plan.source_name):
                    for _ in step.feed(batch):
                        pass
                for _ in step.finish():
                    pass
            detail[name] = {"recipients": norm.recipients}
    run.update_manifest(counts=manifest["counts"])


def _input_refs(inputs: list[dict[str, Any]]) -> list[InputRef]:
    """Inputs with, for each, the first earlier input of the same source and bytes."""
    first: dict[tuple[str, str], int] = {}
    refs: list[InputRef] = []
    for entry in inputs:
        key = (entry["source"], entry.get("sha256") or f"unread:{entry['id']}")
        same = first.setdefault(key, entry["id"])
        refs.append(
            InputRef(entry["path"], None if same == entry["id"] else same, entry.get("sha256"))
        )
    return refs


def _build(run: RunDir, cfg: MailpipeConfig, progress: Progress) -> None:
    manifest = run.manifest()
    counter = BatchCounter()
    detail = manifest.setdefault("counts", {}).setdefault("jobs", {})
    for name in manifest["jobs"]:
        counts = build_job(run, cfg.plan(name), counter, cfg.delivery.http)
        detail.setdefault(name, {}).update(counts)
        progress("build", counts["recipients"])
    run.update_manifest(counts=manifest["counts"])


def _build_stages_together(run: RunDir, cfg: MailpipeConfig, progress: Progress) -> None:
    """extract, normalize and build, each in its own thread, job after job.

    The first job of a source reads the files as they are extracted; a later
    job of the same source reads the extract stage file. Every stage file and
    the manifest end up as if the stages had run one after the other.
    """
    manifest = run.manifest()
    for stage in ("extract", "normalize", "build"):
        manifest["stages"][stage] = {"state": "running", "started": now_iso()}
    run.write_manifest(manifest)
    t0 = time.perf_counter()
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    digests = hashing.submit(_hash_inputs, [dict(e) for e in manifest["inputs"]])
    refs = _LazyRefs(manifest["inputs"], digests)
    sources = _sources_of(manifest, cfg)
    counter = BatchCounter()
    detail = manifest.setdefault("counts", {}).setdefault("jobs", {})
    done: set[str] = set()
    try:
        with _ledger(run, cfg) as ledger:
            for name in manifest["jobs"]:
                plan = cfg.plan(name)
                src = plan.source_name
                if src in done:
                    feed: Iterator[pa.RecordBatch] = iter(run.stage_reader("extract", src))
                else:
                    feed = _extracted(run, cfg, src, sources[src], progress, digest=False)
                    done.add(src)
                norm = _normalizer(run, cfg, name, refs, ledger)
                with (
                    run.stage_writer("normalize", name, norm.schema) as nout,
                    run.stage_writer("build", name, BUILD_SCHEMA) as bout,
                ):
                    job = JobBuild(run, plan, counter, bout, cfg.delivery.http)
                    run_chain(feed, [_NormalizeStep(norm, nout, progress), job])
                detail[name] = {"recipients": norm.recipients, **job.counts}
                progress("build", job.counts["recipients"])
    except BaseException as e:
        for stage in ("extract", "normalize", "build"):
            manifest["stages"][stage].update(state="failed", error=str(e)[:500])
        run.write_manifest(manifest)
        raise
    hashed = digests.result()
    hashing.shutdown()
    for entry in manifest["inputs"]:
        entry["sha256"] = entry.get("sha256") or hashed.get(entry["id"])
    seconds = round(time.perf_counter() - t0, 3)
    for stage in ("extract", "normalize", "build"):
        manifest["stages"][stage].update(
            state="completed", finished=now_iso(), seconds=seconds, together=True
        )
    run.write_manifest(manifest)


class _LazyRefs(Sequence[InputRef]):
    """Input refs whose ``same_as`` waits for the files' digests only when it can matter.

    A source read from one file cannot repeat a file, so its rows go on at
    once; with several files, normalize waits for the hashing thread.
    """

    def __init__(self, inputs: list[dict[str, Any]], digests: Future[dict[int, str]]) -> None:
        self._inputs = inputs
        self._digests = digests
        self._refs: list[InputRef] | None = None
        per_source: dict[str, int] = {}
        for e in inputs:
            per_source[e["source"]] = per_source.get(e["source"], 0) + 1
        self._alone = {e["id"] for e in inputs if per_source[e["source"]] == 1}

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, int) and i in self._alone:
            return InputRef(
                self._inputs[i]["path"], digest_of=lambda: self._digests.result().get(i)
            )
        if self._refs is None:
            hashed = self._digests.result()
            self._refs = _input_refs([{**e, "sha256": hashed.get(e["id"])} for e in self._inputs])
        return self._refs[i]


def _hash_inputs(inputs: list[dict[str, Any]]) -> dict[int, str]:
    """sha256 of every input that exists (hashlib releases the GIL: a thread of its own)."""
    out: dict[int, str] = {}
    for entry in inputs:
        try:
            out[entry["id"]] = file_sha256(entry["path"])
        except OSError:
            continue
    return out


def _deliver(run: RunDir, cfg: MailpipeConfig, progress: Progress) -> None:
    from pipeline.deliver.runner import deliver_job

    manifest = run.manifest()
    opts = RunOptions.from_json(manifest.get("options"))
    if opts.dry_run:
        cfg = cfg.model_copy(
            update={"delivery": cfg.delivery.model_copy(update={"mode": "simulate"})}
        )
    with _ledger(run, cfg) as ledger:
        for name in manifest["jobs"]:
            deliver_job(
                run,
                cfg,
                cfg.plan(name),
                progress,
                ledger=ledger,
                resend=name in opts.resend,
                dry_run=opts.dry_run,
                rate=opts.rate,
            )
    run.update_manifest(mode=cfg.delivery.mode)


def _report(run: RunDir, cfg: MailpipeConfig, progress: Progress) -> dict[str, Any]:
    manifest = run.manifest()
    writer = ReportWriter(run, [e["path"] for e in manifest["inputs"]])
    for name in manifest["jobs"]:
        counts = writer.add_job(cfg.plan(name))
        progress("report", counts["rows"])
    summary = writer.close()
    if manifest.get("in_doubt"):
        summary["in_doubt"] = manifest["in_doubt"]
    summary["inputs"] = [
        {k: e.get(k) for k in ("path", "rows", "rejects", "error")} for e in manifest["inputs"]
    ]
    run.write_json("summary.json", summary, private=False)
    manifest = run.manifest()
    manifest["counts"].update(rows=summary["rows"], **summary["status"])
    run.write_manifest(manifest)
    return summary


_STAGE_FUNCS: dict[str, Callable[[RunDir, MailpipeConfig, Progress], Any]] = {
    "extract": _extract,
    "normalize": _normalize,
    "build": _build,
    "deliver": _deliver,
    "report": _report,
}


def run_pipeline(
    cfg: MailpipeConfig,
    jobs: Sequence[str] | None = None,
    inputs: Sequence[str] = (),
    out: str | None = None,
    until: str = "report",
    progress: Progress = _noop,
    options: RunOptions | None = None,
    run_id: str | None = None,
    locked: bool = False,
) -> RunOutcome:
    """Create a run directory and run the stages up to ``until``.

    On a SQLite store only one run goes at a time (a second one raises
    :class:`~pipeline.lock.LockHeld` at once; ``locked``: the caller holds the
    store lock already). Records a crashed run left in doubt are resolved
    before anything else.
    """
    from pipeline.lock import RunLock, store_lock_path

    for path in inputs:
        if not Path(path).exists():
            raise ConfigError("INPUT", f"{path}: no such file")
    if cfg.delivery.mode == "smtp" and STAGES.index(until) >= STAGES.index("deliver"):
        _check_templates(cfg, jobs)
    options = options or RunOptions()
    lock_path = store_lock_path(cfg.store.url)
    lock = RunLock(lock_path) if lock_path and not options.dry_run and not locked else None
    if lock is not None:
        lock.acquire(run_id or "starting")
    try:
        run = start_run(cfg, jobs, inputs, out, run_id=run_id, options=options)
        return _run_stages(run, cfg, until, progress)
    finally:
        if lock is not None:
            lock.release()


def _check_templates(cfg: MailpipeConfig, jobs: Sequence[str] | None) -> None:
    """smtp mode: every job of the run has a usable template before anything is sent."""
    from pipeline.mail.templates import template_problems

    names = {f"jobs.{n}.template" for n in (jobs or [n for n, j in cfg.jobs.items() if j.enabled])}
    problems = [p for p in template_problems(cfg) if p.key in names]
    if problems:
        raise problems[0]


def _run_stages(run: RunDir, cfg: MailpipeConfig, until: str, progress: Progress) -> RunOutcome:
    summary: dict[str, Any] = {}
    stages = list(STAGES[: STAGES.index(until) + 1])
    with _ledger(run, cfg) as ledger:
        ledger.start()
        doubt = resolve_in_doubt(run, cfg, ledger)
        if doubt:
            run.update_manifest(in_doubt=doubt)
        try:
            if stages[:3] == ["extract", "normalize", "build"]:
                _build_stages_together(run, cfg, progress)
                stages = stages[3:]
                release_memory()
            for stage in stages:
                result = run_stage(run, cfg, stage, progress)
                release_memory()
                if stage == "report":
                    summary = result
        finally:
            ledger.stop()
    if not summary:
        summary = {
            "run_id": run.run_id,
            "status": {},
            "inputs": [
                {k: e.get(k) for k in ("path", "rows", "rejects", "error")}
                for e in run.manifest()["inputs"]
            ],
        }
    return RunOutcome(run, summary)


def resolve_in_doubt(run: RunDir, cfg: MailpipeConfig, ledger: Ledger) -> dict[str, Any]:
    """Settle the records a stopped run left pending, before this run sends anything.

    In simulate mode the engine's own log says what it processed (what it did
    not process is sent now); otherwise the run's ``in_doubt`` policy decides:
    ``skip`` leaves them unsent (reported ``ignored``), ``resend`` sends them
    again. Returns the counts per job.
    """
    opts = RunOptions.from_json(run.manifest().get("options"))
    found: dict[str, Any] = {}
    for job in run.manifest()["jobs"]:
        doubts = ledger.in_doubt(job)
        if not doubts:
            continue
        keys = [k for k, _, _ in doubts]
        asked = cfg.delivery.mode == "simulate"  # the simulated platform keeps a log
        answers = ledger.platform_answers(job, keys) if asked else {}
        decided = {
            k: ("failed" if a.get("status") == "failed" else "completed", False, a)
            for k, a in answers.items()
        }
        rest = [k for k in keys if k not in answers]
        # asked, and the platform does not know them: certainly not sent, so send them now
        resent = rest if asked or opts.in_doubt == "resend" else []
        skipped = [] if asked or opts.in_doubt == "resend" else rest
        ledger.settle_doubt(job, {k: r for k, r, _ in doubts}, decided, skipped, resent)
        found[job] = {
            "found": len(keys),
            "answered_by_platform": len(decided),
            "skipped": len(skipped),
            "resent": len(resent),
            "runs": sorted({r for _, r, _ in doubts}),
        }
        log.warning("in doubt", extra={"job": job, **found[job]})
    return found


def outcome_of(run: RunDir) -> RunOutcome:
    """The outcome recorded in a finished run directory."""
    try:
        summary = orjson.loads(run.file("summary.json").read_bytes())
    except FileNotFoundError:
        raise RunDirError(
            f"{run.path}: no summary.json yet; run `mailpipe report {run.path}`"
        ) from None
    return RunOutcome(run, summary)
