"""Workspaces: the copy of a user's directory, path confinement, snapshots into a real
bare git repository, restore, diff, and apply back, on real files in temp dirs."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dulwich.object_store import BaseObjectStore
from dulwich.repo import Repo
from hypothesis import given, settings
from hypothesis import strategies as st

from taled.errors import Conflict, InvalidInput
from taled.settings import WorkspaceSettings
from taled.tools.workspace import (
    ChangeKind,
    Workspace,
    apply_tree,
    changed_paths,
    diff_trees,
)

DEFAULTS = WorkspaceSettings()


def write(root: Path, files: dict[str, str | bytes]) -> None:
    """Create ``files`` (relative path -> content) under ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def tree_of(root: Path) -> dict[str, str]:
    """Every file and link under ``root``: its content (links: ``-> target``)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*filenames, *[d for d in dirnames if os.path.islink(Path(dirpath, d))]]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            else:
                found[rel] = path.read_bytes().decode("utf-8", "replace")
    return found


@pytest.fixture
def objects(tmp_path: Path) -> Iterator[BaseObjectStore]:
    """The object store of a real bare git repository."""
    repo = Repo.init_bare(str(tmp_path / "checkpoints.git"), mkdir=True)
    yield repo.object_store
    repo.close()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A user's directory with a few files."""
    src = tmp_path / "project"
    write(src, {"README.md": "hello\n", "src/app.py": "print('hi')\n", "src/util.py": "x = 1\n"})
    return src


def copy(source: Path, tmp_path: Path, **overrides: object) -> Workspace:
    ws_settings = WorkspaceSettings.model_validate({**DEFAULTS.model_dump(), **overrides})
    return Workspace.copy_of(source, tmp_path / "ws", ws_settings)


# --- copying ------------------------------------------------------------------------------


def test_copy_has_the_files(source: Path, tmp_path: Path) -> None:
    """A copy holds the source's files, and the source is left as it was."""
    ws = copy(source, tmp_path)
    assert tree_of(ws.root) == tree_of(source)
    assert ws.source == source
    assert not ws.source_is_git


def test_copy_refuses_too_many_files(source: Path, tmp_path: Path) -> None:
    """A directory with more files than max_files is refused, naming the setting."""
    with pytest.raises(InvalidInput, match=r"tools\.workspace\.max_files"):
        copy(source, tmp_path, max_files=2)
    assert not (tmp_path / "ws").exists()


def test_copy_refuses_too_big(source: Path, tmp_path: Path) -> None:
    """A directory bigger than max_copy_mb is refused, naming the setting."""
    (source / "big.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    with pytest.raises(InvalidInput, match=r"tools\.workspace\.max_copy_mb"):
        copy(source, tmp_path, max_copy_mb=1)
    assert not (tmp_path / "ws").exists()


def test_excluded_dirs_count_for_nothing(source: Path, tmp_path: Path) -> None:
    """Files in excluded directories are neither counted against the limits nor copied."""
    write(source, {f"node_modules/m{i}.js": "x" for i in range(20)})
    write(source, {".git/HEAD": "ref: refs/heads/main\n", "src/__pycache__/a.pyc": b"\0"})
    ws = copy(source, tmp_path, max_files=5)
    assert sorted(tree_of(ws.root)) == ["README.md", "src/app.py", "src/util.py"]
    assert ws.source_is_git


def test_copy_keeps_inside_links_and_skips_outside_ones(source: Path, tmp_path: Path) -> None:
    """Links resolving inside the source are copied as links (pointing into the copy);
    links leading outside and special files are skipped and listed."""
    (tmp_path / "secret").write_text("key")
    (source / "rel").symlink_to("src/app.py")
    (source / "absolute").symlink_to(source / "src" / "util.py")
    (source / "out").symlink_to(tmp_path / "secret")
    (source / "src" / "up").symlink_to("../../secret")
    os.mkfifo(source / "pipe")
    ws = copy(source, tmp_path)
    assert os.readlink(ws.root / "rel") == "src/app.py"
    assert not os.path.isabs(os.readlink(ws.root / "absolute"))
    assert (ws.root / "absolute").resolve() == ws.root / "src" / "util.py"
    assert not (ws.root / "out").is_symlink() and not (ws.root / "src" / "up").is_symlink()
    assert not (ws.root / "pipe").exists()
    skipped = {s.path: s.reason for s in ws.skipped}
    assert set(skipped) == {"out", "src/up", "pipe"}
    assert "outside" in skipped["out"] and "FIFO" in skipped["pipe"]


def test_copy_keeps_the_exec_bit(source: Path, tmp_path: Path) -> None:
    """An executable file is still executable in the copy."""
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    ws = copy(source, tmp_path)
    assert os.stat(ws.root / "run.sh").st_mode & stat.S_IXUSR


def test_copy_inside_the_source_is_not_copied_into_itself(source: Path) -> None:
    """A workspace made inside its own source directory leaves itself out of the copy."""
    ws = Workspace.copy_of(source, source / "tale-ws", DEFAULTS)
    assert sorted(tree_of(ws.root)) == ["README.md", "src/app.py", "src/util.py"]


def test_copy_refuses_a_file_as_source(source: Path, tmp_path: Path) -> None:
    """A source that is not a directory is refused."""
    with pytest.raises(InvalidInput, match="not a directory"):
        copy(source / "README.md", tmp_path)


def test_empty_workspace_is_made(tmp_path: Path) -> None:
    """A scratch workspace is an empty directory of its own."""
    ws = Workspace.empty(tmp_path / "scratch", DEFAULTS)
    assert ws.root.is_dir() and not any(ws.root.iterdir())
    assert ws.source is None


# --- paths from a model -----------------------------------------------------------------


@pytest.fixture
def ws(source: Path, tmp_path: Path) -> Workspace:
    """A workspace copied from ``source``, plus links planted inside it as a model could."""
    w = copy(source, tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("key")
    (w.root / "escape").symlink_to(tmp_path / "outside")
    (w.root / "src" / "sneaky").symlink_to("../../outside/secret")
    (w.root / "inner").symlink_to("src")
    (w.root / "node_modules").mkdir()
    return w


def test_relative_path_resolves_inside(ws: Workspace) -> None:
    """A plain relative path resolves to the file inside the workspace."""
    assert ws.resolve("src/app.py", must_exist=True) == ws.root / "src" / "app.py"
    assert ws.resolve("./src//new.py") == ws.root / "src" / "new.py"
    assert ws.resolve(".") == ws.root


def test_dotdot_escape_is_refused(ws: Workspace) -> None:
    """'..' above the workspace's top is refused; inside it is fine."""
    with pytest.raises(InvalidInput, match="outside the workspace"):
        ws.resolve("../secret")
    with pytest.raises(InvalidInput, match="outside the workspace"):
        ws.resolve("src/../../ws2/x")
    assert ws.resolve("src/../README.md") == ws.root / "README.md"


def test_absolute_path_is_refused(ws: Workspace) -> None:
    """An absolute path is refused with a hint to use a relative one."""
    with pytest.raises(InvalidInput, match=r"absolute path.*relative"):
        ws.resolve("/etc/passwd")
    with pytest.raises(InvalidInput, match="absolute path"):
        ws.resolve(str(ws.root / "README.md"))


def test_link_to_outside_is_refused(ws: Workspace) -> None:
    """A symbolic link leading outside is refused as the last component."""
    with pytest.raises(InvalidInput, match="outside the workspace"):
        ws.resolve("src/sneaky")


def test_link_dir_component_to_outside_is_refused(ws: Workspace) -> None:
    """A symbolic link leading outside is refused as a directory on the way."""
    with pytest.raises(InvalidInput, match=r"outside the workspace.*escape"):
        ws.resolve("escape/secret")
    with pytest.raises(InvalidInput, match="outside the workspace"):
        ws.resolve("escape/new-file")


def test_link_inside_is_followed(ws: Workspace) -> None:
    """A symbolic link to a place inside the workspace resolves to that place."""
    assert ws.resolve("inner/app.py", must_exist=True) == ws.root / "src" / "app.py"


def test_nul_byte_is_refused(ws: Workspace) -> None:
    """A path with a NUL byte is refused, saying so."""
    with pytest.raises(InvalidInput, match="NUL"):
        ws.resolve("src/app.py\x00.txt")


def test_excluded_dir_is_refused(ws: Workspace) -> None:
    """A path into an excluded directory is refused, naming the setting."""
    with pytest.raises(InvalidInput, match=r"node_modules.*tools\.workspace\.exclude"):
        ws.resolve("node_modules/x.js")


def test_missing_path_is_refused_when_it_must_exist(ws: Workspace) -> None:
    """must_exist refuses a path that does not exist, naming it."""
    with pytest.raises(InvalidInput, match=r"no such file or directory: 'nope\.txt'"):
        ws.resolve("nope.txt", must_exist=True)


def test_file_used_as_directory_is_refused(ws: Workspace) -> None:
    """A path going through a file as if it were a directory is refused."""
    with pytest.raises(InvalidInput, match=r"'README\.md' is a file"):
        ws.resolve("README.md/x")


_PARTS = ["..", ".", "", "a", "src", "escape", "inner", "loop", "up", "self", "abs", "/", "x"]


def test_no_path_resolves_outside() -> None:
    """No generated path string resolves to a place outside the workspace."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "outside").mkdir()
        root = top / "ws"
        write(root, {"a": "file", "src/b": "file"})
        (root / "escape").symlink_to("../outside")
        (root / "inner").symlink_to("src")
        (root / "loop").symlink_to("loop")
        (root / "src" / "up").symlink_to("../..")
        (root / "src" / "self").symlink_to("..")
        (root / "abs").symlink_to(top / "outside")
        w = Workspace(root, [".git"])

        @settings(max_examples=400, deadline=None)
        @given(
            st.lists(st.sampled_from(_PARTS), max_size=8).map("/".join)
            | st.text(max_size=40)
            | st.lists(st.sampled_from(_PARTS), max_size=8).map(lambda p: "/" + "/".join(p))
        )
        def check(path: str) -> None:
            try:
                resolved = w.resolve(path)
            except InvalidInput:
                return
            assert resolved.is_relative_to(w.root)
            assert resolved.resolve().is_relative_to(w.root)

        check()


# --- snapshots and restore ------------------------------------------------------------------


def test_snapshot_checkout_round_trip(ws: Workspace, objects: BaseObjectStore) -> None:
    """Checking out a snapshot restores contents, modes, links and deletions; excluded
    directories are left alone."""
    (ws.root / "escape").unlink()
    (ws.root / "src" / "sneaky").unlink()
    (ws.root / "tool.sh").write_text("#!/bin/sh\n")
    (ws.root / "tool.sh").chmod(0o755)
    (ws.root / "node_modules" / "keep.js").write_text("kept")
    before = tree_of(ws.root)
    tree = ws.snapshot(objects)

    (ws.root / "README.md").write_text("changed\n")
    (ws.root / "src" / "util.py").unlink()
    (ws.root / "tool.sh").chmod(0o644)
    (ws.root / "inner").unlink()
    (ws.root / "inner").mkdir()
    (ws.root / "inner" / "x").write_text("new")
    write(ws.root, {"new/deep/file.txt": "new", "node_modules/other.js": "also kept"})

    ws.checkout(objects, tree)
    after = tree_of(ws.root)
    assert {k: v for k, v in after.items() if not k.startswith("node_modules/")} == {
        k: v for k, v in before.items() if not k.startswith("node_modules/")
    }
    assert os.stat(ws.root / "tool.sh").st_mode & stat.S_IXUSR
    assert not (ws.root / "new").exists()
    assert (ws.root / "node_modules" / "keep.js").read_text() == "kept"
    assert (ws.root / "node_modules" / "other.js").read_text() == "also kept"
    assert ws.snapshot(objects) == tree


def test_deep_directories_round_trip(ws: Workspace, objects: BaseObjectStore) -> None:
    """Directories nested deeper than Python's recursion limit snapshot, restore and are
    removed without a RecursionError."""
    plain = ws.snapshot(objects)
    path = ws.root
    for _ in range(1100):
        path = path / "d"
        path.mkdir()
    (path / "bottom.txt").write_text("deep")
    try:
        deep = ws.snapshot(objects)
        ws.checkout(objects, plain)
        assert not (ws.root / "d").exists()
        ws.checkout(objects, deep)
        assert (path / "bottom.txt").read_text() == "deep"
    finally:
        # pytest removes old temp dirs with a recursive rmtree: leave nothing deep behind.
        ws.checkout(objects, plain)


def test_checkout_removes_special_files(ws: Workspace, objects: BaseObjectStore) -> None:
    """A FIFO made after a snapshot is not in its tree, and checkout removes it."""
    tree = ws.snapshot(objects)
    os.mkfifo(ws.root / "pipe")
    assert ws.snapshot(objects) == tree
    ws.checkout(objects, tree)
    assert not os.path.lexists(ws.root / "pipe")


def test_snapshot_leaves_out_excluded_dirs(ws: Workspace, objects: BaseObjectStore) -> None:
    """Excluded directories are not in a snapshot's tree."""
    (ws.root / "node_modules" / "big.js").write_text("x")
    first = ws.snapshot(objects)
    (ws.root / "node_modules" / "big.js").write_text("changed")
    assert ws.snapshot(objects) == first


def test_a_worktrees_git_file_is_never_snapshotted_nor_restored_over(
    source: Path, tmp_path: Path, objects: BaseObjectStore
) -> None:
    """A git worktree's top-level ``.git`` file is left out of snapshots and kept, unchanged,
    by a restore (it is excluded like the ``.git`` directory)."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / ".git").write_text("gitdir: /repo/.git/worktrees/ws\n")
    ws = Workspace.copy_of(source, root, DEFAULTS, keep=frozenset({".git"}))
    tree = ws.snapshot(objects)
    (root / ".git").write_text("gitdir: /tmp/evil\n")
    assert ws.snapshot(objects) == tree
    (root / "README.md").write_text("changed\n")
    ws.checkout(objects, tree)
    assert (root / "README.md").read_text() == "hello\n"
    assert (root / ".git").read_text() == "gitdir: /tmp/evil\n"


def test_copy_into_a_root_with_other_files_is_refused(source: Path, tmp_path: Path) -> None:
    """Only the names ``keep`` lists (and excludes) may be in the root a copy goes into."""
    root = tmp_path / "ws"
    write(root, {".git": "gitdir: x\n", "stray.txt": "x"})
    with pytest.raises(InvalidInput, match="not empty"):
        Workspace.copy_of(source, root, DEFAULTS, keep=frozenset({".git"}))


def test_git_is_excluded_even_when_the_setting_leaves_it_out() -> None:
    """``tools.workspace.exclude`` always holds ``.git``: a repository's hooks are never
    copied, snapshotted or applied back."""
    assert ".git" in WorkspaceSettings(exclude=["node_modules"]).exclude


def _age(root: Path) -> None:
    """Set every file's mtime an hour back (older than the racy window)."""
    old = os.stat(root).st_mtime - 3600
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.utime(Path(dirpath, name), (old, old), follow_symlinks=False)


def test_unchanged_files_are_not_read_again(ws: Workspace, objects: BaseObjectStore) -> None:
    """A second snapshot of unchanged files hashes none of them (the stat cache)."""
    _age(ws.root)
    first = ws.snapshot(objects)
    assert ws.last_hashed == 3
    assert ws.snapshot(objects) == first
    assert ws.last_hashed == 0
    (ws.root / "README.md").write_text("edited\n")
    assert ws.snapshot(objects) != first
    assert ws.last_hashed == 1


def test_same_size_change_with_old_mtime_is_seen(ws: Workspace, objects: BaseObjectStore) -> None:
    """A same-size rewrite whose mtime is set back is still seen (the ctime changed)."""
    _age(ws.root)
    first = ws.snapshot(objects)
    path = ws.root / "README.md"
    st = os.stat(path)
    path.write_text("HELLO\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ws.snapshot(objects) != first


def test_recent_files_are_hashed_each_time(ws: Workspace, objects: BaseObjectStore) -> None:
    """A file modified within the racy window is not trusted to the cache."""
    ws.snapshot(objects)
    ws.snapshot(objects)
    assert ws.last_hashed == 3


# --- diff -----------------------------------------------------------------------------------


def test_diff_shows_each_kind_of_change(ws: Workspace, objects: BaseObjectStore) -> None:
    """The diff has git headers for added, modified, deleted, binary and mode changes."""
    for link in ("escape", "src/sneaky", "inner"):
        (ws.root / link).unlink()
    (ws.root / "logo.png").write_bytes(b"\x89PNG\0\0old")
    base = ws.snapshot(objects)
    (ws.root / "README.md").write_text("hello\nworld\n")
    (ws.root / "src" / "util.py").unlink()
    (ws.root / "src" / "new.py").write_text("y = 2")
    (ws.root / "logo.png").write_bytes(b"\x89PNG\0\0new")
    (ws.root / "src" / "app.py").chmod(0o755)
    new = ws.snapshot(objects)
    diff = diff_trees(objects, base, new)

    assert "diff --git a/README.md b/README.md\n" in diff
    assert "--- a/README.md\n+++ b/README.md\n" in diff and "+world\n" in diff
    assert "diff --git a/src/util.py b/src/util.py\ndeleted file mode 100644\n" in diff
    assert "+++ /dev/null\n" in diff and "-x = 1\n" in diff
    assert "new file mode 100644\n" in diff and "--- /dev/null\n+++ b/src/new.py\n" in diff
    assert "+y = 2\n\\ No newline at end of file\n" in diff
    assert "Binary files a/logo.png and b/logo.png differ\n" in diff
    assert "old mode 100644\nnew mode 100755\n" in diff
    kinds = {c.path: c.kind for c in changed_paths(objects, base, new)}
    assert kinds == {
        "README.md": ChangeKind.MODIFIED,
        "logo.png": ChangeKind.MODIFIED,
        "src/app.py": ChangeKind.MODIFIED,
        "src/new.py": ChangeKind.ADDED,
        "src/util.py": ChangeKind.DELETED,
    }


def test_diff_of_same_tree_is_empty(ws: Workspace, objects: BaseObjectStore) -> None:
    """Two equal trees have no diff and no changes."""
    tree = ws.snapshot(objects)
    assert diff_trees(objects, tree, tree) == ""
    assert changed_paths(objects, tree, tree) == []


# --- apply ----------------------------------------------------------------------------------


def _task_change(source: Path, tmp_path: Path, objects: BaseObjectStore) -> tuple[bytes, bytes]:
    """Copy ``source``, make a task's change in the copy; the base and new trees."""
    w = copy(source, tmp_path)
    base = w.snapshot(objects)
    (w.root / "README.md").write_text("hello, world\n")
    (w.root / "src" / "util.py").unlink()
    write(w.root, {"docs/guide.md": "# Guide\n", "bin/run": "#!/bin/sh\n"})
    (w.root / "bin" / "run").chmod(0o755)
    (w.root / "latest").symlink_to("docs/guide.md")
    return base, w.snapshot(objects)


def test_apply_brings_the_change_back(
    source: Path, tmp_path: Path, objects: BaseObjectStore
) -> None:
    """Apply writes added and modified files, deletes deleted ones, keeps modes and links."""
    base, new = _task_change(source, tmp_path, objects)
    report = apply_tree(objects, base, new, source, [".git"])
    assert tree_of(source) == {
        "README.md": "hello, world\n",
        "src/app.py": "print('hi')\n",
        "docs/guide.md": "# Guide\n",
        "bin/run": "#!/bin/sh\n",
        "latest": "-> docs/guide.md",
    }
    assert os.stat(source / "bin" / "run").st_mode & stat.S_IXUSR
    assert {c.path: c.kind for c in report.applied} == {
        "README.md": ChangeKind.MODIFIED,
        "src/util.py": ChangeKind.DELETED,
        "docs/guide.md": ChangeKind.ADDED,
        "bin/run": ChangeKind.ADDED,
        "latest": ChangeKind.ADDED,
    }
    assert not [p for p in source.rglob("*") if p.name.startswith(".tale-tmp-")]


def test_apply_twice_changes_nothing_more(
    source: Path, tmp_path: Path, objects: BaseObjectStore
) -> None:
    """A second apply finds the change already there and writes nothing."""
    base, new = _task_change(source, tmp_path, objects)
    apply_tree(objects, base, new, source, [])
    again = apply_tree(objects, base, new, source, [])
    assert again.applied == ()
    assert len(again.unchanged) == 5


def test_apply_refuses_when_the_user_changed_a_file(
    source: Path, tmp_path: Path, objects: BaseObjectStore
) -> None:
    """A file the user changed since the copy makes apply refuse, naming it, and change
    nothing at all."""
    base, new = _task_change(source, tmp_path, objects)
    (source / "README.md").write_text("my own edit\n")
    before = tree_of(source)
    with pytest.raises(Conflict, match=r"README\.md \(changed since the copy\)") as raised:
        apply_tree(objects, base, new, source, [])
    assert raised.value.paths == ("README.md",)
    assert raised.value.message.startswith(f"1 path in {source} changed since the task copied")
    assert "nothing was applied" in raised.value.message
    assert tree_of(source) == before


def test_apply_refuses_a_file_the_user_created(
    source: Path, tmp_path: Path, objects: BaseObjectStore
) -> None:
    """A path the task adds that the user created meanwhile (other content) conflicts."""
    base, new = _task_change(source, tmp_path, objects)
    write(source, {"docs/guide.md": "mine\n"})
    with pytest.raises(Conflict) as raised:
        apply_tree(objects, base, new, source, [])
    assert raised.value.paths == ("docs/guide.md",)
    assert (source / "src" / "util.py").exists()


def test_apply_replaces_a_file_by_a_directory(
    source: Path, tmp_path: Path, objects: BaseObjectStore
) -> None:
    """A file the task turned into a directory of the same name is applied."""
    w = copy(source, tmp_path)
    base = w.snapshot(objects)
    (w.root / "README.md").unlink()
    write(w.root, {"README.md/index.md": "moved\n"})
    apply_tree(objects, base, w.snapshot(objects), source, [])
    assert (source / "README.md" / "index.md").read_text() == "moved\n"
