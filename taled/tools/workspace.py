"""A task's workspace: its own copy of a directory, snapshots of it as git trees, and
bringing a change back.

A task never changes a user's directory in place. ``Workspace.copy_of`` copies it
(within ``[tools.workspace]`` limits, excluded directories left out) and the task's
tools act on the copy; ``Workspace.empty`` makes a scratch one. ``snapshot`` writes
the workspace as a git tree into the checkpoint repository's object store (the daemon
puts the tree in each checkpoint's commit) and ``checkout`` makes the workspace equal
to such a tree again (``tale restore``). ``diff_trees`` and ``changed_paths`` compare
two trees, and ``apply_tree`` brings the change between two trees into the user's
directory, all or nothing: if any file there changed since the copy, nothing is
written and ``Conflict`` names the files.

Trees follow git: files are blobs with mode 100644 or 100755 (the owner's exec bit),
symbolic links are blobs of their target with mode 120000, directories are trees and
an empty directory is not recorded. Special files (FIFOs, sockets, devices) are never
copied nor recorded.

Paths a model or a person supplies go through ``Workspace.resolve``, which refuses
anything that would lead outside the workspace (absolute paths, ``..`` above the top,
symbolic links at any component pointing out, NUL bytes) or into an excluded
directory, with a message a model can act on.

Everything here blocks on file I/O: the daemon calls it from a worker thread
(``anyio.to_thread.run_sync``). Walks are iterative, never recursive: a directory
nested thousands deep must not raise ``RecursionError``.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import secrets
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from dulwich.diff_tree import TreeChange, tree_changes
from dulwich.objects import Blob, ObjectID, Tree

from taled.errors import Conflict, DiskFull, InvalidInput, TaleError, is_no_space
from taled.text import count

if TYPE_CHECKING:
    from dulwich.object_store import BaseObjectStore

    from taled.settings import WorkspaceSettings

__all__ = [
    "ApplyReport",
    "Change",
    "ChangeKind",
    "Skipped",
    "Workspace",
    "apply_tree",
    "changed_paths",
    "diff_trees",
    "remove_tree",
]

_MIB = 1024 * 1024
_DIR_MODE = 0o040000
_FILE_MODE = 0o100644
_EXEC_MODE = 0o100755
_LINK_MODE = 0o120000
_GITLINK_MODE = 0o160000
# A file whose mtime is this close to the snapshot's start may still change within the
# same timestamp tick ("racy git"): it is hashed, but not trusted to the stat cache.
_RACY_NS = 2_000_000_000
# Symbolic links followed while resolving one path (Linux's own limit).
_MAX_LINK_HOPS = 40
_MAX_PATH_CHARS = 4096
# Bytes git looks at to call a file binary (a NUL byte among them).
_BINARY_PROBE = 8000
# Conflicting paths listed in a Conflict's message (all are in its ``paths``).
_CONFLICTS_SHOWN = 20
_TMP_PREFIX = ".tale-tmp-"


@dataclass(frozen=True)
class Skipped:
    """A path of the source directory that was not copied, and why."""

    path: str
    """Relative to the source directory."""
    reason: str


class ChangeKind(StrEnum):
    """What happened to a path between two trees."""

    ADDED = "added"
    MODIFIED = "modified"
    """Its content, its exec bit or its type (file, symbolic link) changed."""
    DELETED = "deleted"


@dataclass(frozen=True)
class Change:
    """One path that differs between two trees."""

    path: str
    """Relative, ``/``-separated (undecodable bytes kept as surrogate escapes)."""
    kind: ChangeKind


@dataclass(frozen=True)
class ApplyReport:
    """What ``apply_tree`` did to the target directory."""

    applied: tuple[Change, ...]
    """Changes written (or deleted) in the target."""
    unchanged: tuple[Change, ...] = ()
    """Changes the target already had (an apply done before): nothing to write."""


@dataclass(frozen=True)
class _Entry:
    """A file's or symbolic link's entry in a tree (never a directory's)."""

    mode: int
    sha: bytes


@dataclass(frozen=True)
class _Change:
    path: bytes
    old: _Entry | None
    new: _Entry | None

    @property
    def kind(self) -> ChangeKind:
        if self.old is None:
            return ChangeKind.ADDED
        if self.new is None:
            return ChangeKind.DELETED
        return ChangeKind.MODIFIED

    def public(self) -> Change:
        return Change(_show(self.path), self.kind)


_StatKey = tuple[int, int, int, int, int]
"""(mtime_ns, ctime_ns, size, inode, mode): a file with the same key is unchanged."""


class Workspace:
    """The directory a task works in, and how it is snapshotted and restored."""

    def __init__(
        self,
        root: Path,
        exclude: Iterable[str] = (),
        *,
        source: Path | None = None,
        source_is_git: bool = False,
        skipped: tuple[Skipped, ...] = (),
    ) -> None:
        """Open an existing workspace directory (``copy_of`` and ``empty`` make one)."""
        self.root = Path(root).resolve()
        """The managed directory where the task works (absolute, no symbolic links)."""
        self.exclude = frozenset(exclude)
        """Directory names never copied, snapshotted, restored or applied."""
        self.source = source
        """The user's directory this is a copy of; None for a scratch workspace."""
        self.source_is_git = source_is_git
        """The source is a git repository (its ``.git`` is not copied)."""
        self.skipped = skipped
        """What the copy left out (symbolic links leading outside, special files)."""
        self.last_hashed = 0
        """Files the latest ``snapshot`` read and hashed (the rest came from its stat cache)."""
        self.last_unreadable: tuple[str, ...] = ()
        """Paths the latest ``snapshot`` could not read (left out of its tree)."""
        self._exclude_b = frozenset(os.fsencode(name) for name in self.exclude)
        self._cache: dict[bytes, tuple[_StatKey, bytes]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # --- making one ---------------------------------------------------------------

    @classmethod
    def copy_of(
        cls,
        source: Path,
        root: Path,
        settings: WorkspaceSettings,
        *,
        keep: frozenset[str] = frozenset(),
    ) -> Workspace:
        """Copy the directory ``source`` into ``root`` (made; must be absent or empty but
        for the excluded names in ``keep``: a git worktree's ``.git`` file).

        Refused (``InvalidInput``, naming the setting) when the files to copy are more
        than ``max_files`` or bigger than ``max_copy_mb``, before anything is copied.
        Excluded directories are left out; a symbolic link is copied as a link only when
        it resolves inside ``source``, special files never: both are listed in
        ``skipped``.
        """
        exclude = frozenset(settings.exclude)
        try:
            real_source = Path(source).resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise InvalidInput(f"cannot use {source} as a workspace: {_why(exc)}") from None
        if not real_source.is_dir():
            raise InvalidInput(f"cannot use {source} as a workspace: it is not a directory")
        root = Path(root)
        plan = _plan_copy(real_source, root.resolve(), exclude, settings)
        made_root = not root.exists()
        keep = keep & exclude  # never a name the copy itself would write
        if not made_root and any(p.name not in keep for p in root.iterdir()):
            raise InvalidInput(f"cannot copy into {root}: it is not empty")
        try:
            root.mkdir(parents=True, exist_ok=True)
            skipped = _copy(real_source, root, plan)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _remove_tree(root, keep, keep_top=not made_root)
            if is_no_space(exc):
                raise DiskFull(str(root), f"copying {source}") from exc
            if isinstance(exc, OSError):
                raise TaleError(f"could not copy {source} into a workspace: {_why(exc)}") from exc
            raise
        return cls(
            root,
            exclude,
            source=Path(source),
            source_is_git=(real_source / ".git").exists(),
            skipped=(*plan.skipped, *skipped),
        )

    @classmethod
    def empty(cls, root: Path, settings: WorkspaceSettings) -> Workspace:
        """A fresh scratch workspace at ``root`` (made; must be absent or empty)."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise InvalidInput(f"cannot make a scratch workspace in {root}: it is not empty")
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, settings.exclude)

    # --- paths from a model ---------------------------------------------------------

    def resolve(self, path: str, *, must_exist: bool = False) -> Path:
        """The absolute path inside the workspace that the relative ``path`` names.

        Symbolic links are followed, and must stay inside the workspace at every
        component. Raises ``InvalidInput``, with a message a model can act on, for an
        absolute path, ``..`` above the top, a link leading outside, a NUL byte, a path
        into an excluded directory, or (``must_exist``) a path that does not exist.
        """
        if not isinstance(path, str):
            raise InvalidInput(f"a path must be a string, not {type(path).__name__}")
        shown = repr(path) if len(path) <= 200 else repr(path[:200]) + "..."
        if "\x00" in path:
            raise InvalidInput(f"path {shown} contains a NUL byte")
        if len(path) > _MAX_PATH_CHARS:
            raise InvalidInput(f"path {shown} is longer than {_MAX_PATH_CHARS} characters")
        if path.startswith("/"):
            raise InvalidInput(
                f"{shown} is an absolute path: give a path relative to the workspace, "
                "such as 'src/main.py' ('.' is the workspace itself)"
            )
        parts = deque(path.split("/"))
        current: list[str] = []  # real directories below the root, then missing names
        missing_from: int | None = None  # index in current of the first missing name
        hops = 0
        link = ""  # the latest symbolic link followed, for messages
        while parts:
            part = parts.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    through = f" (through the symbolic link {link!r})" if link else ""
                    raise InvalidInput(f"{shown} leads outside the workspace{through}")
                current.pop()
                if missing_from is not None and len(current) <= missing_from:
                    missing_from = None
                continue
            if missing_from is None:
                candidate = self.root.joinpath(*current, part)
                try:
                    st = os.lstat(candidate)
                except FileNotFoundError:
                    missing_from = len(current)
                except NotADirectoryError:
                    raise InvalidInput(
                        f"{shown}: {'/'.join(current)!r} is a file, not a directory"
                    ) from None
                except OSError as exc:
                    raise InvalidInput(f"{shown}: {_why(exc)}") from None
                else:
                    if stat.S_ISLNK(st.st_mode):
                        hops += 1
                        if hops > _MAX_LINK_HOPS:
                            raise InvalidInput(f"{shown}: too many levels of symbolic links")
                        link = "/".join([*current, part])
                        target = os.readlink(candidate)
                        if target.startswith("/"):
                            inside = self._inside(target)
                            if inside is None:
                                raise InvalidInput(
                                    f"{shown} leads outside the workspace: {link!r} is a "
                                    f"symbolic link to {target!r}"
                                )
                            current = []
                            target = inside
                        parts.extendleft(reversed(target.split("/")))
                        continue
                    if parts and not stat.S_ISDIR(st.st_mode):
                        later = [p for p in parts if p not in ("", ".")]
                        if later:
                            raise InvalidInput(
                                f"{shown}: {'/'.join([*current, part])!r} is a file, "
                                "not a directory"
                            )
            current.append(part)
        for name in current:
            if name in self.exclude:
                raise InvalidInput(
                    f"{shown} is inside {name!r}, which is excluded from the workspace "
                    "(tools.workspace.exclude)"
                )
        if must_exist and missing_from is not None:
            raise InvalidInput(f"no such file or directory: {shown}")
        resolved = self.root.joinpath(*current)
        if not resolved.is_relative_to(self.root):  # cannot happen; never trust it did not
            raise InvalidInput(f"{shown} leads outside the workspace")
        return resolved

    def write(self, path: Path, data: bytes) -> bool:
        """Write the file ``path`` (from ``resolve``) whole: a temporary file beside it is
        renamed over it, so a reader never sees half of it; an existing file's permissions
        are kept, missing parent directories made. True if it replaced a file."""
        target = os.fsencode(path)
        try:
            perms: int | None = stat.S_IMODE(os.lstat(target).st_mode)
        except FileNotFoundError:
            perms = None
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        _replace_with_file(target, data, 0o644 if perms is None else perms)
        return perms is not None

    def relative(self, path: Path) -> str:
        """``path`` (inside the workspace) as a model should see it: relative, ``/``-separated."""
        rel = Path(path).relative_to(self.root).as_posix()
        return rel if rel else "."

    def _inside(self, target: str) -> str | None:
        """An absolute link target as a path relative to the root, or None if outside."""
        normal = os.path.normpath(target)
        top = str(self.root)
        if normal == top:
            return "."
        if normal.startswith(top.rstrip("/") + "/"):
            return normal[len(top.rstrip("/")) + 1 :]
        return None

    # --- snapshots --------------------------------------------------------------------

    def snapshot(self, objects: BaseObjectStore) -> bytes:
        """Write the workspace into ``objects`` as a git tree and return the tree's id.

        Files whose stat (mtime, ctime, size, inode, mode) is unchanged since an earlier
        snapshot are not read again (their blob is reused if ``objects`` still has it);
        ``last_hashed`` counts the files this one read. Unreadable entries are left out
        and listed in ``last_unreadable``.
        """
        with self._lock:
            started = time.time_ns()
            cache: dict[bytes, tuple[_StatKey, bytes]] = {}
            unreadable: list[str] = []
            hashed = 0
            dirs: list[bytes] = [b""]  # pre-order: a directory before its subdirectories
            listing: dict[bytes, list[tuple[bytes, int, bytes]]] = {}
            index = 0
            while index < len(dirs):
                rel = dirs[index]
                index += 1
                entries: list[tuple[bytes, int, bytes]] = []
                listing[rel] = entries
                for name, child, st in self._scan(rel, unreadable):
                    mode = st.st_mode
                    try:
                        if stat.S_ISDIR(mode):
                            dirs.append(child)
                            entries.append((name, _DIR_MODE, b""))
                        elif stat.S_ISLNK(mode):
                            blob = Blob.from_string(os.readlink(self._abs(child)))
                            _store(objects, blob)
                            entries.append((name, _LINK_MODE, blob.id))
                        elif stat.S_ISREG(mode):
                            key = _stat_key(st)
                            known = self._cache.get(child)
                            if (
                                known is not None
                                and known[0] == key
                                and ObjectID(known[1]) in objects
                            ):
                                sha = known[1]
                            else:
                                data = _read_regular(self._abs(child))
                                hashed += 1
                                blob = Blob.from_string(data)
                                _store(objects, blob)
                                sha = blob.id
                            if st.st_mtime_ns < started - _RACY_NS:
                                cache[child] = (key, sha)
                            entries.append((name, _file_mode(mode), sha))
                    except OSError as exc:
                        if is_no_space(exc):
                            raise
                        unreadable.append(f"{_show(child)}: {_why(exc)}")
            trees: dict[bytes, bytes] = {}
            for rel in reversed(dirs):
                tree = Tree()
                for name, mode, sha in listing[rel]:
                    if mode == _DIR_MODE:
                        sub = trees.get(_join(rel, name))
                        if sub is None:
                            continue  # empty: git records no empty directory
                        tree.add(name, mode, ObjectID(sub))
                    else:
                        tree.add(name, mode, ObjectID(sha))
                if rel and not tree.items():
                    continue
                _store(objects, tree)
                trees[rel] = tree.id
            self._cache = cache
            self.last_hashed = hashed
            self.last_unreadable = tuple(unreadable)
            return trees[b""]

    def checkout(self, objects: BaseObjectStore, tree: bytes) -> None:
        """Make the workspace equal to ``tree``: write, overwrite and delete files and
        links, remove directories left empty; excluded directories are not touched."""
        with self._lock:
            os.makedirs(self.root, exist_ok=True)
            stack: list[tuple[bytes, bytes]] = [(b"", tree)]
            while stack:
                rel, tree_id = stack.pop()
                here = self._abs(rel)
                _make_writable(here)
                want = {
                    name: (mode, sha)
                    for name, mode, sha in _tree(objects, tree_id).iteritems()
                    if _valid_name(name) and name not in self._exclude_b
                }
                have = {name: st for name, _, st in self._scan(rel, [], strict=True)}
                for name, st in have.items():
                    if name not in want:
                        self._remove(_join(rel, name), st)
                for name, (mode, sha) in sorted(want.items()):
                    child = _join(rel, name)
                    current = have.get(name)
                    if mode == _DIR_MODE:
                        if current is not None and not stat.S_ISDIR(current.st_mode):
                            self._remove(child, current)
                            current = None
                        if current is None:
                            os.mkdir(self._abs(child), 0o755)
                        stack.append((child, sha))
                    elif mode == _LINK_MODE:
                        self._put_link(child, current, _blob(objects, sha))
                    elif mode in (_FILE_MODE, _EXEC_MODE):
                        self._put_file(child, current, mode, sha, objects)

    # --- helpers ----------------------------------------------------------------------

    def _abs(self, rel: bytes) -> bytes:
        root = os.fsencode(self.root)
        return root + b"/" + rel if rel else root

    def _scan(
        self, rel: bytes, unreadable: list[str], *, strict: bool = False
    ) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
        """The entries of a directory (excluded names and special files left out)."""
        try:
            with os.scandir(self._abs(rel)) as it:
                found = list(it)
        except OSError as exc:
            if strict or is_no_space(exc):
                raise
            unreadable.append(f"{_show(rel) or '.'}: {_why(exc)}")
            return
        for entry in found:
            name = entry.name
            if name in self._exclude_b:
                continue
            child = _join(rel, name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if strict:
                    raise
                unreadable.append(f"{_show(child)}: {_why(exc)}")
                continue
            if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode):
                yield name, child, st
            elif strict:
                yield name, child, st  # checkout removes special files the tree lacks

    def _remove(self, rel: bytes, st: os.stat_result) -> None:
        path = self._abs(rel)
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(Path(os.fsdecode(path)), self.exclude)
        else:
            os.unlink(path)

    def _put_link(self, rel: bytes, current: os.stat_result | None, target: bytes) -> None:
        path = self._abs(rel)
        if current is not None:
            if stat.S_ISLNK(current.st_mode) and os.readlink(path) == target:
                return
            if stat.S_ISDIR(current.st_mode):
                self._remove(rel, current)
        _replace_with_link(path, target)

    def _put_file(
        self,
        rel: bytes,
        current: os.stat_result | None,
        mode: int,
        sha: bytes,
        objects: BaseObjectStore,
    ) -> None:
        path = self._abs(rel)
        perms = 0o755 if mode == _EXEC_MODE else 0o644
        if current is not None and stat.S_ISREG(current.st_mode):
            if self._blob_id(rel, current) == sha:
                if _file_mode(current.st_mode) != mode:
                    os.chmod(path, perms)
                return
        elif current is not None and stat.S_ISDIR(current.st_mode):
            self._remove(rel, current)
        _replace_with_file(path, _blob(objects, sha), perms)

    def _blob_id(self, rel: bytes, st: os.stat_result) -> bytes:
        """A regular file's blob id, from the stat cache when it is unchanged."""
        known = self._cache.get(rel)
        if known is not None and known[0] == _stat_key(st):
            return known[1]
        return Blob.from_string(_read_regular(self._abs(rel))).id


# --- comparing trees -----------------------------------------------------------------


def changed_paths(objects: BaseObjectStore, old: bytes, new: bytes) -> list[Change]:
    """The files and links that differ between trees ``old`` and ``new``, by path."""
    return [c.public() for c in _changes(objects, old, new)]


def diff_trees(objects: BaseObjectStore, old: bytes, new: bytes, *, context: int = 3) -> str:
    """The change from tree ``old`` to tree ``new`` as a git-style unified diff."""
    out: list[str] = []
    for change in _changes(objects, old, new):
        old_e, new_e = change.old, change.new
        if old_e is not None and new_e is not None and _kind(old_e.mode) != _kind(new_e.mode):
            # A file became a link or back: git shows a deletion and an addition.
            out += _diff_one(objects, change.path, old_e, None, context)
            out += _diff_one(objects, change.path, None, new_e, context)
        else:
            out += _diff_one(objects, change.path, old_e, new_e, context)
    return "".join(out)


def _changes(objects: BaseObjectStore, old: bytes, new: bytes) -> list[_Change]:
    found: list[_Change] = []
    changes: Iterator[TreeChange] = tree_changes(
        objects, ObjectID(old), ObjectID(new), change_type_same=True
    )
    for tc in changes:
        old_e = _entry(tc.old)
        new_e = _entry(tc.new)
        if old_e is None and new_e is None:
            continue
        side = tc.new if new_e is not None else tc.old
        if side is None or side.path is None:
            continue
        found.append(_Change(bytes(side.path), old_e, new_e))
    found.sort(key=lambda c: c.path)
    return found


def _entry(te: object) -> _Entry | None:
    mode = getattr(te, "mode", None)
    sha = getattr(te, "sha", None)
    if mode is None or sha is None or mode in (_DIR_MODE, _GITLINK_MODE):
        return None
    return _Entry(int(mode), bytes(sha))


def _diff_one(
    objects: BaseObjectStore,
    path: bytes,
    old: _Entry | None,
    new: _Entry | None,
    context: int,
) -> list[str]:
    name = _show(path)
    a, b = f"a/{name}", f"b/{name}"
    out = [f"diff --git {a} {b}\n"]
    zero = "0000000"
    if old is None and new is not None:
        out += [f"new file mode {new.mode:06o}\n", f"index {zero}..{_short(new.sha)}\n"]
    elif new is None and old is not None:
        out += [f"deleted file mode {old.mode:06o}\n", f"index {_short(old.sha)}..{zero}\n"]
    elif old is not None and new is not None:
        if old.mode != new.mode:
            out += [f"old mode {old.mode:06o}\n", f"new mode {new.mode:06o}\n"]
        if old.sha == new.sha:
            return out
        same = f" {new.mode:06o}" if old.mode == new.mode else ""
        out.append(f"index {_short(old.sha)}..{_short(new.sha)}{same}\n")
    before = _blob(objects, old.sha) if old is not None else b""
    after = _blob(objects, new.sha) if new is not None else b""
    from_name = a if old is not None else "/dev/null"
    to_name = b if new is not None else "/dev/null"
    old_text, new_text = _text(before), _text(after)
    if old_text is None or new_text is None:
        out.append(f"Binary files {from_name} and {to_name} differ\n")
        return out
    lines = difflib.unified_diff(
        old_text.splitlines(keepends=True),
        new_text.splitlines(keepends=True),
        from_name,
        to_name,
        n=context,
    )
    for line in lines:
        if line.endswith("\n"):
            out.append(line)
        else:
            out += [line, "\n\\ No newline at end of file\n"]
    return out


# --- bringing a change back ------------------------------------------------------------


def apply_tree(
    objects: BaseObjectStore,
    base: bytes,
    new: bytes,
    target: Path,
    exclude: Iterable[str],
) -> ApplyReport:
    """Bring the change from tree ``base`` to tree ``new`` into the directory ``target``.

    All or nothing: every changed path is checked first (its content in ``target`` must
    still be ``base``'s, or absent for an added one); if any differs, ``Conflict``
    lists them and nothing is written. A path that already has ``new``'s content
    counts as done. Files are written whole (a temporary file renamed over the old
    one), keeping the existing file's permissions with the exec bit of ``new``. A
    write that fails half way (disk full) leaves the files before it applied.
    """
    target = Path(target)
    excluded = frozenset(os.fsencode(name) for name in exclude)
    changes = [
        c for c in _changes(objects, base, new) if not excluded.intersection(c.path.split(b"/"))
    ]
    top = os.fsencode(target)
    removed = {c.path for c in changes if c.old is not None}  # deleted or replaced
    conflicts: list[tuple[str, str]] = []
    todo: list[_Change] = []
    done: list[_Change] = []
    for change in changes:
        verdict = _check(top, change, removed)
        if verdict == "todo":
            todo.append(change)
        elif verdict == "done":
            done.append(change)
        else:
            conflicts.append((_show(change.path), verdict))
    if conflicts:
        shown = [f"  {path} ({why})" for path, why in conflicts[:_CONFLICTS_SHOWN]]
        if len(conflicts) > _CONFLICTS_SHOWN:
            shown.append(f"  ... and {len(conflicts) - _CONFLICTS_SHOWN} more")
        raise Conflict(
            f"{count(len(conflicts), 'path', 'paths')} in {target} changed since the task "
            "copied it; "
            "nothing was applied:\n" + "\n".join(shown),
            tuple(path for path, _ in conflicts),
        )
    try:
        # Deletions first: a file may give way to a directory of the same name.
        for change in todo:
            path = top + b"/" + change.path
            if change.old is not None and (change.new is None or _is_kind_change(change)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                _prune_parents(top, change.path)
        for change in todo:
            if change.new is None:
                continue
            path = top + b"/" + change.path
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            data = _blob(objects, change.new.sha)
            if change.new.mode == _LINK_MODE:
                _replace_with_link(path, data)
                continue
            try:
                perms = stat.S_IMODE(os.lstat(path).st_mode)
            except FileNotFoundError:
                perms = 0o644
            perms = perms | _exec_bits(perms) if change.new.mode == _EXEC_MODE else perms & ~0o111
            _replace_with_file(path, data, perms)
    except OSError as exc:
        if is_no_space(exc):
            raise DiskFull(str(target), "applying the task's change") from exc
        raise TaleError(f"applying the task's change to {target} failed: {_why(exc)}") from exc
    return ApplyReport(
        applied=tuple(c.public() for c in todo), unchanged=tuple(c.public() for c in done)
    )


def _check(top: bytes, change: _Change, removed: set[bytes]) -> str:
    """``todo``, ``done`` (the target has the new content already), or why it conflicts."""
    parts = change.path.split(b"/")
    for i in range(1, len(parts)):
        prefix = b"/".join(parts[:i])
        try:
            st = os.lstat(top + b"/" + prefix)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            return f"{_show(prefix)} is now a symbolic link"
        if not stat.S_ISDIR(st.st_mode):
            if prefix in removed:
                break  # a file this change deletes (checked on its own)
            return f"{_show(prefix)} is now a file"
    now = _state(top + b"/" + change.path)
    if now == _state_of(change.new):
        return "done"
    if now == _state_of(change.old):
        return "todo"
    if change.old is None:
        return "created since the copy"
    if now is None:
        return "deleted since the copy"
    return "changed since the copy"


_State = tuple[str, bytes, bool] | None
"""A path's (kind, blob id, exec bit), or None when absent: what apply compares."""


def _state(path: bytes) -> _State:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return ("link", Blob.from_string(os.readlink(path)).id, False)
    if stat.S_ISREG(st.st_mode):
        data = _read_regular(path)
        return ("file", Blob.from_string(data).id, bool(st.st_mode & stat.S_IXUSR))
    return ("other", b"", False)


def _state_of(entry: _Entry | None) -> _State:
    if entry is None:
        return None
    if entry.mode == _LINK_MODE:
        return ("link", entry.sha, False)
    return ("file", entry.sha, entry.mode == _EXEC_MODE)


def _is_kind_change(change: _Change) -> bool:
    return (
        change.old is not None
        and change.new is not None
        and _kind(change.old.mode) != _kind(change.new.mode)
    )


def _prune_parents(top: bytes, rel: bytes) -> None:
    """Remove the directories above ``rel`` that its deletion left empty (not ``top``)."""
    parent = os.path.dirname(rel)
    while parent:
        try:
            os.rmdir(top + b"/" + parent)
        except OSError:
            return
        parent = os.path.dirname(parent)


# --- copying -----------------------------------------------------------------------------


@dataclass
class _Plan:
    dirs: list[tuple[bytes, int]]
    """Relative directory paths (pre-order) and their modes."""
    files: list[tuple[bytes, int]]
    """Relative regular files and their modes."""
    links: list[tuple[bytes, bytes]]
    """Relative symbolic links and the target each gets in the copy."""
    skipped: list[Skipped]


def _plan_copy(
    source: Path, root: Path, exclude: frozenset[str], settings: WorkspaceSettings
) -> _Plan:
    """What to copy, counted against the limits before anything is written."""
    top = os.fsencode(source)
    root_b = os.fsencode(root)
    excluded = frozenset(os.fsencode(name) for name in exclude)
    limit_bytes = settings.max_copy_mb * _MIB
    plan = _Plan(dirs=[], files=[], links=[], skipped=[])
    entries = 0
    size = 0
    todo: list[bytes] = [b""]
    while todo:
        rel = todo.pop()
        try:
            with os.scandir(top + b"/" + rel if rel else top) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            plan.skipped.append(Skipped(_show(rel), f"unreadable: {_why(exc)}"))
            continue
        for entry in found:
            if entry.name in excluded:
                continue
            child = _join(rel, entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                plan.skipped.append(Skipped(_show(child), f"unreadable: {_why(exc)}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if os.fsencode(entry.path) == root_b:
                    continue  # the workspace itself, made inside the source
                plan.dirs.append((child, st.st_mode))
                todo.append(child)
                continue
            if stat.S_ISLNK(st.st_mode):
                link = _copied_link(top, rel, entry.path)
                if link is None:
                    plan.skipped.append(
                        Skipped(_show(child), "symbolic link leading outside the directory")
                    )
                    continue
                plan.links.append((child, link))
            elif stat.S_ISREG(st.st_mode):
                plan.files.append((child, st.st_mode))
                size += st.st_size
            else:
                plan.skipped.append(Skipped(_show(child), f"special file ({_special(st)})"))
                continue
            entries += 1
            if entries > settings.max_files:
                raise InvalidInput(
                    f"{source} holds more than {settings.max_files} files (excluded "
                    "directories left out), the most a workspace copy takes "
                    "(tools.workspace.max_files): raise it, or add the bulky directories "
                    "to tools.workspace.exclude"
                )
            if size > limit_bytes:
                raise InvalidInput(
                    f"{source} holds more than {settings.max_copy_mb} MiB of files (excluded "
                    "directories left out), the most a workspace copy takes "
                    "(tools.workspace.max_copy_mb): raise it, or add the bulky directories "
                    "to tools.workspace.exclude"
                )
    return plan


def _copied_link(top: bytes, rel: bytes, path: bytes) -> bytes | None:
    """The target a symbolic link gets in the copy, or None if it leads outside ``top``.

    A relative target that stays inside lexically is kept as written; any other that
    resolves inside is rewritten relative, so the copy's link points into the copy.
    """
    target = os.readlink(path)
    real = os.path.realpath(path)
    if real != top and not real.startswith(top + b"/"):
        return None
    if not target.startswith(b"/"):
        lexical = os.path.normpath(os.path.join(rel, target)) if rel else os.path.normpath(target)
        if lexical != b".." and not lexical.startswith(b"../") and not lexical.startswith(b"/"):
            return target
    here = top + b"/" + rel if rel else top
    return os.path.relpath(real, here)


def _copy(source: Path, root: Path, plan: _Plan) -> list[Skipped]:
    top = os.fsencode(source)
    dest = os.fsencode(root)
    skipped: list[Skipped] = []
    for rel, mode in plan.dirs:
        os.mkdir(dest + b"/" + rel, stat.S_IMODE(mode) | stat.S_IRWXU)
    for rel, link in plan.links:
        os.symlink(link, dest + b"/" + rel)
    for rel, mode in plan.files:
        try:
            shutil.copyfile(top + b"/" + rel, dest + b"/" + rel, follow_symlinks=False)
        except (PermissionError, shutil.SpecialFileError, FileNotFoundError) as exc:
            skipped.append(Skipped(_show(rel), f"unreadable: {_why(exc)}"))
            continue
        os.chmod(dest + b"/" + rel, stat.S_IMODE(mode) | stat.S_IRUSR | stat.S_IWUSR)
    return skipped


# --- small helpers -------------------------------------------------------------------------


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _show(path: bytes) -> str:
    return os.fsdecode(path)


def _short(sha: bytes) -> str:
    return sha[:7].decode("ascii")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _special(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "unknown type"


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode)


def _file_mode(mode: int) -> int:
    return _EXEC_MODE if mode & stat.S_IXUSR else _FILE_MODE


def _kind(mode: int) -> int:
    return stat.S_IFMT(mode)


def _exec_bits(perms: int) -> int:
    """Exec bits for whoever may read: rw-r--r-- becomes rwxr-xr-x."""
    return (perms & 0o444) >> 2 | stat.S_IXUSR


def _valid_name(name: bytes) -> bool:
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def _text(data: bytes) -> str | None:
    """``data`` as text, or None when it is binary (a NUL byte early, or not UTF-8)."""
    if b"\0" in data[:_BINARY_PROBE]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_regular(path: bytes) -> bytes:
    """A regular file's bytes; refuses (``OSError``) whatever else appeared at ``path``
    (a FIFO would block the read forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read()


def _tree(objects: BaseObjectStore, sha: bytes) -> Tree:
    obj = objects[ObjectID(sha)]
    if not isinstance(obj, Tree):
        raise TaleError(f"object {sha.decode('ascii', 'replace')} is not a tree")
    return obj


def _blob(objects: BaseObjectStore, sha: bytes) -> bytes:
    obj = objects[ObjectID(sha)]
    if not isinstance(obj, Blob):
        raise TaleError(f"object {sha.decode('ascii', 'replace')} is not a blob")
    return obj.as_raw_string()


def _store(objects: BaseObjectStore, obj: Blob | Tree) -> None:
    if obj.id not in objects:
        objects.add_object(obj)


def _make_writable(path: bytes) -> None:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)


def _temp_beside(path: bytes) -> bytes:
    return os.path.join(os.path.dirname(path), os.fsencode(_TMP_PREFIX + secrets.token_hex(6)))


def _replace_with_file(path: bytes, data: bytes, perms: int) -> None:
    """Write ``path`` whole: a temporary file beside it, renamed over it."""
    tmp = _temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), perms)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _replace_with_link(path: bytes, target: bytes) -> None:
    """Make ``path`` a symbolic link to ``target``, replacing a file or link at once."""
    tmp = _temp_beside(path)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_tree(path: Path, exclude: frozenset[str], *, keep_top: bool = False) -> None:
    """Remove ``path`` and what it holds, except excluded directories (and the
    directories holding them); iterative, so any depth is fine."""
    top = os.fsencode(path)
    if os.path.islink(top):
        os.unlink(top)
        return
    excluded = frozenset(os.fsencode(name) for name in exclude)
    dirs: list[bytes] = [top]
    index = 0
    while index < len(dirs):
        here = dirs[index]
        index += 1
        _make_writable(here)
        try:
            with os.scandir(here) as it:
                found = list(it)
        except FileNotFoundError:
            continue
        for entry in found:
            if entry.name in excluded:
                continue
            if entry.is_dir(follow_symlinks=False):
                dirs.append(entry.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    for here in reversed(dirs if not keep_top else dirs[1:]):
        with contextlib.suppress(FileNotFoundError):
            try:
                os.rmdir(here)
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything in it, at any depth (no recursion)."""
    _remove_tree(path, frozenset())
