"""A task's workspace as a git worktree of the user's repository, on branch ``tale/<id>``.

When ``--in DIR`` names the top of a git work tree with at least one commit, the task
works in a worktree of that repository instead of a plain managed copy:

    detect(DIR)            the work tree's top, or None (the caller copies instead)
    add(DIR, root, branch) git worktree add --no-checkout -B tale/<id> root HEAD;
                           returns the worktree's administrative directory
    (the caller copies DIR's files into root, uncommitted changes included)
    begin(...)             index = HEAD; what differs from HEAD (the user's uncommitted
                           changes) becomes the branch's first commit; returns the base
    commit_result(...)     the workspace at the task's end, committed on the branch
    discard(DIR, root)     the worktree removed (a failed start, or a forgotten task)
    delete_branch(...)     a forgotten task's branch deleted, unless someone else
                           committed on it (its commits' messages hold the task's title)

Only the administrative directory read by ``add`` — while the worktree still held
nothing but what git wrote — is trusted afterwards. The workspace's own ``.git`` file
is not: a command in the sandbox can rewrite it (``gitdir: /tmp/evil``, with hooks).
So git runs on the workspace with an explicit ``--git-dir`` and ``--work-tree``, hooks
and fsmonitor off, and a clean environment.

Every git call goes through ``asyncio.create_subprocess_exec`` (never a shell) with a
timeout; a failure raises ``TaleError`` (``Unavailable`` when git is missing or hangs)
with git's own last line of complaint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from taled.errors import TaleError, Unavailable

__all__ = [
    "GitResult",
    "add",
    "begin",
    "branch_for",
    "commit_result",
    "delete_branch",
    "detect",
    "discard",
]

log = logging.getLogger(__name__)

# Long enough for `git add -A` over a big work tree on a slow disk; a git that takes
# longer is taken to hang.
_TIMEOUT_SECONDS = 300.0
# Said to git on every call. Hooks and fsmonitor are programs git would run: none runs
# from the daemon, least of all one a model could have named. No signing (it may need a
# pinentry nobody answers), no automatic gc in the user's repository behind their back.
_SAFE = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "gc.auto=0",
    "-c",
    "maintenance.auto=false",
)
# What git gets from the daemon's environment (never GIT_DIR, GIT_WORK_TREE, GIT_INDEX_FILE
# or other GIT_* variables that would point it elsewhere).
_KEPT_ENV = ("PATH", "HOME", "USER", "LOGNAME", "XDG_CONFIG_HOME", "TMPDIR")
_HEX = re.compile(r"[0-9a-f]{7,64}")
_IDENTITY = {
    "GIT_AUTHOR_NAME": "tale",
    "GIT_AUTHOR_EMAIL": "tale@localhost",
    "GIT_COMMITTER_NAME": "tale",
    "GIT_COMMITTER_EMAIL": "tale@localhost",
}


@dataclass(frozen=True)
class GitResult:
    """What one git call said."""

    code: int
    out: str
    err: str


def branch_for(task_id: str) -> str:
    """The branch a task's worktree is on."""
    return f"tale/{task_id}"


async def detect(source: Path) -> Path | None:
    """``source`` resolved, when it is the top of a non-bare git work tree with at least
    one commit and git is installed; otherwise None, with the reason logged."""
    top = Path(source).resolve()
    if shutil.which("git") is None:
        log.info("%s: git is not installed; the task works in a managed copy", top)
        return None
    if not (top / ".git").exists():
        return None  # not a repository's top: nothing to say
    try:
        shown = await _git("-C", str(top), "rev-parse", "--show-toplevel", check=False)
        if shown.code != 0:
            why = _last_line(shown.err) or "git rev-parse failed"
            log.info("%s is not a git work tree (%s); the task works in a managed copy", top, why)
            return None
        if Path(shown.out.strip()).resolve() != top:
            log.info(
                "%s is inside the git work tree %s, not its top; the task works in a managed copy",
                top,
                shown.out.strip(),
            )
            return None
        head = await _git("-C", str(top), "rev-parse", "--verify", "-q", "HEAD", check=False)
    except TaleError as exc:
        log.info("%s: %s; the task works in a managed copy", top, exc.message)
        return None
    if head.code != 0:
        log.info("%s is a git repository with no commits yet; the task works in a copy", top)
        return None
    return top


async def add(repo: Path, root: Path, branch: str) -> Path:
    """Make ``root`` (absent) a worktree of ``repo`` on ``branch`` at HEAD, its files not
    checked out; returns the worktree's administrative directory.

    ``-B``: a task made again after a crash before its first checkpoint resets its
    branch; ``worktree prune`` first, so a stale worktree at ``root`` is forgotten.
    """
    await _git("-C", str(repo), "worktree", "prune")
    await _git(
        "-C", str(repo), "worktree", "add", "-q", "--no-checkout", "-B", branch, str(root), "HEAD"
    )
    # Read now, while root holds only what git itself wrote: trusted from here on.
    found = await _git("-C", str(root), "rev-parse", "--absolute-git-dir")
    git_dir = Path(found.out.strip())
    if not git_dir.is_absolute() or not (git_dir / "HEAD").is_file():
        raise TaleError(f"git gave {found.out.strip()!r} as the worktree's git directory")
    return git_dir


async def begin(git_dir: Path, root: Path, message: str, exclude: Iterable[str] = ()) -> str:
    """Once the user's files are in ``root``: the index becomes HEAD (files untouched),
    and if they differ from HEAD, that state is committed as the branch's first commit
    with ``message``. Returns the commit the task's work starts from."""
    await _tree_git(git_dir, root, "reset", "-q")
    await _tree_git(git_dir, root, "add", "-A", "--", *_pathspecs(exclude))
    same = await _tree_git(git_dir, root, "diff", "--cached", "--quiet", check=False)
    if same.code not in (0, 1):
        raise TaleError(f"git diff failed: {_last_line(same.err)}")
    if same.code == 1:
        await _tree_git(git_dir, root, "commit", "--no-verify", "-q", "-m", message)
    return (await _tree_git(git_dir, root, "rev-parse", "HEAD")).out.strip()


async def commit_result(
    git_dir: Path, root: Path, message: str, exclude: Iterable[str] = ()
) -> str:
    """Commit the workspace ``root`` as it is on the worktree's branch; the commit's id.

    Excluded directories are left as the branch has them (they were never copied, so
    their absence is no deletion); ``--allow-empty``: a task that changed nothing still
    leaves its result on the branch.
    """
    await _tree_git(git_dir, root, "add", "-A", "--", *_pathspecs(exclude))
    await _tree_git(git_dir, root, "commit", "--no-verify", "--allow-empty", "-q", "-m", message)
    return (await _tree_git(git_dir, root, "rev-parse", "HEAD")).out.strip()


async def discard(repo: Path, root: Path) -> None:
    """Best effort: forget the worktree at ``root`` (its files go with it)."""
    try:
        await _git("-C", str(repo), "worktree", "remove", "--force", str(root), check=False)
        await _git("-C", str(repo), "worktree", "prune", check=False)
    except TaleError as exc:
        log.warning("could not remove the git worktree %s: %s", root, exc.message)


async def delete_branch(repo: Path, branch: str, base: str | None) -> bool:
    """Best effort: delete a forgotten task's ``branch`` from the user's repository; True
    if it is gone (or was). Not when a commit on it since ``base`` (where the task's work
    started) is someone else's than tale's: that work is the user's, and the branch is
    left, logged. A failure (the repository moved, the branch checked out) is logged too.
    The deleted commits stay in the repository's objects until its own gc prunes them."""
    try:
        ref = f"refs/heads/{branch}"
        shown = await _git("-C", str(repo), "rev-parse", "--verify", "-q", ref, check=False)
        if shown.code != 0:
            return True  # gone already
        if base is not None and _HEX.fullmatch(base):
            authors = await _git(
                "-C", str(repo), "log", "--format=%ae%n%ce", f"{base}..{ref}", check=False
            )
            others = set(authors.out.split()) - {_IDENTITY["GIT_AUTHOR_EMAIL"]}
            if authors.code != 0 or others:
                log.warning(
                    "branch %s in %s was not deleted: it has commits that are not tale's "
                    "(%s); delete it yourself if they can go",
                    branch,
                    repo,
                    "unreadable" if authors.code else ", ".join(sorted(others)),
                )
                return False
        done = await _git("-C", str(repo), "branch", "-D", branch, check=False)
    except TaleError as exc:
        log.warning("could not delete branch %s in %s: %s", branch, repo, exc.message)
        return False
    if done.code != 0:
        log.warning(
            "could not delete branch %s in %s: %s", branch, repo, _last_line(done.err) or done.code
        )
        return False
    return True


# --- running git ---------------------------------------------------------------------


async def _tree_git(git_dir: Path, root: Path, *args: str, check: bool = True) -> GitResult:
    """git on a workspace. The work tree holds what a model wrote, its ``.git`` file
    included, so git is never left to find the repository from it: ``--git-dir`` is the
    trusted administrative directory, ``--work-tree`` the workspace, and _SAFE keeps
    hooks and fsmonitor (programs a repository's files could name) from running."""
    return await _git(f"--git-dir={git_dir}", f"--work-tree={root}", *args, check=check)


async def _git(*args: str, check: bool = True) -> GitResult:
    env = {key: os.environ[key] for key in _KEPT_ENV if key in os.environ}
    env.update(_IDENTITY, LANG="C", LC_ALL="C", GIT_TERMINAL_PROMPT="0")
    what = f"git {_verb(args)}"
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *_SAFE,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except FileNotFoundError:
        raise Unavailable("git is not installed (no `git` on PATH)") from None
    except OSError as exc:
        raise TaleError(f"could not run {what}: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _TIMEOUT_SECONDS)
    except BaseException as exc:
        # Timed out, or the task was cancelled: git does not outlive the call.
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        if isinstance(exc, TimeoutError):
            raise Unavailable(f"{what} did not finish within {_TIMEOUT_SECONDS:.0f} s") from None
        raise
    result = GitResult(
        proc.returncode if proc.returncode is not None else -1,
        out.decode("utf-8", errors="replace"),
        err.decode("utf-8", errors="replace"),
    )
    if check and result.code != 0:
        raise TaleError(f"{what} failed: {_last_line(result.err) or f'status {result.code}'}")
    return result


def _pathspecs(exclude: Iterable[str]) -> list[str]:
    """``.`` less the excluded directory names, at any depth (git never adds ``.git``)."""
    specs = ["."]
    for name in sorted(set(exclude) - {".git"}):
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in name)
        specs += [f":(exclude,glob)**/{escaped}", f":(exclude,glob)**/{escaped}/**"]
    return specs


def _verb(args: tuple[str, ...]) -> str:
    """The git subcommand among ``args`` (after -C DIR and --option=value ones)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "-C":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return "command"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
