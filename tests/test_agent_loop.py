"""The agent loop's history: what the model reads, and how it is squeezed when it does
not fit the model's context (the end-to-end loop is tested in tests/test_acting.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from taled.checkpoints.repo import CheckpointStore
from taled.db.acting import ActingRecords
from taled.db.store import Store, TaskRecord
from taled.errors import ContextOverflow
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.settings import AgentSettings, SandboxSettings, StoreSettings, ToolsSettings
from taled.tasks.agent import AgentLoop, CannotGoOn, LoopParts
from taled.tasks.lifecycle import TaskState
from taled.tasks.workstate import AgentState, AttemptKey, ToolStep
from taled.tools.base import ToolSpec
from taled.tools.service import Acting


def _loop(tmp_path: Path, **agent: Any) -> AgentLoop:
    settings = ToolsSettings(agent=AgentSettings(**agent))
    store = Store(tmp_path / "t.db", StoreSettings(), write_batch_max=16)
    acting = Acting(
        settings,
        SandboxSettings(),
        ActingRecords(store),
        CheckpointStore(tmp_path / "cp"),
        data_dir=tmp_path,
        scratch=tmp_path / "scratch",
    )
    return AgentLoop(acting, settings.agent, max_gate_failures=3)


def _task() -> TaskRecord:
    return TaskRecord("0123456789ab", "do it", TaskState.RUNNING, 50, None, None, 0, 0.0, 0.0)


def _agent(turns: int, result_chars: int) -> AgentState:
    steps = [
        ToolStep(
            call={"id": f"r0t{t}c1", "name": "read_file", "arguments": {"path": "a"}},
            turn=t,
            status="done",
            result=str(t) * result_chars,
        )
        for t in range(1, turns + 1)
    ]
    return AgentState(workspace="/w", base_tree="0" * 40, tree="0" * 40, steps=steps, turns=turns)


def _size(messages: list[ChatMessage]) -> int:
    return sum(len(str(m.get("content", ""))) for m in messages)


def test_every_call_in_the_history_is_followed_by_its_result(tmp_path: Path) -> None:
    messages = _loop(tmp_path).messages(_task(), _agent(3, 10))
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user"] + ["assistant", "tool"] * 3
    for call, result in zip(messages[2::2], messages[3::2], strict=True):
        assert call["tool_calls"][0]["id"] == result["tool_call_id"]  # type: ignore[typeddict-item]


def test_older_results_shrink_once_the_history_passes_its_budget(tmp_path: Path) -> None:
    loop = _loop(tmp_path, history_chars=2000)
    roomy = loop.messages(_task(), _agent(6, 100))
    assert _size(roomy) >= 600  # under budget: whole
    tight = loop.messages(_task(), _agent(6, 1000))
    assert "[... shortened ...]" in str(tight[3]["content"])
    assert "[... shortened ...]" not in str(tight[-1]["content"])  # the newest stays whole


def test_each_squeeze_sends_less_and_the_last_keeps_only_the_newest_turn(
    tmp_path: Path,
) -> None:
    loop = _loop(tmp_path, history_chars=2000)
    agent = _agent(6, 1000)
    sizes = [_size(loop.messages(_task(), agent, squeeze)) for squeeze in range(4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[3] < sizes[0]
    last = loop.messages(_task(), agent, 3)
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool"]


def _parts(calls: list[int], fits: int) -> LoopParts:
    async def call_model(
        messages: list[ChatMessage], _tools: list[ToolSpec], _key: AttemptKey
    ) -> Completion:
        calls.append(_size(messages))
        if _size(messages) > fits:
            raise ContextOverflow("the prompt is too long")
        return Completion("done", 1, 1, 0.0, 0.0, 0.0, "stop")

    async def unused(*_args: Any) -> Any:
        raise AssertionError("not called")

    return LoopParts(call_model=call_model, save=unused, gate=unused, token=CancelToken())


def test_a_turn_that_does_not_fit_is_sent_again_squeezed(tmp_path: Path) -> None:
    loop = _loop(tmp_path, history_chars=2000)
    calls: list[int] = []
    agent = _agent(6, 1000)
    done = asyncio.run(
        loop._turn(_task(), agent, [], AttemptKey("act", 7), _parts(calls, fits=2500))
    )
    assert done.text == "done"
    assert len(calls) >= 2 and calls[-1] <= 2500 < calls[0]


def test_a_history_that_never_fits_ends_the_task_saying_why(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    with pytest.raises(CannotGoOn, match="no longer fits the model's context"):
        asyncio.run(loop._turn(_task(), _agent(3, 10), [], AttemptKey("act", 4), _parts([], 1)))
