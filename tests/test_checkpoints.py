"""The checkpoint store: a dulwich bare repository that real git accepts."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from anyio.from_thread import start_blocking_portal
from dulwich.file import FileLocked
from dulwich.objects import Blob, Commit, ObjectID, Tree
from dulwich.refs import Ref
from dulwich.repo import Repo
from hypothesis import given, settings
from hypothesis import strategies as st

from taled.checkpoints.repo import Checkpoint, CheckpointStore
from taled.errors import DaemonError, InvalidInput, NotFound, Unavailable
from tests import strategies

T = TypeVar("T")

TASK = "0123456789ab"
OTHER = "ba9876543210"
ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[CheckpointStore]:
    store = CheckpointStore(path, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def with_store(path: Path, fn: Callable[[CheckpointStore], Awaitable[T]]) -> T:
    """Open a store at ``path``, run ``fn`` with it, close it."""

    async def run() -> T:
        async with opened(path) as store:
            return await fn(store)

    return asyncio.run(run())


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60, check=False
    )


def assert_fsck_clean(repo: Path) -> None:
    result = git(repo, "fsck", "--strict", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def rev_list(repo: Path, task_id: str) -> list[list[str]]:
    """``git rev-list --parents`` of the task's ref: [sha, parent...] per commit, newest first."""
    result = git(repo, "rev-list", "--parents", f"refs/tale/tasks/{task_id}")
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.splitlines()]


def test_a_state_round_trips(tmp_path: Path) -> None:
    """A committed state loads back equal, and latest() names that checkpoint."""
    state = {"plan": ["a", "b"], "done": {"a": "result é"}, "tokens": 12, "ratio": 0.5}

    async def run(store: CheckpointStore) -> tuple[Checkpoint, Checkpoint | None, dict[str, Any]]:
        checkpoint = await store.commit(TASK, state, "step 1", "planned")
        return checkpoint, await store.latest(TASK), await store.load(TASK)

    checkpoint, latest, loaded = with_store(tmp_path / "cp", run)
    assert loaded == state
    assert latest == checkpoint
    assert (checkpoint.task_id, checkpoint.step, checkpoint.message) == (TASK, "step 1", "planned")


def test_the_blob_is_canonical_json_in_state_json(tmp_path: Path) -> None:
    """The commit's tree holds one blob, state.json, with sorted keys and no spaces."""

    async def run(store: CheckpointStore) -> Checkpoint:
        return await store.commit(TASK, {"b": 1, "a": [1, 2]}, "s", "m")

    checkpoint = with_store(tmp_path / "cp", run)
    assert git(tmp_path / "cp", "ls-tree", "--name-only", checkpoint.commit).stdout == (
        "state.json\n"
    )
    shown = git(tmp_path / "cp", "show", f"{checkpoint.commit}:state.json").stdout
    assert shown == '{"a":[1,2],"b":1}'


def test_list_is_newest_first_with_time_step_and_message(tmp_path: Path) -> None:
    """list() gives every checkpoint newest first, each with its sha, time, step and message."""

    async def run(store: CheckpointStore) -> tuple[list[Checkpoint], list[Checkpoint]]:
        made = [await store.commit(TASK, {"i": i}, f"step {i}", f"did {i}") for i in range(5)]
        return made, await store.list(TASK)

    before = time.time()
    made, listed = with_store(tmp_path / "cp", run)
    assert listed == made[::-1]
    assert [c.step for c in listed] == [f"step {i}" for i in reversed(range(5))]
    assert [c.message for c in listed] == [f"did {i}" for i in reversed(range(5))]
    assert all(math.floor(before) <= c.at <= time.time() for c in listed)
    assert [c.commit for c in listed] == [row[0] for row in rev_list(tmp_path / "cp", TASK)]


def test_list_stops_at_its_limit(tmp_path: Path) -> None:
    """list(limit=n) gives the n newest checkpoints."""

    async def run(store: CheckpointStore) -> list[str]:
        for i in range(5):
            await store.commit(TASK, {"i": i}, f"step {i}", "")
        return [c.step for c in await store.list(TASK, limit=2)]

    assert with_store(tmp_path / "cp", run) == ["step 4", "step 3"]


def test_each_checkpoint_is_the_child_of_the_previous(tmp_path: Path) -> None:
    """Real git sees one chain: the first commit is a root, each later one the child of the last."""

    async def run(store: CheckpointStore) -> list[str]:
        return [(await store.commit(TASK, {"i": i}, "s", "m")).commit for i in range(6)]

    made = with_store(tmp_path / "cp", run)
    chain = rev_list(tmp_path / "cp", TASK)[::-1]
    assert [row[0] for row in chain] == made
    assert chain[0][1:] == []
    assert all(row[1:] == [made[i]] for i, row in enumerate(chain[1:]))
    assert_fsck_clean(tmp_path / "cp")


def test_a_multi_line_message_is_stored_as_one_line(tmp_path: Path) -> None:
    """Whitespace in a message collapses to single spaces; an empty message becomes the step."""

    async def run(store: CheckpointStore) -> tuple[Checkpoint, Checkpoint]:
        first = await store.commit(TASK, {}, "plan", "  made\n\ta   plan \n")
        second = await store.commit(TASK, {}, "step 2", "")
        return first, second

    first, second = with_store(tmp_path / "cp", run)
    assert first.message == "made a plan"
    assert second.message == "step 2"


def test_concurrent_commits_on_one_task_all_land_in_order(tmp_path: Path) -> None:
    """8 coroutines x 25 commits on one task all land on one intact chain, in each one's order."""

    async def writer(store: CheckpointStore, w: int) -> list[str]:
        return [(await store.commit(TASK, {"w": w, "i": i}, "s", "m")).commit for i in range(25)]

    async def run(store: CheckpointStore) -> tuple[list[list[str]], list[Checkpoint]]:
        made = await asyncio.gather(*(writer(store, w) for w in range(8)))
        return made, await store.list(TASK)

    made, listed = with_store(tmp_path / "cp", run)
    chain = rev_list(tmp_path / "cp", TASK)
    assert len(listed) == len(chain) == 200
    assert [row[0] for row in chain] == [c.commit for c in listed]
    assert all(row[1:] == [chain[n + 1][0]] for n, row in enumerate(chain[:-1]))
    position = {c.commit: n for n, c in enumerate(reversed(listed))}
    for shas in made:
        assert [position[s] for s in shas] == sorted(position[s] for s in shas)
    assert_fsck_clean(tmp_path / "cp")


def test_different_tasks_commit_in_parallel(tmp_path: Path) -> None:
    """8 tasks committing at once each get exactly their own 25 checkpoints, in order."""
    tasks = [f"{n:012x}" for n in range(8)]

    async def writer(store: CheckpointStore, task_id: str) -> None:
        for i in range(25):
            # Equal states across tasks share blobs: the same object is written concurrently.
            await store.commit(task_id, {"i": i}, f"step {i}", "m")

    async def run(store: CheckpointStore) -> dict[str, list[str]]:
        await asyncio.gather(*(writer(store, t) for t in tasks))
        return {t: [c.step for c in await store.list(t)] for t in await store.task_ids()}

    steps = with_store(tmp_path / "cp", run)
    assert steps == {t: [f"step {i}" for i in reversed(range(25))] for t in tasks}
    assert_fsck_clean(tmp_path / "cp")


def _foreign_writer(path: Path, task_id: str, count: int, out: list[str]) -> None:
    """Another writer on the same ref, doing its own compare-and-swap with dulwich."""
    repo = Repo(str(path))
    ref = Ref(f"refs/tale/tasks/{task_id}".encode())
    try:
        for i in range(count):
            while True:
                try:
                    head: ObjectID | None = repo.refs[ref]
                except KeyError:
                    head = None
                blob = Blob.from_string(json.dumps({"foreign": i}).encode())
                tree = Tree()
                tree.add(b"state.json", 0o100644, blob.id)
                commit = Commit()
                commit.tree = tree.id
                commit.parents = [head] if head is not None else []
                commit.author = commit.committer = b"other <other@localhost>"
                commit.author_time = commit.commit_time = int(time.time())
                commit.author_timezone = commit.commit_timezone = 0
                commit.message = f"foreign {i}\n\nStep: foreign\n".encode()
                for obj in (blob, tree, commit):
                    repo.object_store.add_object(obj)
                try:
                    if head is None:
                        moved = repo.refs.add_if_new(ref, commit.id)
                    else:
                        moved = repo.refs.set_if_equals(ref, head, commit.id)
                except FileLocked:
                    moved = False
                if moved:
                    out.append(commit.id.decode())
                    break
            # A real second writer does some work between checkpoints; a tight loop
            # that never pauses could starve any compare-and-swap loser.
            time.sleep(random.uniform(0, 0.003))
    finally:
        repo.close()


def test_a_concurrent_writer_on_the_same_ref_loses_no_checkpoint(tmp_path: Path) -> None:
    """While another writer moves the task's ref, compare-and-swap retries keep every checkpoint."""
    foreign: list[str] = []

    async def run(store: CheckpointStore) -> list[str]:
        await store.commit(TASK, {"start": True}, "s", "m")
        thread = threading.Thread(
            target=_foreign_writer, args=(tmp_path / "cp", TASK, 150, foreign)
        )
        thread.start()
        ours = [(await store.commit(TASK, {"i": i}, "s", "m")).commit for i in range(150)]
        await asyncio.to_thread(thread.join)
        return ours

    ours = with_store(tmp_path / "cp", run)
    chain = [row[0] for row in rev_list(tmp_path / "cp", TASK)]
    assert len(chain) == 1 + 150 + 150
    assert set(ours) | set(foreign) <= set(chain)
    assert_fsck_clean(tmp_path / "cp")


def test_restore_adds_a_commit_with_the_old_state(tmp_path: Path) -> None:
    """restore() appends a checkpoint holding the old state; the history before it is unchanged."""

    async def run(
        store: CheckpointStore,
    ) -> tuple[list[Checkpoint], Checkpoint, list[Checkpoint], dict[str, Any]]:
        made = [await store.commit(TASK, {"i": i}, f"step {i}", "m") for i in range(3)]
        restored = await store.restore(TASK, made[0].commit)
        return made, restored, await store.list(TASK), await store.load(TASK)

    made, restored, listed, state = with_store(tmp_path / "cp", run)
    assert state == {"i": 0}
    assert listed == [restored, *made[::-1]]
    assert restored.message == f"restored {made[0].commit[:7]}"
    assert restored.step == "step 0"
    assert_fsck_clean(tmp_path / "cp")


def test_compaction_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    """compact(keep=N) leaves N commits real git accepts, with states, steps and times intact."""

    async def run(
        store: CheckpointStore,
    ) -> tuple[list[Checkpoint], int, list[Checkpoint], list[dict[str, Any]]]:
        made = [await store.commit(TASK, {"i": i}, f"step {i}", f"m{i}") for i in range(10)]
        dropped = await store.compact(TASK, 4)
        listed = await store.list(TASK)
        return made, dropped, listed, [await store.load(TASK, c.commit) for c in listed]

    made, dropped, listed, states = with_store(tmp_path / "cp", run)
    assert dropped == 6
    assert states == [{"i": i} for i in (9, 8, 7, 6)]
    assert [(c.step, c.message, c.at) for c in listed] == [
        (c.step, c.message, c.at) for c in made[:-5:-1]
    ]
    log = git(tmp_path / "cp", "log", "--format=%H", f"refs/tale/tasks/{TASK}")
    assert log.stdout.split() == [c.commit for c in listed]
    assert rev_list(tmp_path / "cp", TASK)[-1][1:] == []
    assert_fsck_clean(tmp_path / "cp")


def test_a_checkpoint_compacted_away_is_not_found(tmp_path: Path) -> None:
    """After compaction a dropped checkpoint's sha is NotFound, though gc has not run yet."""

    async def run(store: CheckpointStore) -> None:
        made = [await store.commit(TASK, {"i": i}, "s", "m") for i in range(4)]
        await store.compact(TASK, 2)
        for checkpoint in (made[0], made[3]):  # the newest was rewritten too: new sha
            with pytest.raises(NotFound):
                await store.load(TASK, checkpoint.commit)
            with pytest.raises(NotFound):
                await store.restore(TASK, checkpoint.commit[:7])

    with_store(tmp_path / "cp", run)


def test_compaction_of_a_short_history_changes_nothing(tmp_path: Path) -> None:
    """compact() with keep at or above the history's length drops nothing and keeps every sha."""

    async def run(store: CheckpointStore) -> tuple[list[Checkpoint], int, list[Checkpoint]]:
        made = [await store.commit(TASK, {"i": i}, "s", "m") for i in range(3)]
        return made, await store.compact(TASK, 3), await store.list(TASK)

    made, dropped, listed = with_store(tmp_path / "cp", run)
    assert dropped == 0
    assert listed == made[::-1]


def test_gc_prunes_what_compaction_and_delete_left_and_the_repo_stays_valid(
    tmp_path: Path,
) -> None:
    """After compaction, delete and gc, git fsck passes and every remaining state still loads."""

    async def run(store: CheckpointStore) -> tuple[int, list[dict[str, Any]], Checkpoint]:
        for i in range(20):
            await store.commit(TASK, {"i": i, "pad": "x" * i}, "s", "m")
            await store.commit(OTHER, {"other": i}, "s", "m")
        await store.compact(TASK, 5)
        await store.delete(OTHER)
        report = await store.gc()
        states = [await store.load(TASK, c.commit) for c in await store.list(TASK)]
        after = await store.commit(TASK, {"after": "gc"}, "s", "m")
        return report.pruned_objects, states, after

    pruned, states, after = with_store(tmp_path / "cp", run)
    assert pruned > 0
    assert states == [{"i": i, "pad": "x" * i} for i in range(19, 14, -1)]
    assert rev_list(tmp_path / "cp", TASK)[0][0] == after.commit
    assert len(rev_list(tmp_path / "cp", TASK)) == 6
    assert_fsck_clean(tmp_path / "cp")
    unreachable = git(tmp_path / "cp", "fsck", "--unreachable", "--no-progress").stdout
    assert unreachable == ""


def test_delete_removes_every_checkpoint_of_the_task(tmp_path: Path) -> None:
    """delete() removes the task's ref: no latest, an empty list, no task id; others untouched."""

    async def run(store: CheckpointStore) -> tuple[bool, bool, Any, list[Checkpoint], list[str]]:
        await store.commit(TASK, {"a": 1}, "s", "m")
        await store.commit(OTHER, {"b": 2}, "s", "m")
        first, second = await store.delete(TASK), await store.delete(TASK)
        return (
            first,
            second,
            await store.latest(TASK),
            await store.list(TASK),
            await store.task_ids(),
        )

    first, second, latest, listed, ids = with_store(tmp_path / "cp", run)
    assert (first, second, latest, listed, ids) == (True, False, None, [], [OTHER])
    assert git(tmp_path / "cp", "show-ref").stdout.split()[1::2] == [f"refs/tale/tasks/{OTHER}"]


def test_a_unique_seven_digit_prefix_names_a_checkpoint(tmp_path: Path) -> None:
    """load() and restore() accept a 7-digit prefix (any case) of a checkpoint's sha."""

    async def run(store: CheckpointStore) -> tuple[dict[str, Any], Checkpoint]:
        first = await store.commit(TASK, {"i": 0}, "s", "m")
        await store.commit(TASK, {"i": 1}, "s", "m")
        return await store.load(TASK, first.commit[:7].upper()), await store.restore(
            TASK, first.commit[:7]
        )

    state, restored = with_store(tmp_path / "cp", run)
    assert state == {"i": 0}
    assert restored.message.startswith("restored ")


def test_an_unknown_commit_is_not_found(tmp_path: Path) -> None:
    """A sha outside the task's history, even another task's, is NotFound for load and restore."""

    async def run(store: CheckpointStore) -> list[BaseException]:
        await store.commit(TASK, {"i": 0}, "s", "m")
        foreign = await store.commit(OTHER, {"i": 1}, "s", "m")
        calls = [
            store.load(TASK, "f" * 40),
            store.load(TASK, foreign.commit),
            store.restore(TASK, foreign.commit[:7]),
            store.load("aaaaaaaaaaaa"),
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        return [o for o in outcomes if isinstance(o, BaseException)]

    errors = with_store(tmp_path / "cp", run)
    assert len(errors) == 4
    assert all(isinstance(e, NotFound) for e in errors)
    assert "no checkpoint" in str(errors[0]) and "has no checkpoints" in str(errors[3])


@pytest.mark.parametrize("task_id", ["", "0123456789AB", "0123456789a", "0123456789abc", "../x"])
def test_a_bad_task_id_is_invalid_input_and_writes_nothing(tmp_path: Path, task_id: str) -> None:
    """A task id that is not 12 lowercase hex digits is refused before anything is written."""

    async def run(store: CheckpointStore) -> list[str]:
        for call in (
            store.commit(task_id, {}, "s", "m"),
            store.load(task_id),
            store.list(task_id),
            store.latest(task_id),
        ):
            with pytest.raises(InvalidInput, match="12 lowercase hex"):
                await call
        return await store.task_ids()

    assert with_store(tmp_path / "cp", run) == []
    assert git(tmp_path / "cp", "count-objects").stdout.startswith("0 objects")


@pytest.mark.parametrize("commit", ["abc123", "xyz1234", "0123456789" * 5, ""])
def test_a_malformed_commit_is_invalid_input(tmp_path: Path, commit: str) -> None:
    """A commit that is not 7 to 40 hex digits is refused with a message saying so."""

    async def run(store: CheckpointStore) -> None:
        await store.commit(TASK, {}, "s", "m")
        with pytest.raises(InvalidInput, match="7 to 40 hex"):
            await store.load(TASK, commit)

    with_store(tmp_path / "cp", run)


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ({"x": {1, 2}}, "set"),
        ({"x": math.nan}, "JSON cannot hold"),
        ({"x": math.inf}, "JSON cannot hold"),
        ({"x": {1: "a"}}, "non-string key"),
        ({"x": (1, 2)}, "tuple"),
        ({"x": object()}, "object"),
        (["not", "a", "dict"], "must be a JSON object"),
    ],
)
def test_a_state_that_is_not_json_is_invalid_input_and_writes_nothing(
    tmp_path: Path, state: Any, why: str
) -> None:
    """A state JSON cannot hold exactly is refused, naming the bad value; no checkpoint is made."""

    async def run(store: CheckpointStore) -> Checkpoint | None:
        with pytest.raises(InvalidInput, match=why):
            await store.commit(TASK, state, "s", "m")
        return await store.latest(TASK)

    assert with_store(tmp_path / "cp", run) is None


def test_a_state_over_the_size_limit_is_invalid_input(tmp_path: Path) -> None:
    """A state whose JSON exceeds max_state_bytes is refused with both sizes in the message."""

    async def run() -> None:
        async with opened(tmp_path / "cp", max_state_bytes=1000) as store:
            with pytest.raises(InvalidInput, match="the limit is 1000"):
                await store.commit(TASK, {"x": "y" * 1000}, "s", "m")

    asyncio.run(run())


@pytest.mark.parametrize("step", ["", "   ", "two\nlines", "x" * 201])
def test_a_bad_step_is_invalid_input(tmp_path: Path, step: str) -> None:
    """A step must be one printable, non-empty line of at most 200 characters."""

    async def run(store: CheckpointStore) -> None:
        with pytest.raises(InvalidInput, match="step"):
            await store.commit(TASK, {}, step, "m")

    with_store(tmp_path / "cp", run)


def test_keep_below_one_is_invalid_input(tmp_path: Path) -> None:
    """compact(keep=0) is refused and points at delete()."""

    async def run(store: CheckpointStore) -> int:
        await store.commit(TASK, {}, "s", "m")
        with pytest.raises(InvalidInput, match="delete"):
            await store.compact(TASK, 0)
        return len(await store.list(TASK))

    assert with_store(tmp_path / "cp", run) == 1


json_values = strategies.json_values()


def test_any_json_object_round_trips_exactly(tmp_path: Path) -> None:
    """Any dict of JSON values loads back identical (same types, same float bits, same keys)."""
    with start_blocking_portal() as portal:
        store = CheckpointStore(tmp_path / "cp", fsync=False)
        portal.call(store.open)
        try:

            @settings(max_examples=150, deadline=None)
            @given(state=st.dictionaries(st.text(), json_values, max_size=6))
            def check(state: dict[str, Any]) -> None:
                portal.call(store.commit, TASK, state, "s", "m")
                loaded = portal.call(store.load, TASK)
                # == alone would accept 1 for True and 0.0 for -0.0.
                assert _same(loaded, state)

            check()
        finally:
            portal.call(store.close)


def _same(a: Any, b: Any) -> bool:
    """Type- and bit-exact equality (dict order aside)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and a == b
    return bool(a == b)


def test_a_lone_surrogate_round_trips(tmp_path: Path) -> None:
    """A string UTF-8 cannot encode (a lone surrogate) is saved escaped and loads back unchanged."""

    async def run(store: CheckpointStore) -> dict[str, Any]:
        await store.commit(TASK, {"s": "a\ud800b", "é": "ü"}, "s", "m")
        return await store.load(TASK)

    assert with_store(tmp_path / "cp", run) == {"s": "a\ud800b", "é": "ü"}


def test_reopening_the_store_sees_everything(tmp_path: Path) -> None:
    """A new store on the same path lists and loads every checkpoint the old one wrote."""

    async def write(store: CheckpointStore) -> list[Checkpoint]:
        return [await store.commit(TASK, {"i": i}, f"step {i}", "m") for i in range(4)]

    async def read(store: CheckpointStore) -> tuple[list[Checkpoint], list[dict[str, Any]]]:
        listed = await store.list(TASK)
        return listed, [await store.load(TASK, c.commit) for c in listed]

    made = with_store(tmp_path / "cp", write)
    listed, states = with_store(tmp_path / "cp", read)
    assert listed == made[::-1]
    assert states == [{"i": i} for i in reversed(range(4))]


def test_a_second_open_store_on_the_same_repository_is_refused(tmp_path: Path) -> None:
    """While one store has the repository open another cannot open it; after close() it can."""

    async def run() -> None:
        async with opened(tmp_path / "cp"):
            with pytest.raises(DaemonError, match="in use by another process"):
                await CheckpointStore(tmp_path / "cp").open()
        async with opened(tmp_path / "cp") as again:
            await again.commit(TASK, {}, "s", "m")

    asyncio.run(run())


def test_a_lock_file_left_by_a_killed_writer_is_cleared_at_open(tmp_path: Path) -> None:
    """A ref lock left behind by a crash does not block the task's next checkpoint."""
    with_store(tmp_path / "cp", lambda s: s.commit(TASK, {"i": 0}, "s", "m"))
    (tmp_path / "cp" / "refs" / "tale" / "tasks" / f"{TASK}.lock").write_text("")

    async def run() -> dict[str, Any]:
        async with opened(tmp_path / "cp", contention_timeout_seconds=0.2) as store:
            await store.commit(TASK, {"i": 1}, "s", "m")
            return await store.load(TASK)

    assert asyncio.run(run()) == {"i": 1}


def test_a_closed_store_is_unavailable(tmp_path: Path) -> None:
    """Calls after close() fail with Unavailable instead of touching the repository."""

    async def run() -> None:
        async with opened(tmp_path / "cp") as store:
            await store.commit(TASK, {}, "s", "m")
        with pytest.raises(Unavailable, match="closed"):
            await store.commit(TASK, {}, "s", "m")
        with pytest.raises(Unavailable, match="closed"):
            await store.list(TASK)

    asyncio.run(run())


def test_a_directory_that_is_not_a_repository_is_refused(tmp_path: Path) -> None:
    """Opening a non-empty directory that is not a git repository fails and changes nothing."""
    (tmp_path / "cp").mkdir()
    (tmp_path / "cp" / "notes.txt").write_text("mine")

    async def run() -> None:
        await CheckpointStore(tmp_path / "cp").open()

    with pytest.raises(DaemonError, match="not a git repository"):
        asyncio.run(run())
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == ["notes.txt"]


def test_an_empty_directory_becomes_a_bare_repository(tmp_path: Path) -> None:
    """A directory holding nothing but a crashed open's lock file is initialised as a repo."""
    (tmp_path / "cp").mkdir()
    (tmp_path / "cp" / "taled.flock").write_text("")
    with_store(tmp_path / "cp", lambda s: s.commit(TASK, {"i": 0}, "s", "m"))
    assert git(tmp_path / "cp", "rev-parse", "--is-bare-repository").stdout == "true\n"
    assert_fsck_clean(tmp_path / "cp")


_CRASH_WRITER = """
import asyncio, sys
from pathlib import Path
from taled.checkpoints.repo import CheckpointStore

async def main():
    store = CheckpointStore(Path(sys.argv[1]))
    await store.open()
    i = int(sys.argv[2])
    while True:
        await store.commit("0123456789ab", {"i": i, "pad": "x" * 4000}, f"step {i}", "m")
        print(i, flush=True)
        i += 1

asyncio.run(main())
"""


def test_kill_9_mid_checkpoint_loses_no_acknowledged_checkpoint(tmp_path: Path) -> None:
    """Writers killed with SIGKILL leave a valid repo holding every checkpoint they acknowledged."""
    repo = tmp_path / "cp"
    total = 0
    for run_length in (5, 17, 31):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASH_WRITER, str(repo), str(total)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        acknowledged = -1
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= total + run_length:
                break
        os.kill(proc.pid, signal.SIGKILL)  # while it keeps committing
        proc.wait(30)
        proc.stdout.close()

        async def states(store: CheckpointStore) -> list[int]:
            return [(await store.load(TASK, c.commit))["i"] for c in await store.list(TASK)]

        found = with_store(repo, states)
        # Newest first, no gap, nothing twice, nothing acknowledged missing.
        assert found == list(range(len(found) - 1, -1, -1))
        assert found[0] >= acknowledged
        total = len(found)
        assert_fsck_clean(repo)


def test_a_workspaces_base_and_latest_trees_survive_compaction_and_gc(tmp_path: Path) -> None:
    """An acting task's diff needs the tree its workspace started from: compaction drops
    the checkpoint that made it, yet gc must not take it while a later checkpoint needs it."""
    from taled.settings import WorkspaceSettings
    from taled.tools.workspace import Workspace, diff_trees

    root = tmp_path / "ws"
    workspace = Workspace.empty(root, WorkspaceSettings())
    (root / "a.txt").write_text("before\n")

    async def run(store: CheckpointStore) -> str:
        base = (await store.with_objects(workspace.snapshot)).decode()
        await store.commit(TASK, {"i": 0}, "s", "start", workspace=base, base=base)
        (root / "a.txt").write_text("after\n")
        latest = (await store.with_objects(workspace.snapshot)).decode()
        for i in range(1, 4):
            await store.commit(TASK, {"i": i}, "s", "m", workspace=latest, base=base)
        await store.compact(TASK, 1)
        assert (await store.gc()).pruned_objects > 0
        return await store.with_objects(
            lambda objects: diff_trees(objects, base.encode(), latest.encode())
        )

    diff = with_store(tmp_path / "cp", run)
    assert "-before" in diff and "+after" in diff
    assert_fsck_clean(tmp_path / "cp")
