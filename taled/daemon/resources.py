"""The MCP resources surface: read-only views of tasks, schedules and the daemon.

What a resource holds is what the tool of the same subject returns: ``server.py``
reads each one through the tool handler (``tale://tasks`` is ``list_tasks``,
``task://{id}`` is ``get_task``, ...), so a resource and its tool never disagree.
This module only names the resources, parses a URI into what to read, and says
which URIs a task's change touches (for ``resources/subscribe``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import mcp_types as types

from taled.db.ids import MIN_PREFIX
from taled.db.store import TASK_ID_DIGITS
from taled.errors import NotFound

__all__ = [
    "RESOURCES",
    "TASK_URI",
    "TEMPLATES",
    "ResourceKind",
    "ResourceRef",
    "affected_by_move",
    "parse_uri",
    "subscribable",
]

_JSON = "application/json"
TASK_URI = "task://"
"""The prefix of a task's resource URI: ``task://`` then its id."""


class ResourceKind(StrEnum):
    """What a resource URI names; each is read through one tool."""

    TASKS = "tasks"
    SCHEDULES = "schedules"
    DASHBOARD = "dashboard"
    TASK = "task"
    SCHEDULE = "schedule"


@dataclass(frozen=True)
class ResourceRef:
    """A parsed resource URI: its kind and, for a template, the id it names."""

    kind: ResourceKind
    id: str = ""


RESOURCES = [
    types.Resource(
        uri="tale://tasks",
        name="tasks",
        title="Recent tasks",
        description="The most recent tasks, newest first, as the list_tasks tool returns them.",
        mime_type=_JSON,
    ),
    types.Resource(
        uri="tale://schedules",
        name="schedules",
        title="Schedules",
        description="Every schedule with its next run, as the list_schedules tool returns them.",
        mime_type=_JSON,
    ),
    types.Resource(
        uri="tale://dashboard",
        name="dashboard",
        title="Daemon status",
        description="Version, uptime, models, workers and tasks by state, as daemon_status "
        "returns them.",
        mime_type=_JSON,
    ),
]

TEMPLATES = [
    types.ResourceTemplate(
        uri_template="task://{id}",
        name="task",
        title="A task",
        description="One task (id: 12 lowercase hex digits) with its progress and subtasks, "
        "as the get_task tool returns it.",
        mime_type=_JSON,
    ),
    types.ResourceTemplate(
        uri_template="schedule://{id}",
        name="schedule",
        title="A schedule",
        description="One schedule (its id or a unique prefix of at least 4 hex digits) with "
        "the history of its runs, as the get_schedule tool returns it.",
        mime_type=_JSON,
    ),
]

_STATIC = {r.uri: ResourceRef(ResourceKind(r.name)) for r in RESOURCES}
_TASK_ID = re.compile(rf"[0-9a-f]{{{TASK_ID_DIGITS}}}")
_SCHEDULE_ID = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},{TASK_ID_DIGITS}}}")


def parse_uri(uri: str) -> ResourceRef:
    """The resource a URI names; ``NotFound`` saying what exists for any other URI."""
    if uri in _STATIC:
        return _STATIC[uri]
    scheme, sep, ident = uri.partition("://")
    if sep and scheme == "task":
        if not _TASK_ID.fullmatch(ident):
            raise NotFound(
                f"{uri}: {ident!r} is not a task id (12 lowercase hex digits, as `tale list` shows)"
            )
        return ResourceRef(ResourceKind.TASK, ident)
    if sep and scheme == "schedule":
        if not _SCHEDULE_ID.fullmatch(ident):
            raise NotFound(
                f"{uri}: {ident!r} is not a schedule id (4 to 12 lowercase hex digits, as "
                "`tale schedules` shows)"
            )
        return ResourceRef(ResourceKind.SCHEDULE, ident)
    known = ", ".join([*_STATIC, *(t.uri_template for t in TEMPLATES)])
    raise NotFound(f"no resource {uri!r}; resources: {known}")


# What resources/subscribe follows: a task, the task list and the dashboard all change
# when a task moves; schedules change on the scheduler's clock, which nothing watches.
_FOLLOWED = frozenset({ResourceKind.TASK, ResourceKind.TASKS, ResourceKind.DASHBOARD})


def subscribable(uri: str) -> bool:
    """Whether ``resources/subscribe`` can follow the (existing) resource at ``uri``."""
    return parse_uri(uri).kind in _FOLLOWED


def affected_by_move(task_id: str) -> tuple[str, ...]:
    """The resources that change when task ``task_id`` changes state (or is submitted)."""
    return (f"{TASK_URI}{task_id}", "tale://tasks", "tale://dashboard")
