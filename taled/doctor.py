"""Integrity checks, repairs and backups of tale's data (``tale doctor``).

    python -m taled.doctor [--repair] [--json]      (what ``tale doctor`` runs)

What is checked, and what ``--repair`` does about it:

    the database        <data>/tale.db: ``PRAGMA quick_check``. Repair: move it aside
                        (``tale.db.damaged-<time>``, with its -wal and -shm; never
                        deleted) and put the newest backup that passes the same check
                        in its place. Without such a backup nothing is changed.
    full-text indexes   the FTS5 tables (``task_memory``): FTS5's own integrity check.
                        Repair: rebuild the index from the rows it indexes (derived
                        data: nothing is lost). Needs the daemon stopped.
    checkpoints         every ref under ``refs/tale/`` in <data>/checkpoints.git names a
                        commit whose state is readable, along its whole history. Repair:
                        move the ref back to its newest readable checkpoint, or drop it
                        when none is; what a ref held is logged in <data>/doctor.log.
    backups             <data>/backups/tale-<time>.db: listed, each with its own check.

The daemon runs the first three at start-up (``store.check_on_start``): a damaged
database or checkpoint ref stops it with one line naming the file and this command;
a damaged full-text index is rebuilt there and then. It also keeps the rolling
backups (``take_backup``; ``store.backup_interval_minutes``, ``store.backups_keep``).

Repairs need the daemon stopped (it holds these files open); checking does not.
Exit codes: 0 healthy (or everything repaired), 1 problems remain, 2 bad usage
(``--repair`` while the daemon runs).
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import fcntl
import filecmp
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from taled import paths
from taled.checkpoints.repo import CheckpointStore, RefDamage
from taled.errors import CheckpointDamaged, DaemonError, StoreDamaged, TaleError
from taled.text import count

__all__ = [
    "BACKUP_GLOB",
    "Kind",
    "Problem",
    "Report",
    "backups",
    "check_checkpoints_on_start",
    "check_database",
    "check_fts",
    "check_store_on_start",
    "diagnose",
    "is_damage",
    "main",
    "rebuild_fts",
    "replace_backups",
    "restore_database",
    "take_backup",
]

BACKUP_GLOB = "tale-*.db"
DOCTOR_HINT = "run `tale doctor` (with the daemon stopped, `tale doctor --repair` repairs it)"

EXIT_HEALTHY = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

# Primary result codes that mean the file itself is damaged (not busy, full or locked).
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class Kind(StrEnum):
    """What a problem is about."""

    DATABASE = "database"
    FULL_TEXT = "full_text_index"
    CHECKPOINTS = "checkpoints"


@dataclass
class Problem:
    """One thing found wrong: where, what, and what ``--repair`` does (or did) about it."""

    kind: Kind
    where: str
    """The file, or the table or ref inside it."""
    what: str
    repair: str
    """What ``--repair`` does; when it cannot, what to do by hand."""
    repaired: str | None = None
    """What ``--repair`` did (None: not repaired)."""


@dataclass
class Report:
    """What ``tale doctor`` found and did."""

    data_dir: str
    daemon_pid: int | None
    checked: list[str] = field(default_factory=list)
    """One line per check that ran, with its result."""
    problems: list[Problem] = field(default_factory=list)
    backups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(p.repaired is not None for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, **asdict(self)}


# -- the database ----------------------------------------------------------------


def sqlite_code(exc: BaseException) -> int | None:
    """SQLite's primary result code behind a sqlite3 error (SQLITE_BUSY, SQLITE_FULL, ...),
    or None for an error SQLite did not report (one the sqlite3 module raises itself,
    such as using a closed connection). Decisions go by this code, never by the
    message's wording."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.Error) or not isinstance(code, int):
        return None
    # The extended code carries the primary one in its low byte.
    return code & 0xFF


def is_damage(exc: BaseException) -> bool:
    """Whether a sqlite3 error says the database file is damaged (not busy, full, locked)."""
    return isinstance(exc, sqlite3.DatabaseError) and sqlite_code(exc) in _DAMAGE_CODES


@contextlib.contextmanager
def _connect(path: Path, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
    """A stdlib connection in autocommit mode; ``read_only`` beside a running daemon."""
    uri = path.resolve().as_uri() + ("?mode=ro" if read_only else "?mode=rw")
    conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def check_database(path: Path, *, read_only: bool = False) -> str | None:
    """What is wrong with the SQLite file at ``path``; None when nothing is (or it is absent).

    Damage is a failing ``PRAGMA quick_check``, or an error saying the file is
    malformed or not a database; any other sqlite3.Error (permissions, a lock held
    too long) is raised, since it says nothing about the file's content.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        # SQLite would take an empty file for a new, empty database.
        return "is empty (0 bytes): it was truncated"
    try:
        with _connect(path, read_only=read_only) as conn:
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            return f"is damaged: {exc} (PRAGMA quick_check)"
        raise
    if rows == ["ok"]:
        return None
    more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
    return f"is damaged: PRAGMA quick_check says {'; '.join(rows[:3])}{more}"


def _fts_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' "
        "AND lower(sql) LIKE 'create virtual table%using fts5%' ORDER BY name"
    )
    return [str(r[0]) for r in rows]


def check_fts(path: Path) -> list[str]:
    """The FTS5 tables whose index fails FTS5's integrity check (needs write access)."""
    damaged = []
    with _connect(path) as conn:
        for table in _fts_tables(conn):
            try:
                # A "command" insert: it checks, and writes nothing.
                conn.execute(f'INSERT INTO "{table}"("{table}") VALUES (\'integrity-check\')')
            except sqlite3.DatabaseError as exc:
                if not is_damage(exc):
                    raise
                damaged.append(table)
    return damaged


def rebuild_fts(path: Path, table: str) -> None:
    """Rebuild one FTS5 table's index from the rows it holds."""
    with _connect(path) as conn:
        conn.execute(f'INSERT INTO "{table}"("{table}") VALUES (\'rebuild\')')


def _damage_message(path: Path, what: str) -> str:
    return f"the database {path} {what}; {DOCTOR_HINT}"


def check_store_on_start(path: Path) -> list[str]:
    """Start-up's check of the database; returns the full-text indexes it rebuilt.

    StoreDamaged when it fails ``quick_check`` (the message names the file, what
    is wrong and ``tale doctor``); DaemonError when it cannot be opened at all. A
    damaged full-text index is rebuilt at once: it is derived from other rows.
    """
    try:
        what = check_database(path)
        if what is not None:
            raise StoreDamaged(_damage_message(path, what))
        if not path.exists():
            return []
        rebuilt = check_fts(path)
        for table in rebuilt:
            rebuild_fts(path, table)
    except sqlite3.Error as exc:
        if is_damage(exc):
            raise StoreDamaged(_damage_message(path, f"is damaged: {exc}")) from None
        raise DaemonError(f"cannot open the database {path}: {exc}") from None
    return rebuilt


async def check_checkpoints_on_start(checkpoints: CheckpointStore) -> None:
    """Start-up's check of the checkpoint refs (heads only); CheckpointDamaged naming them."""
    damaged = await checkpoints.verify()
    if not damaged:
        return
    first = damaged[0]
    more = (
        f" (and {count(len(damaged) - 1, 'more damaged ref', 'more damaged refs')})"
        if len(damaged) > 1
        else ""
    )
    raise CheckpointDamaged(
        f"the checkpoint repository {checkpoints.path} is damaged: ref {first.ref} "
        f"{first.problem}{more}; {DOCTOR_HINT}"
    )


# -- backups ----------------------------------------------------------------------


def backups(directory: Path) -> list[Path]:
    """The backups in ``directory``, newest first (their names sort by time)."""
    return sorted(directory.glob(BACKUP_GLOB), reverse=True)


def _changed_ns(db: Path) -> int:
    """When the database (or its write-ahead log) last changed, in nanoseconds."""
    stamps = [db.stat().st_mtime_ns]
    with contextlib.suppress(FileNotFoundError):
        stamps.append(Path(f"{db}-wal").stat().st_mtime_ns)
    return max(stamps)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp(at: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))


def take_backup(db: Path, directory: Path, keep: int, *, force: bool = False) -> Path | None:
    """Back ``db`` up into ``directory`` and keep the newest ``keep``; None when unchanged
    (``force``: taken even so).

    Uses SQLite's backup API in one step: under WAL that is one read snapshot, so
    the daemon's writer never waits for it. The copy is written 0600 under a
    temporary name, checked (quick_check), fsynced and renamed. Its mtime is the
    source's when the copy began: a source not modified since is not copied again,
    and a copy identical to the newest backup (a daemon started and stopped without
    doing anything still touches the file) is dropped, so idle restarts never rotate
    backups out. A copy that fails its check is discarded (StoreDamaged), so good
    backups are never rotated out by a bad one either.
    """
    if not db.exists():
        return None
    changed = _changed_ns(db)
    existing = [] if force else backups(directory)
    if existing and existing[0].stat().st_mtime_ns >= changed:
        return None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in directory.glob(".tale-*.tmp"):  # left by a crash mid-backup
        stale.unlink(missing_ok=True)
    # Milliseconds in the name: two backups in one second must not replace each other.
    now = time.time()
    final = directory / f"tale-{_stamp(now).removesuffix('Z')}.{int(now % 1 * 1000):03d}Z.db"
    tmp = directory / f".{final.name}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        with _connect(db) as source, _connect(tmp) as target:
            source.backup(target)
        if existing and filecmp.cmp(tmp, existing[0], shallow=False):
            tmp.unlink()
            os.utime(existing[0], ns=(changed, changed))
            return None
        what = check_database(tmp)
        if what is not None:
            raise StoreDamaged(
                f"the backup of {db} {what}, so it was not kept: the database itself is "
                f"likely damaged; {DOCTOR_HINT}"
            )
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.utime(tmp, ns=(changed, changed))
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
        raise
    for old in backups(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def replace_backups(db: Path, directory: Path, *, take: bool) -> Path | None:
    """Replace every backup in ``directory`` by one fresh backup of ``db`` (``take``), or
    by none (backups are off): after a task is forgotten, the older ones still hold it.

    The older backups go only once the fresh one is written and has passed its check; a
    fresh one that fails it (StoreDamaged) leaves them, as a damaged database needs them.
    """
    fresh = take_backup(db, directory, 1, force=True) if take else None
    for old in backups(directory):
        if old != fresh:
            old.unlink(missing_ok=True)
    return fresh


def restore_database(db: Path, directory: Path) -> tuple[Path, Path] | None:
    """Put the newest backup that passes quick_check in ``db``'s place (daemon stopped).

    The damaged file, with its -wal and -shm (a stale log must never be replayed
    onto the restored file), moves to ``<db>.damaged-<time>``. Returns (the backup
    used, where the damaged file went), or None when no backup passes.
    """
    good = next((b for b in backups(directory) if check_database(b) is None), None)
    if good is None:
        return None
    aside = db.with_name(f"{db.name}.damaged-{_stamp()}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{db}{suffix}", f"{aside}{suffix}")
    tmp = db.with_name(f".{db.name}.restoring")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    shutil.copyfile(good, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, db)
    _fsync_dir(db.parent)
    return good, aside


def _backup_entries(directory: Path) -> list[dict[str, Any]]:
    entries = []
    for path in backups(directory):
        # Opened read-write: no one else writes a backup, and a read-only connection
        # would leave its -wal and -shm files behind.
        try:
            info = path.stat()
            what = check_database(path)
        except FileNotFoundError:
            continue  # rotated out by the daemon meanwhile
        except sqlite3.Error as exc:
            what = f"cannot be opened: {exc}"
        entries.append(
            {
                "path": str(path),
                "bytes": info.st_size,
                "taken_at": _taken_at(path, info.st_mtime),
                "ok": what is None,
                "problem": what,
            }
        )
    return entries


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _local(iso: str) -> str:
    """A UTC time of ours as a person reads it, in this machine's zone (as the CLI
    prints times): ``2026-12-05 00:08:54 CET``."""
    at = calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(at))


def _taken_at(path: Path, fallback: float) -> str:
    """When a backup was taken: its name says (its mtime is the database's then)."""
    # tale-20261204T230854.123Z (or, before milliseconds, tale-20261204T230854Z)
    stamp = path.stem.removeprefix("tale-").removesuffix("Z").split(".")[0]
    try:
        at = float(calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S")))
    except ValueError:
        at = fallback
    return _iso(at)


# -- the doctor -------------------------------------------------------------------


class _Refused(Exception):
    """``--repair`` cannot run now; the message says why (exit code 2)."""


def _daemon_pid(lock: Path) -> int | None:
    """The pid of the daemon holding the socket's lock, or None when none holds it."""
    try:
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            return None
    except OSError:
        return None


@contextlib.contextmanager
def _daemon_excluded(lock: Path) -> Iterator[None]:
    """Hold the daemon's lock, so no daemon starts while files are repaired."""
    lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(lock, "ab") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _daemon_pid(lock)
            raise _Refused(
                f"taled is running{f' (pid {pid})' if pid and pid > 0 else ''}; repairs need it "
                "stopped: tale daemon stop, then tale doctor --repair"
            ) from None
        # No daemon is alive: the pid in it is stale, and must not be signalled
        # (`tale daemon stop`) while we hold the lock.
        f.truncate(0)
        yield


async def diagnose(data: Path, *, repair: bool, daemon_pid: int | None) -> Report:
    """Check everything under ``data`` and, if ``repair``, repair what can be repaired."""
    report = Report(data_dir=str(data), daemon_pid=daemon_pid)
    read_only = daemon_pid is not None
    db, repo, saved = data / "tale.db", data / "checkpoints.git", data / "backups"

    report.backups = await anyio.to_thread.run_sync(_backup_entries, saved)
    good = next((b for b in report.backups if b["ok"]), None)
    report.checked.append(
        f"backups      {saved}: {len(report.backups)}"
        + (f", newest good one taken {_local(good['taken_at'])}" if good else ", none good")
    )

    db_ok = await _check_database(report, db, saved, good, read_only=read_only, repair=repair)
    if db_ok and db.exists():
        if read_only:
            report.checked.append("full-text    not checked while the daemon runs")
        else:
            await _check_fts(report, db, repair=repair)
    await _check_checkpoints(report, repo, data, read_only=read_only, repair=repair)
    return report


async def _check_database(
    report: Report,
    db: Path,
    saved: Path,
    good: dict[str, Any] | None,
    *,
    read_only: bool,
    repair: bool,
) -> bool:
    try:
        what = await anyio.to_thread.run_sync(lambda: check_database(db, read_only=read_only))
    except sqlite3.Error as exc:
        report.problems.append(
            Problem(Kind.DATABASE, str(db), f"cannot be opened: {exc}", "fix what the error says")
        )
        return False
    if what is None:
        report.checked.append(f"database     {db}: {'ok' if db.exists() else 'none yet'}")
        return True
    if good is not None:
        fix = (
            f"move it aside and restore the newest good backup, {good['path']} "
            f"(taken {_local(good['taken_at'])}; changes made after it are lost)"
        )
    else:
        fix = (
            "none: no backup passes the check. Move it away to start afresh (the daemon "
            "creates an empty database); sqlite3's .recover may salvage its rows: "
            f"sqlite3 {db} .recover | sqlite3 recovered.db"
        )
    problem = Problem(Kind.DATABASE, str(db), what, fix)
    report.problems.append(problem)
    if repair and good is not None:
        done = await anyio.to_thread.run_sync(lambda: restore_database(db, saved))
        if done is not None:
            used, aside = done
            problem.repaired = f"restored from {used}; the damaged file is kept as {aside}"
            return True
    return False


async def _check_fts(report: Report, db: Path, *, repair: bool) -> None:
    try:
        damaged = await anyio.to_thread.run_sync(lambda: check_fts(db))
    except sqlite3.Error as exc:
        report.problems.append(
            Problem(Kind.FULL_TEXT, str(db), f"cannot be checked: {exc}", "fix what it says")
        )
        return
    if not damaged:
        report.checked.append("full-text    ok")
    for table in damaged:
        problem = Problem(
            Kind.FULL_TEXT,
            f"{db} (table {table})",
            "its full-text index fails FTS5's integrity check",
            "rebuild the index from the rows it indexes (nothing is lost)",
        )
        report.problems.append(problem)
        if repair:
            await anyio.to_thread.run_sync(rebuild_fts, db, table)
            problem.repaired = "rebuilt"


async def _check_checkpoints(
    report: Report, repo: Path, data: Path, *, read_only: bool, repair: bool
) -> None:
    if not repo.exists():
        report.checked.append(f"checkpoints  {repo}: none yet")
        return
    store = CheckpointStore(repo)
    try:
        await store.open(read_only=read_only or not repair)
    except DaemonError as exc:
        fix = "move it away (the daemon makes a new one; unfinished tasks start over)"
        report.problems.append(Problem(Kind.CHECKPOINTS, str(repo), exc.message, fix))
        return
    try:
        damaged = await store.verify(deep=True)
        if not damaged:
            refs = count(len(await store.task_ids()), "task ref", "task refs")
            report.checked.append(f"checkpoints  {repo}: {refs} ok")
        for damage in damaged:
            problem = Problem(
                Kind.CHECKPOINTS,
                f"{repo} ({damage.ref})",
                f"the ref {damage.problem}",
                _ref_fix(damage),
            )
            report.problems.append(problem)
            if repair:
                done = await store.repair(damage)
                _log(data, f"{damage.ref} {damage.problem}; {done}")
                problem.repaired = done
    finally:
        await store.close()


def _ref_fix(damage: RefDamage) -> str:
    if not damage.keeps:
        return "drop the ref (its task, if unfinished, starts over); logged in doctor.log"
    return (
        f"move the ref back to its newest readable checkpoint, keeping {damage.keeps}; "
        "logged in doctor.log"
    )


def _log(data: Path, line: str) -> None:
    """Append a line to <data>/doctor.log: what a repair changed, so it can be undone."""
    fd = os.open(data / "doctor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{_iso(time.time())} {line}\n")


def _render(report: Report, repair: bool) -> str:
    lines = list(report.checked)
    for p in report.problems:
        lines.append(f"PROBLEM      {p.kind.value} {p.where}: {p.what}")
        if p.repaired is not None:
            lines.append(f"  repaired   {p.repaired}")
        else:
            lines.append(f"  repair     {p.repair}")
    left = [p for p in report.problems if p.repaired is None]
    problems = count(len(left), "problem", "problems")
    if not report.problems:
        lines.append("healthy")
    elif not left:
        repaired = count(len(report.problems), "problem", "problems")
        lines.append(f"repaired {repaired}; taled can start")
    elif repair:
        lines.append(f"{problems} not repaired; see above")
    else:
        stop = " (stop the daemon first: tale daemon stop)" if report.daemon_pid else ""
        lines.append(f"{problems}; repair with: tale doctor --repair{stop}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m taled.doctor``: check (and repair) the data; the exit code says how it went."""
    parser = argparse.ArgumentParser(
        prog="tale doctor", description="Check tale's data and repair what can be repaired."
    )
    parser.add_argument("--repair", action="store_true", help="repair (the daemon must be stopped)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    try:
        data, lock = paths.data_dir(), paths.lock_file()
    except ValueError as exc:
        print(f"tale doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.repair:
            with _daemon_excluded(lock):
                report = anyio.run(lambda: diagnose(data, repair=True, daemon_pid=None))
        else:
            pid = _daemon_pid(lock)
            report = anyio.run(lambda: diagnose(data, repair=False, daemon_pid=pid))
    except _Refused as exc:
        print(f"tale doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TaleError, OSError) as exc:
        message = exc.message if isinstance(exc, TaleError) else str(exc)
        print(f"tale doctor: {message}", file=sys.stderr)
        return EXIT_PROBLEMS
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_render(report, args.repair))
    return EXIT_HEALTHY if report.healthy else EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
