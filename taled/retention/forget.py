"""Forgetting a task everywhere tale keeps it, keeping only anonymous token counts.

    check       the task exists, is top-level and finished (a live one: `tale cancel`
                first), no restore is under way, no live task waits for it; its worker
                has let go of it (its outcome recorded, its last checkpoint written)
    journal     the task's and its subtasks' ids, with where their workspaces came from,
                go to <data>/forgetting.json (before anything is deleted)
    rows        one transaction deletes every row holding its text (taled.db.forget)
    files       its checkpoint refs, its workspace and run outputs; a git worktree is
                removed with git and its branch tale/ID deleted from the user's repository
    memory      the learning engine lets go of it and learns again without it
    scrub       the checkpoint repository is repacked and pruned (its objects go), the
                full-text index merged, the database rewritten without free space and
                its write-ahead log emptied,
                the backups replaced by one fresh backup; then the journal is cleared

Everything after the rows transaction is idempotent and recorded in the journal, so a
daemon killed halfway finishes it at its next start (``recover``). Deleting a task twice:
the second time it is unknown (NotFound), like any id that never was.

One forgetting at a time (a lock); it runs shielded from its caller's cancellation, so a
client that hangs up does not leave it half done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from taled.checkpoints.repo import CheckpointStore
from taled.db.forget import ForgetRecords, Forgettable
from taled.db.store import Store
from taled.errors import IllegalTransition, InvalidInput, NotFound, TaleError
from taled.learning.engine import LearningEngine
from taled.retention.age import parse_age
from taled.tasks.progress import ProgressHub
from taled.tasks.runner import Runner
from taled.text import count
from taled.tools.service import Acting

__all__ = ["Forgetting", "Forgot", "Scrubbed"]

log = logging.getLogger(__name__)

# How long a delete waits for a just-finished task's worker to let go of it.
_LET_GO_SECONDS = 30.0
# gc waits while a workspace snapshot awaits its commit: tried this often, this far apart.
_GC_TRIES = 20
_GC_PAUSE_SECONDS = 0.5
_JOURNAL = "forgetting.json"


@dataclass(frozen=True)
class _Place:
    """Where a task's git worktree came from (as its newest checkpoint says)."""

    repo: str | None = None
    branch: str | None = None
    base: str | None = None


@dataclass
class Scrubbed:
    """What the last step of a forgetting did."""

    checkpoint_objects: bool = False
    """The checkpoint repository was repacked and its unreachable objects pruned."""
    database: bool = False
    """The database was rewritten and its write-ahead log emptied."""
    backups: str = "none"
    """``replaced`` (one fresh backup left), ``removed`` (backups are off: none left),
    or why they were not."""

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint_objects": self.checkpoint_objects,
            "database": self.database,
            "backups": self.backups,
        }


@dataclass
class Forgot:
    """One task forgotten."""

    id: str
    ids: tuple[str, ...]
    """It and its subtasks."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows deleted (or, in model_calls, blanked) per table."""
    checkpoints: int = 0
    """Checkpoint refs deleted."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tasks": list(self.ids),
            "rows": self.rows,
            "checkpoint_refs": self.checkpoints,
        }


class Forgetting:
    """``delete_task``, ``purge_tasks`` and the retention sweep's work."""

    def __init__(
        self,
        store: Store,
        checkpoints: CheckpointStore,
        acting: Acting,
        runner: Runner,
        progress: ProgressHub,
        learning: LearningEngine | None,
        *,
        data_dir: Path,
        backups: Path,
        take_backups: bool,
        title_chars: int,
    ) -> None:
        """``backups``: the database's backup directory; ``take_backups``: whether backups
        are on (after a forgetting one fresh backup replaces them; off, they are removed)."""
        self._store = store
        self._records = ForgetRecords(store, title_chars=title_chars)
        self._checkpoints = checkpoints
        self._acting = acting
        self._runner = runner
        self._progress = progress
        self._learning = learning
        self._journal = data_dir / _JOURNAL
        self._backups = backups
        self._take_backups = take_backups
        self._lock = asyncio.Lock()

    # -- what people ask for ---------------------------------------------------

    async def delete(self, task_id: str) -> dict[str, Any]:
        """Forget one finished top-level task and its subtasks everywhere."""
        async with self._lock:
            with anyio.CancelScope(shield=True):
                found = await self._records.check(task_id)
                await self._wait_let_go(found)
                forgot = await self._forget(found)
                scrubbed = await self._finish(forgot.ids)
        log.info("task %s forgotten (%d with its subtasks)", task_id, len(forgot.ids))
        return {**forgot.to_json(), "scrubbed": scrubbed.to_json()}

    async def purge(self, older_than: str, *, dry_run: bool) -> dict[str, Any]:
        """Forget every finished top-level task last updated more than ``older_than`` ago
        (``30d``...); ``dry_run`` lists them and forgets nothing."""
        seconds = parse_age(older_than)
        report = await self.purge_before(time.time() - seconds, dry_run=dry_run)
        return {"older_than": older_than.strip(), **report}

    async def purge_before(self, cutoff: float, *, dry_run: bool) -> dict[str, Any]:
        """Forget every finished top-level task last updated before ``cutoff``."""
        if dry_run:
            found, kept = await self._records.finished_before(cutoff)
            return {
                "cutoff": _iso(cutoff),
                "dry_run": True,
                "tasks": [_listed(f, text=True) for f in found],
                "skipped": [{"id": t, "reason": why} for t, why in kept],
            }
        async with self._lock:
            with anyio.CancelScope(shield=True):
                found, kept = await self._records.finished_before(cutoff)
                done: list[Forgettable] = []
                skipped = [{"id": t, "reason": why} for t, why in kept]
                ids: list[str] = []
                scrubbed: Scrubbed | None = None
                try:
                    for candidate in found:
                        try:
                            # Checked again: the list was read before the lock was ours.
                            current = await self._records.check(candidate.id)
                            if await self._runner.let_go(current.ids, 0):
                                raise IllegalTransition(f"task {current.id} is being wound down")
                            forgot = await self._forget(current)
                        except (IllegalTransition, InvalidInput, NotFound) as exc:
                            skipped.append({"id": candidate.id, "reason": exc.message})
                            continue
                        done.append(candidate)
                        ids += forgot.ids
                finally:
                    # What was forgotten before a failure is scrubbed all the same.
                    if done:
                        scrubbed = await self._finish(ids)
        if done:
            purged = count(len(done), "task", "tasks")
            log.info("purged %s last updated before %s", purged, _iso(cutoff))
        return {
            "cutoff": _iso(cutoff),
            "dry_run": False,
            "tasks": [_listed(f, text=False) for f in done],
            "skipped": skipped,
            "scrubbed": None if scrubbed is None else scrubbed.to_json(),
        }

    async def recover(self) -> None:
        """At start: finish a forgetting a crash cut off (its journal is still there)."""
        pending = self._read_journal()
        if not pending:
            return
        async with self._lock:
            with anyio.CancelScope(shield=True):
                # Tasks whose rows are still there were not forgotten (the crash came
                # before the transaction committed): they stay as they are.
                alive = await self._records.existing(list(pending))
                gone = {t: p for t, p in pending.items() if t not in alive}
                self._write_journal(gone)
                if not gone:
                    return
                tasks = count(len(gone), "task", "tasks")
                log.info("finishing the forgetting of %s a stop cut off", tasks)
                await self._remove_files(gone)
                await self._finish(list(gone))

    # -- steps -----------------------------------------------------------------

    async def _wait_let_go(self, found: Forgettable) -> None:
        held = await self._runner.let_go(found.ids, _LET_GO_SECONDS)
        if held:
            raise IllegalTransition(
                f"task {found.id} has just ended and its worker is still winding it down; "
                "try again in a moment"
            )

    async def _forget(self, found: Forgettable) -> Forgot:
        places = {task_id: await self._place(task_id) for task_id in found.ids}
        self._write_journal({**self._read_journal(), **places})
        try:
            rows = await self._records.forget(found.id)
        except BaseException:
            # Refused (it changed meanwhile) or failed: nothing was forgotten.
            journal = self._read_journal()
            self._write_journal({t: p for t, p in journal.items() if t not in places})
            raise
        refs = await self._remove_files(places)
        return Forgot(found.id, found.ids, rows, refs)

    async def _place(self, task_id: str) -> _Place:
        """Where the task's git worktree came from, from its newest checkpoint (read
        before its refs go); empty for a task that did not work in one."""
        try:
            if await self._checkpoints.latest(task_id) is None:
                return _Place()
            state = await self._checkpoints.load(task_id)
        except TaleError as exc:
            log.warning("task %s: its checkpoint could not be read (%s)", task_id, exc.message)
            return _Place()
        agent = state.get("agent")
        if not isinstance(agent, dict) or not isinstance(agent.get("git_dir"), str):
            return _Place()
        return _Place(
            _text(agent.get("source")), _text(agent.get("branch")), _text(agent.get("git_base"))
        )

    async def _remove_files(self, places: dict[str, _Place]) -> int:
        """Checkpoint refs, workspaces, run outputs, worktree branches; caches. Failures
        are logged (the journal keeps the ids for the next start)."""
        refs = 0
        for task_id, place in places.items():
            try:
                refs += int(await self._checkpoints.delete(task_id))
            except TaleError as exc:
                log.warning("task %s: its checkpoints were not deleted: %s", task_id, exc.message)
            try:
                await self._acting.remove_workspace(
                    task_id, repo=place.repo, branch=place.branch, base=place.base
                )
            except (OSError, TaleError) as exc:
                log.warning("task %s: its workspace was not removed: %s", task_id, exc)
            self._progress.forget(task_id)
        return refs

    async def _finish(self, ids: Sequence[str]) -> Scrubbed:
        """Learn again without the tasks, then scrub: checkpoint objects, the database
        file and its log, the backups. The journal is cleared once all of it worked."""
        done = Scrubbed()
        if self._learning is not None and ids:
            await self._learning.forget_tasks(ids)
        done.checkpoint_objects = await self._gc()
        try:
            await self._records.merge_index()
            done.database = await self._store.scrub()
            if not done.database:
                log.warning(
                    "the database's write-ahead log was busy and not emptied; forgotten text "
                    "stays in it until its next checkpoint"
                )
        except TaleError as exc:
            log.warning("the database was not rewritten after a forgetting: %s", exc.message)
        try:
            fresh = await self._store.replace_backups(self._backups, take=self._take_backups)
            done.backups = "replaced" if fresh is not None else "removed"
        except (TaleError, OSError) as exc:
            why = exc.message if isinstance(exc, TaleError) else str(exc)
            done.backups = f"not replaced: {why}"
            log.error(
                "the backups in %s were not replaced after a forgetting, so they still hold "
                "the forgotten text: %s",
                self._backups,
                why,
            )
        if done.checkpoint_objects and done.database and not done.backups.startswith("not"):
            self._journal.unlink(missing_ok=True)
        return done

    async def _gc(self) -> bool:
        for _ in range(_GC_TRIES):
            try:
                report = await self._checkpoints.gc()
            except TaleError as exc:
                log.warning("the checkpoint repository was not repacked: %s", exc.message)
                return False
            if not report.skipped:
                return True
            await anyio.sleep(_GC_PAUSE_SECONDS)
        log.warning(
            "the checkpoint repository was busy and not repacked; the forgotten tasks' objects "
            "go at its next start"
        )
        return False

    # -- the journal -----------------------------------------------------------

    def _read_journal(self) -> dict[str, _Place]:
        try:
            data = json.loads(self._journal.read_text(encoding="utf-8"))
            tasks = data.get("tasks", {})
            return {
                str(t): _Place(_text(p.get("repo")), _text(p.get("branch")), _text(p.get("base")))
                for t, p in tasks.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.error("%s is unreadable (%s); it is set aside", self._journal, exc)
            self._journal.replace(self._journal.with_suffix(".unreadable"))
            return {}

    def _write_journal(self, places: dict[str, _Place]) -> None:
        if not places:
            self._journal.unlink(missing_ok=True)
            return
        body = {"tasks": {t: asdict(p) for t, p in places.items()}}
        tmp = self._journal.with_name(f".{self._journal.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(body, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self._journal)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _listed(found: Forgettable, *, text: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": found.id,
        "state": found.state,
        "updated_at": _iso(found.updated_at),
        "subtasks": len(found.ids) - 1,
    }
    if text:
        flat = " ".join(found.text.split())
        out["text"] = flat if len(flat) <= 80 else flat[:79] + "…"
    return out
