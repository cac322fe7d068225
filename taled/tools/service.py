"""The acting service: one place that knows the tools a task may call, runs them, and
keeps the people-facing side (approvals, rules, diff, apply).

The agent loop (``taled.tasks.agent``) asks it for the tools and the policy, hands it
calls to run, and records approvals through it; the MCP server answers ``tale
approvals``, ``approve``, ``deny``, ``answer``, ``diff``, ``apply`` and ``tools`` from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from taled.checkpoints.repo import CheckpointStore
from taled.db.acting import ActingRecords, Approval, ApprovalKind, ApprovalState
from taled.db.store import TaskRecord
from taled.errors import IllegalTransition, InvalidInput, NotFound, TaleError, Unavailable
from taled.settings import Decision, SandboxSettings, ToolsSettings
from taled.tools import worktree
from taled.tools.base import ToolCall, ToolResult, ToolSpec
from taled.tools.builtin import BUILTIN, ToolContext, call_builtin, validate
from taled.tools.mcp_client import McpServers
from taled.tools.policy import Policy
from taled.tools.workspace import ApplyReport, Workspace, apply_tree, diff_trees, remove_tree

__all__ = ["Acting", "NewWorkspace", "WorkspaceRecord", "WorkspaceView"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkspaceView:
    """Where an acting task's files are, for diff and apply."""

    root: Path
    source: Path | None
    base_tree: str
    tree: str


class WorkspaceRecord(Protocol):
    """What ``settle_workspace`` reads of an acting task's checkpointed state (the
    runner's ``AgentState``)."""

    workspace: str
    git_dir: str | None
    branch: str | None


@dataclass(frozen=True)
class NewWorkspace:
    """A task's workspace as made at its start."""

    workspace: Workspace
    tree: str
    """The workspace's first snapshot (the diff's left side)."""
    git_dir: str | None = None
    """A git worktree's administrative directory (None: a managed copy or scratch)."""
    branch: str | None = None
    """The worktree's branch, ``tale/<task id>``."""
    git_base: str | None = None
    """The commit on that branch the task's work starts from."""

    @property
    def where(self) -> str:
        """Where the task works, for its checkpoint's message."""
        source = self.workspace.source
        if source is None:
            return "a scratch workspace"
        if self.branch is not None:
            return f"a git worktree of {source} on branch {self.branch}"
        return f"a copy of {source}"


# Lines of a task's result kept in its worktree commit's message.
_RESULT_LINES = 20
_RESULT_CHARS = 2000


class Acting:
    """Tools, policy, workspaces and approvals for acting tasks."""

    def __init__(
        self,
        settings: ToolsSettings,
        sandbox: SandboxSettings,
        records: ActingRecords,
        checkpoints: CheckpointStore,
        *,
        data_dir: Path,
        scratch: Path,
        mcp: McpServers | None = None,
    ) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.records = records
        self._checkpoints = checkpoints
        self._workspaces = data_dir / "workspaces"
        self._outputs = data_dir / "tool-output"
        self._scratch = scratch
        self.mcp = mcp
        self._policy: Policy | None = None
        # task id -> its open Workspace (keeps the snapshot's stat cache between calls)
        self._open: dict[str, Workspace] = {}

    # -- tools and policy --------------------------------------------------

    def specs(self) -> list[ToolSpec]:
        """Every tool a task's model is offered: the built-ins, then the MCP servers'."""
        specs = [b.spec for b in BUILTIN.values()]
        if self.mcp is not None:
            specs += self.mcp.tools()
        return specs

    async def policy(self) -> Policy:
        """The configured rules with the ones people added on top."""
        if self._policy is None:
            added: dict[str, Decision] = {}
            for key, decision in (await self.records.rules()).items():
                if decision in ("allow", "ask", "deny"):
                    added[key] = decision  # type: ignore[assignment]
            self._policy = Policy(self.settings.policy, added)
        return self._policy

    def server_of(self, name: str) -> str | None:
        """The MCP server a namespaced tool belongs to (None: a built-in)."""
        if name in BUILTIN or self.mcp is None:
            return None
        return self.mcp.server_of(name)

    def check(self, call: ToolCall) -> str | None:
        """Why ``call`` cannot run as written (unknown tool, bad arguments), else None."""
        if call.error:
            return call.error
        builtin = BUILTIN.get(call.name)
        if builtin is not None:
            return validate(builtin.spec, call.arguments)
        if self.server_of(call.name) is not None:
            return None  # the server validates its own arguments
        known = ", ".join(s.name for s in self.specs())
        return f"there is no tool named {call.name!r}; the tools are: {known}"

    # -- workspaces --------------------------------------------------------

    def workspace_root(self, task_id: str) -> Path:
        return self._workspaces / task_id

    def output_file(self, task_id: str, call_id: str) -> Path:
        """Where a ``run`` call's output streams (kept if the daemon dies mid-call)."""
        return self._outputs / task_id / f"{call_id}.log"

    async def create_workspace(self, task_id: str, source: str | None) -> NewWorkspace:
        """A fresh workspace for a task and its tree: a git worktree of ``source`` on
        branch ``tale/<task id>`` when it is the top of a git work tree with a commit
        (``tools.workspace.git_worktree``), else a managed copy of it, or empty.

        Whatever a crash left at the path before the task's first checkpoint is removed:
        no checkpoint names it, so it holds nothing anyone could come back to.
        """
        root = self.workspace_root(task_id)
        await self._clear(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        made: NewWorkspace | None = None
        if source is not None:
            made = await self._worktree(task_id, Path(source), root)
        if made is None:
            if source is not None:
                workspace = await asyncio.to_thread(
                    Workspace.copy_of, Path(source), root, self.settings.workspace
                )
            else:
                workspace = await asyncio.to_thread(Workspace.empty, root, self.settings.workspace)
            made = NewWorkspace(workspace, tree="")
        self._open[task_id] = made.workspace
        return dataclasses.replace(made, tree=await self.snapshot(made.workspace))

    async def _worktree(self, task_id: str, source: Path, root: Path) -> NewWorkspace | None:
        """A git worktree of ``source`` at ``root``, filled with what the user sees there
        (uncommitted changes included, committed as the branch's first commit); None
        when ``source`` is no repository's top or git fails (logged): copy instead."""
        settings = self.settings.workspace
        repo = await worktree.detect(source) if settings.git_worktree else None
        if repo is None:
            return None
        branch = worktree.branch_for(task_id)
        try:
            git_dir = await worktree.add(repo, root, branch)
        except TaleError as exc:
            log.warning("task %s: %s; it works in a managed copy instead", task_id, exc.message)
            await worktree.discard(repo, root)
            await self._clear(root)
            return None
        try:
            workspace = await asyncio.to_thread(
                Workspace.copy_of, source, root, settings, keep=frozenset({".git"})
            )
        except BaseException:
            await worktree.discard(repo, root)
            raise
        message = f"tale: the uncommitted changes in {source} when task {task_id} started"
        try:
            base = await worktree.begin(git_dir, root, message, settings.exclude)
        except TaleError as exc:
            log.warning("task %s: %s; it works in a managed copy instead", task_id, exc.message)
            await worktree.discard(repo, root)
            await self._clear(root)
            return None
        log.info("task %s works in a git worktree of %s on branch %s", task_id, repo, branch)
        return NewWorkspace(workspace, "", str(git_dir), branch, base)  # tree: taken next

    async def settle_workspace(
        self, task: TaskRecord, agent: WorkspaceRecord | None, outcome: str, detail: str
    ) -> None:
        """At an acting task's end, commit its git worktree on its branch (nothing for a
        managed copy or a scratch workspace). A git failure is logged, never the task's."""
        if agent is None or agent.git_dir is None:
            return
        about = (task.title or task.text).strip().splitlines()
        message = f"tale {task.id[:8]}: {about[0][:72] if about else 'a task'}\n\n{outcome}"
        lines = detail.strip().splitlines()[:_RESULT_LINES]
        if lines:
            message += ":\n\n" + "\n".join(lines)[:_RESULT_CHARS]
        message += "\n"
        try:
            commit = await worktree.commit_result(
                Path(agent.git_dir), Path(agent.workspace), message, self.settings.workspace.exclude
            )
        except TaleError as exc:
            log.warning(
                "task %s: its result was not committed on branch %s: %s",
                task.id,
                agent.branch,
                exc.message,
            )
            return
        log.info(
            "task %s: its result is commit %s on branch %s", task.id, commit[:12], agent.branch
        )

    async def remove_workspace(
        self, task_id: str, *, repo: str | None, branch: str | None, base: str | None
    ) -> None:
        """Forget a task's files: its workspace and its run outputs are removed; a git
        worktree's (``repo``, the user's repository, and ``branch``, as its checkpoint
        holds them) is removed with git and its branch deleted (see
        ``worktree.delete_branch``). Git's failures are logged, never raised."""
        self.close_workspace(task_id)
        root = self.workspace_root(task_id)
        if repo is not None and branch == worktree.branch_for(task_id):
            await worktree.discard(Path(repo), root)
            await worktree.delete_branch(Path(repo), branch, base)
        await self._clear(root)
        await self._clear(self._outputs / task_id)

    async def _clear(self, root: Path) -> None:
        if root.exists() or root.is_symlink():
            # Iterative removal: a deep tree a killed run left must not raise RecursionError.
            await asyncio.to_thread(remove_tree, root)

    def open_workspace(self, task_id: str, root: str, *, create: bool = False) -> Workspace:
        """The task's workspace, opened again after a restart; NotFound if it is gone
        (``create``: made empty again, for a restore to fill)."""
        workspace = self._open.get(task_id)
        if workspace is not None and workspace.root == Path(root) and Path(root).is_dir():
            return workspace
        if create:
            Path(root).mkdir(parents=True, exist_ok=True)
        if not Path(root).is_dir():
            raise NotFound(
                f"the workspace of task {task_id} ({root}) is gone: it was deleted while "
                "the task used it"
            )
        workspace = Workspace(Path(root), self.settings.workspace.exclude)
        self._open[task_id] = workspace
        return workspace

    def close_workspace(self, task_id: str) -> None:
        self._open.pop(task_id, None)

    def pinned(self) -> contextlib.AbstractContextManager[None]:
        """Hold around a snapshot and the checkpoint that names its tree (gc waits)."""
        return self._checkpoints.pinned()

    async def snapshot(self, workspace: Workspace) -> str:
        """The workspace as a tree in the checkpoint repository (hex id); take it under
        ``pinned()`` together with the checkpoint that names it."""
        tree = await self._checkpoints.with_objects(workspace.snapshot)
        return tree.decode()

    async def checkout(self, workspace: Workspace, tree: str) -> None:
        """Make the workspace equal to ``tree`` (a restore)."""
        await self._checkpoints.with_objects(
            lambda objects: workspace.checkout(objects, tree.encode())
        )

    async def diff(self, view: WorkspaceView) -> str:
        """What the task changed, as a unified diff."""
        return await self._checkpoints.with_objects(
            lambda objects: diff_trees(objects, view.base_tree.encode(), view.tree.encode())
        )

    async def apply(self, view: WorkspaceView) -> ApplyReport:
        """Bring the task's change into the user's directory; conflicts refused whole."""
        if view.source is None:
            raise InvalidInput(
                f"this task worked in a scratch workspace, not on a directory of yours: its "
                f"files are in {view.root}"
            )
        target = view.source
        if not target.is_dir():
            raise NotFound(f"{target} is gone; there is nowhere to apply the change")
        exclude = frozenset(self.settings.workspace.exclude)
        return await self._checkpoints.with_objects(
            lambda objects: apply_tree(
                objects, view.base_tree.encode(), view.tree.encode(), target, exclude
            )
        )

    # -- running calls -----------------------------------------------------

    async def run(self, task_id: str, workspace: Workspace, call: ToolCall) -> ToolResult:
        """Run one allowed call: a built-in in the workspace, or an MCP server's tool."""
        if self.server_of(call.name) is not None:
            assert self.mcp is not None
            return await self.mcp.call(call)
        output = self.output_file(task_id, call.id)
        output.parent.mkdir(parents=True, exist_ok=True)
        context = ToolContext(
            workspace=workspace,
            settings=self.settings,
            sandbox=self.sandbox,
            scratch_root=self._scratch,
            output_file=output,
        )
        try:
            return await call_builtin(call, context)
        except Unavailable as exc:
            # Fail closed: the command does not run unconfined; the model hears why.
            return ToolResult(f"{call.name} cannot run here: {exc.message}", is_error=True)

    def partial_output(self, task_id: str, call_id: str) -> str:
        """What an interrupted ``run`` call had written, its tail cut to the result size."""
        path = self.output_file(task_id, call_id)
        try:
            data = path.read_bytes()
        except OSError:
            return ""
        keep = self.settings.agent.result_chars
        text = data[-keep * 4 :].decode("utf-8", errors="replace")
        return text[-keep:]

    # -- people ------------------------------------------------------------

    async def pending(self, task_id: str | None = None) -> list[Approval]:
        return await self.records.pending(task_id)

    async def decide(
        self, ref: str, state: ApprovalState, reason: str | None, *, always: bool = False
    ) -> Approval:
        """Approve, deny or answer; ``always`` also adds the approval's rule."""
        approval = await self.records.get(ref)
        if approval.kind == ApprovalKind.QUESTION and state == ApprovalState.APPROVED:
            raise InvalidInput(
                f"{approval.id} is a question, not a tool call: answer it with "
                f"`tale answer {approval.id[:8]} TEXT`"
            )
        if approval.kind == ApprovalKind.TOOL and state == ApprovalState.ANSWERED:
            raise InvalidInput(
                f"{approval.id} asks to run {approval.tool}: `tale approve` or `tale deny` it"
            )
        if always and approval.rule is None:
            raise IllegalTransition(
                f"no rule covers calls like {approval.summary!r} (a compound command); "
                "approve it once, or write a rule in [tools.policy]"
            )
        decided = await self.records.decide(approval.id, state, reason)
        if always and approval.rule is not None:
            decision: Decision = "allow" if state == ApprovalState.APPROVED else "deny"
            await self.records.add_rule(approval.rule, decision, f"approval {approval.id}")
            self._policy = None
        return decided

    async def status(self) -> dict[str, Any]:
        """The tools for ``tale tools``: built-ins with their rule, MCP servers' health, and
        the rules people added."""
        policy = await self.policy()
        builtins = [
            {
                "name": b.spec.name,
                "description": b.spec.description,
                "kind": b.kind,
                "policy": policy.decide(ToolCall("", b.spec.name)).decision,
            }
            for b in BUILTIN.values()
        ]
        servers: list[dict[str, Any]] = []
        if self.mcp is not None:
            # Each server's tools under the names a rule takes ("NAME.tool"), with the
            # rule that decides them now.
            for status in self.mcp.status():
                tools = [
                    {
                        "name": t.name,
                        "description": t.description,
                        "policy": policy.decide(ToolCall("", t.name), status.name).decision,
                    }
                    for t in self.mcp.tools(status.name)
                ]
                servers.append({**status.as_json(), "offered": tools})
        return {"builtin": builtins, "servers": servers, "rules": await self.records.rules()}
