"""Damaged data: start-up names the file and `tale doctor`; the doctor checks and repairs.

Every test starts from a copy of one seeded home (a real daemon ran three tasks in it
and stopped cleanly, backing its database up), then damages the copy the same way
every run: a truncation, seeded byte flips in one table's page, a garbage ref, a
deleted object, a gutted full-text index.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from dulwich.repo import Repo

from taled.__main__ import EXIT_STARTUP
from taled.doctor import is_damage, sqlite_code, take_backup
from tests.harness import LOCAL_ZONE, Daemon, Home


@pytest.fixture(scope="module")
def seed() -> Iterator[Home]:
    """A home where a daemon completed three tasks and stopped (so it made backups)."""
    home = Home()
    daemon = Daemon(home).start()
    try:
        ids = [daemon.call("submit_task", text=f"Say hello {i}")["id"] for i in range(3)]
        for task_id in ids:
            daemon.wait_for(task_id)
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()
    yield home
    home.cleanup()


@pytest.fixture
def copy(seed: Home, home: Home) -> Home:
    """A fresh home holding a copy of the seeded data."""
    shutil.copytree(seed.data, home.data)
    return home


# -- helpers ---------------------------------------------------------------------


def _db(home: Home) -> Path:
    return home.data / "tale.db"


def _repo(home: Home) -> Path:
    return home.data / "checkpoints.git"


def _backups(home: Home) -> list[Path]:
    return sorted((home.data / "backups").glob("tale-*.db"), reverse=True)


def _task_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM tasks WHERE parent_id IS NULL")}


def _quick_check(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("PRAGMA quick_check")]
    finally:
        conn.close()


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_page(db: Path, table: str, seed: int = 7) -> None:
    """Damage the root page of ``table``: an invalid page type, then seeded bit flips."""
    conn = sqlite3.connect(db)
    try:
        root = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    rng = random.Random(seed)
    with open(db, "r+b") as f:
        f.seek((root[0] - 1) * size)
        page = bytearray(f.read(size))
        page[0] = 0xFF
        for _ in range(16):
            page[rng.randrange(1, 12)] ^= 1 << rng.randrange(8)
        f.seek((root[0] - 1) * size)
        f.write(page)


def _start_fails(home: Home) -> str:
    """Start taled, expect it to exit with the start-up code, and return its output."""
    daemon = Daemon(home).start(wait=False)
    assert daemon.proc is not None
    code = daemon.proc.wait(60)
    log = daemon.log_text()
    assert code == EXIT_STARTUP, log
    assert "Traceback" not in log and "ExceptionGroup" not in log, log
    return log


def _one_line_naming(log: str, *words: str) -> str:
    """The one line of ``log`` that says `tale doctor`, checked to name ``words``."""
    lines = [line for line in log.splitlines() if "tale doctor" in line]
    assert len(lines) == 1, log
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _refs(home: Home) -> list[Path]:
    return sorted((_repo(home) / "refs" / "tale" / "tasks").iterdir())


def _loose(home: Home, sha: str) -> Path:
    return _repo(home) / "objects" / sha[:2] / sha[2:]


def _history(home: Home, task_id: str) -> list[str]:
    """A task's checkpoint commits, newest first, read with dulwich."""
    repo = Repo(str(_repo(home)))
    try:
        head = repo.refs[f"refs/tale/tasks/{task_id}".encode()]
        return [e.commit.id.decode() for e in repo.get_walker(include=[head])]
    finally:
        repo.close()


def _doctor(home: Home, *args: str) -> tuple[int, dict[str, object]]:
    result = home.tale("doctor", "--json", *args)
    return result.returncode, json.loads(result.stdout)


# -- the database ------------------------------------------------------------------


def test_a_truncated_database_stops_start_up_with_one_line_naming_it(copy: Home) -> None:
    """A truncated tale.db makes taled exit with its start-up code and one line naming
    the file and `tale doctor`, not a traceback."""
    _truncate(_db(copy))
    log = _start_fails(copy)
    _one_line_naming(log, str(_db(copy)), "damaged")


def test_flipped_bytes_in_a_table_page_stop_start_up(copy: Home) -> None:
    """Seeded byte flips in the tasks table's page are caught by start-up's quick_check."""
    _flip_page(_db(copy), "tasks")
    log = _start_fails(copy)
    _one_line_naming(log, str(_db(copy)), "malformed")


@pytest.mark.parametrize("command", ["list", "status"])
def test_a_damaged_page_found_by_a_query_reaches_the_client_as_a_clear_error(
    copy: Home, command: str
) -> None:
    """With the start-up check off, `tale list` (read on a reader's thread) or `tale
    status` (read on the event loop's, Database.read_now) over a damaged page fails with
    a message naming the file and `tale doctor`, never the SQL statement."""
    copy.write_config("[store]\ncheck_on_start = false\n")
    args = [command] if command == "list" else [command, min(_task_ids(_db(copy)))]
    _flip_page(_db(copy), "tasks")
    daemon = Daemon(copy).start()
    try:
        result = copy.tale(*args)
    finally:
        daemon.kill_if_running()
    assert result.returncode == 1, result
    assert str(_db(copy)) in result.stderr and "tale doctor" in result.stderr, result.stderr
    assert "SELECT" not in result.stderr and "[SQL" not in result.stderr, result.stderr


def test_doctor_repair_restores_the_newest_good_backup(copy: Home) -> None:
    """`tale doctor --repair` puts the newest backup in place of a truncated tale.db, keeps
    the damaged file aside, and the daemon then starts with every task the backup had."""
    newest = _backups(copy)[0]
    expected = _task_ids(newest)
    assert len(expected) == 3
    _truncate(_db(copy))
    damaged_size = _db(copy).stat().st_size

    code, report = _doctor(copy, "--repair")

    assert code == 0, report
    assert report["healthy"] is True
    [problem] = report["problems"]  # type: ignore[misc]
    assert problem["kind"] == "database" and str(newest) in problem["repaired"]
    [aside] = copy.data.glob("tale.db.damaged-*")
    assert aside.stat().st_size == damaged_size
    daemon = Daemon(copy).start()
    try:
        listed = daemon.call("list_tasks")["tasks"]
    finally:
        daemon.stop()
    assert {t["id"] for t in listed} == expected


def test_doctor_repair_skips_a_backup_that_fails_its_check(copy: Home) -> None:
    """When the newest backup is damaged too, the restore takes the newest one that passes."""
    newer, older = _backups(copy)[:2]
    _truncate(newer)
    _truncate(_db(copy))

    code, report = _doctor(copy, "--repair")

    assert code == 0, report
    [problem] = report["problems"]  # type: ignore[misc]
    assert str(older) in problem["repaired"]
    assert _quick_check(_db(copy)) == ["ok"]


def test_doctor_without_a_good_backup_changes_nothing_and_exits_1(copy: Home) -> None:
    """With no backup passing its check, --repair leaves the damaged file where it is,
    says what to do by hand, and exits 1."""
    for backup in _backups(copy):
        backup.unlink()
    _truncate(_db(copy))
    before = _db(copy).read_bytes()

    code, report = _doctor(copy, "--repair")

    assert code == 1, report
    [problem] = report["problems"]  # type: ignore[misc]
    assert problem["repaired"] is None and ".recover" in problem["repair"]
    assert _db(copy).read_bytes() == before
    assert not list(copy.data.glob("tale.db.damaged-*"))


def test_doctor_finds_a_healthy_home_healthy(copy: Home) -> None:
    """On undamaged data `tale doctor` exits 0 and reports no problems."""
    code, report = _doctor(copy)
    assert code == 0, report
    assert report["healthy"] is True and report["problems"] == []
    assert report["daemon_pid"] is None


def test_doctor_says_when_the_backup_was_taken_in_local_time(copy: Home) -> None:
    """The text names the newest good backup's time in this machine's zone, as the CLI
    prints every time; --json keeps it in UTC."""
    _code, report = _doctor(copy)
    newest = report["backups"][0]  # type: ignore[index]
    taken = datetime.fromisoformat(newest["taken_at"].replace("Z", "+00:00"))
    copy.env["TZ"] = LOCAL_ZONE
    said = copy.tale("doctor").stdout
    local = taken.astimezone(ZoneInfo(LOCAL_ZONE))
    assert f"newest good one taken {local:%Y-%m-%d %H:%M:%S} IST\n" in said, said


def test_doctor_checks_while_the_daemon_runs(copy: Home) -> None:
    """Checking works beside a running daemon, and says which daemon it saw."""
    daemon = Daemon(copy).start()
    try:
        code, report = _doctor(copy)
        assert code == 0, report
        assert report["daemon_pid"] == daemon.proc.pid  # type: ignore[union-attr]
    finally:
        daemon.stop()


def test_doctor_refuses_to_repair_while_the_daemon_runs(copy: Home) -> None:
    """--repair with the daemon running exits 2 and says to stop it first."""
    daemon = Daemon(copy).start()
    try:
        result = copy.tale("doctor", "--repair")
    finally:
        daemon.stop()
    assert result.returncode == 2, result
    assert "tale daemon stop" in result.stderr


# -- the full-text index ---------------------------------------------------------------


def _gut_fts(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM task_memory_data WHERE id > 10")


def _fts_ok(db: Path) -> bool:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("INSERT INTO task_memory(task_memory) VALUES ('integrity-check')")
        return True
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


def test_doctor_repair_rebuilds_a_damaged_full_text_index(copy: Home) -> None:
    """A gutted FTS5 index is reported, rebuilt by --repair, and finds every task again."""
    _gut_fts(_db(copy))
    assert not _fts_ok(_db(copy))

    code, report = _doctor(copy)
    assert code == 1
    assert [p["kind"] for p in report["problems"]] == ["full_text_index"]  # type: ignore[union-attr]
    said = copy.tale("doctor").stdout.splitlines()
    assert said[-1] == "1 problem; repair with: tale doctor --repair", said
    assert any(line.endswith(" task refs ok") for line in said), said

    repaired = copy.tale("doctor", "--repair")
    assert repaired.returncode == 0, repaired
    assert repaired.stdout.splitlines()[-1] == "repaired 1 problem; taled can start"
    assert _fts_ok(_db(copy))
    with sqlite3.connect(_db(copy)) as conn:
        found = conn.execute("SELECT count(*) FROM task_memory WHERE task_memory MATCH 'hello'")
        assert found.fetchone()[0] == 3


def test_start_up_rebuilds_a_damaged_full_text_index(copy: Home) -> None:
    """The daemon starts over a gutted FTS5 index, rebuilding it (it is derived data)."""
    _gut_fts(_db(copy))
    daemon = Daemon(copy).start()
    daemon.stop()
    assert "rebuilt it" in daemon.log_text()
    assert _fts_ok(_db(copy))


# -- checkpoints -----------------------------------------------------------------------


def test_a_garbage_ref_stops_start_up_naming_it(copy: Home) -> None:
    """A ref holding garbage makes start-up fail with one line naming the ref."""
    ref = _refs(copy)[0]
    ref.write_bytes(b"this is not a commit id\n")
    log = _start_fails(copy)
    _one_line_naming(log, f"refs/tale/tasks/{ref.name}", "no commit id")


def test_a_ref_to_a_missing_commit_stops_start_up_naming_it(copy: Home) -> None:
    """A ref naming a commit whose object is gone makes start-up fail naming the ref."""
    ref = _refs(copy)[1]
    _loose(copy, ref.read_text().strip()).unlink()
    log = _start_fails(copy)
    _one_line_naming(log, f"refs/tale/tasks/{ref.name}", "missing")


def test_doctor_repair_drops_broken_refs_and_keeps_the_other_checkpoints(copy: Home) -> None:
    """--repair drops a garbage ref and a ref to a missing commit, logs what they held,
    and the daemon then starts with the third task's checkpoints intact."""
    garbage, dangling, intact = _refs(copy)
    garbage.write_bytes(b"this is not a commit id\n")
    dangling_head = dangling.read_text().strip()
    _loose(copy, dangling_head).unlink()
    intact_history = _history(copy, intact.name)

    code, report = _doctor(copy, "--repair")

    assert code == 0, report
    assert len(report["problems"]) == 2  # type: ignore[arg-type]
    assert not garbage.exists() and not dangling.exists()
    log = (copy.data / "doctor.log").read_text()
    assert "this is not a commit id" in log and dangling_head in log
    daemon = Daemon(copy).start()
    try:
        listed = daemon.call("list_checkpoints", id=intact.name)["checkpoints"]
    finally:
        daemon.stop()
    assert [c["commit"] for c in listed] == intact_history


def test_doctor_repair_moves_a_ref_back_to_its_newest_readable_checkpoint(copy: Home) -> None:
    """When a task's newest checkpoint lost its state, --repair moves its ref back to the
    checkpoint before it instead of dropping its history."""
    task_id = _refs(copy)[2].name
    history = _history(copy, task_id)
    assert len(history) >= 2
    repo = Repo(str(_repo(copy)))
    tree = repo[history[0].encode()].tree.decode()  # type: ignore[attr-defined]
    others = {repo[h.encode()].tree.decode() for h in history[1:]}  # type: ignore[attr-defined]
    repo.close()
    assert tree not in others
    _loose(copy, tree).unlink()

    code, report = _doctor(copy, "--repair")

    assert code == 0, report
    assert _history(copy, task_id) == history[1:]


def test_a_missing_commit_in_a_history_is_named_when_listed(copy: Home) -> None:
    """A history missing an older commit still starts (heads are intact), and listing it
    names the repository, the commit and `tale doctor`, not a bare sha."""
    task_id = _refs(copy)[0].name
    history = _history(copy, task_id)
    _loose(copy, history[1]).unlink()
    daemon = Daemon(copy).start()
    try:
        result = copy.tale("checkpoints", task_id)
    finally:
        daemon.stop()
    assert result.returncode == 1, result
    assert str(_repo(copy)) in result.stderr and history[1] in result.stderr
    assert "tale doctor" in result.stderr


# -- backups -------------------------------------------------------------------------------


def test_backups_rotate_keeping_the_newest_n_each_passing_quick_check(home: Home) -> None:
    """With a short interval, each change is backed up; only the newest `backups_keep`
    stay, each 0600 and passing quick_check."""
    home.write_config("[store]\nbackup_interval_minutes = 0.01\nbackups_keep = 2\n")
    daemon = Daemon(home).start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while len(seen) < 4 and time.monotonic() < deadline:
            before = {p.name for p in _backups(home)}
            daemon.call("submit_task", text=f"Say hello {len(seen)}")
            while {p.name for p in _backups(home)} <= before and time.monotonic() < deadline:
                time.sleep(0.1)
            # Names have whole seconds: wait for the next one, so each backup is kept apart.
            time.sleep(1.0)
            seen |= {p.name for p in _backups(home)}
    finally:
        daemon.stop()  # a last backup at shutdown, if anything changed since
    kept = _backups(home)
    seen |= {p.name for p in kept}
    assert len(seen) >= 4, daemon.log_text()
    assert len(kept) == 2
    assert [p.name for p in kept] == sorted(seen, reverse=True)[:2]
    for backup in kept:
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        assert _quick_check(backup) == ["ok"]


def test_a_backup_is_skipped_when_nothing_changed(copy: Home, tmp_path: Path) -> None:
    """A second backup of an unchanged database writes nothing, even when the file was
    touched; a change makes one again."""
    target = tmp_path / "backups"
    first = take_backup(_db(copy), target, keep=3)
    assert first is not None and _quick_check(first) == ["ok"]
    assert take_backup(_db(copy), target, keep=3) is None
    time.sleep(1.1)  # a new name (whole seconds) and a later mtime
    _db(copy).touch()
    assert take_backup(_db(copy), target, keep=3) is None
    with sqlite3.connect(_db(copy)) as conn:
        conn.execute("UPDATE tasks SET priority = priority + 1")
    assert take_backup(_db(copy), target, keep=3) is not None
    assert len(list(target.glob("tale-*.db"))) == 2
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


def test_sqlite_errors_are_read_by_their_primary_result_code(tmp_path: Path) -> None:
    """The checks that decide busy, full or damaged read SQLite's result code (an
    extended code counts as its primary one), never the message's wording; an error
    SQLite did not report has no code."""
    path = tmp_path / "codes.db"
    holder = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        holder.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError) as duplicate:
            holder.execute("INSERT INTO t VALUES (1)")
        # SQLITE_CONSTRAINT_PRIMARYKEY (1555) is a SQLITE_CONSTRAINT.
        assert duplicate.value.sqlite_errorcode != sqlite3.SQLITE_CONSTRAINT
        assert sqlite_code(duplicate.value) == sqlite3.SQLITE_CONSTRAINT
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError) as busy:
            other.execute("SELECT * FROM t")
        assert sqlite_code(busy.value) == sqlite3.SQLITE_BUSY
        assert not is_damage(busy.value)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
        other.close()
    with pytest.raises(sqlite3.ProgrammingError) as closed:
        holder.execute("SELECT 1")
    assert sqlite_code(closed.value) is None
    assert sqlite_code(OSError("database or disk is full")) is None
