"""The task state machine: legal moves accepted, illegal ones rejected with a clear error."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tale_client.rpc import RpcError
from taled.errors import IllegalTransition
from taled.tasks.lifecycle import FINAL_STATES, TRANSITIONS, TaskState, check_transition
from tests.harness import Daemon

ILLEGAL_TRANSITION = -32002
# Greedy decoding answers this in a couple of tokens: a task that completes fast.
SHORT_ANSWER = "Answer yes or no: is 2 > 1?"

states = st.sampled_from(list(TaskState))
task_ids = st.from_regex(r"[0-9a-f]{12}", fullmatch=True)


@given(task_id=task_ids, targets=st.lists(states, max_size=40))
def test_random_sequences_follow_the_transition_table(
    task_id: str, targets: list[TaskState]
) -> None:
    """From `queued`, any sequence of targets is accepted exactly where TRANSITIONS allows it."""
    current = TaskState.QUEUED
    for target in targets:
        if target in TRANSITIONS[current]:
            check_transition(task_id, current, target)
            current = target
        else:
            with pytest.raises(IllegalTransition) as caught:
                check_transition(task_id, current, target)
            message = caught.value.message
            assert task_id in message
            assert str(current) in message
            assert str(target) in message
            assert caught.value.code == ILLEGAL_TRANSITION


@given(task_id=task_ids, final=st.sampled_from(sorted(FINAL_STATES)), target=states)
def test_final_states_accept_nothing(task_id: str, final: TaskState, target: TaskState) -> None:
    """A completed, failed or cancelled task cannot move anywhere, and the error says it is done."""
    with pytest.raises(IllegalTransition) as caught:
        check_transition(task_id, final, target)
    assert f"task {task_id} is already {final}" in caught.value.message
    assert str(target) in caught.value.message


@given(task_id=task_ids, current=states)
def test_no_state_transitions_to_itself(task_id: str, current: TaskState) -> None:
    """Moving a task to the state it is already in is rejected, never a silent no-op."""
    with pytest.raises(IllegalTransition):
        check_transition(task_id, current, current)


@given(
    task_id=task_ids,
    current=st.sampled_from(sorted(set(TaskState) - FINAL_STATES)),
    target=states,
)
def test_illegal_move_from_a_live_state_lists_the_allowed_ones(
    task_id: str, current: TaskState, target: TaskState
) -> None:
    """Rejecting a move out of a live state names every state the task could move to instead."""
    assume(target not in TRANSITIONS[current])
    with pytest.raises(IllegalTransition) as caught:
        check_transition(task_id, current, target)
    for allowed in TRANSITIONS[current]:
        assert str(allowed) in caught.value.message.split("allowed:")[1]


def test_the_final_states_are_completed_failed_and_cancelled() -> None:
    """Exactly completed, failed and cancelled are final."""
    assert {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED} == FINAL_STATES


def test_every_live_state_can_be_cancelled() -> None:
    """Any task that has not finished can be cancelled."""
    for state in set(TaskState) - FINAL_STATES:
        check_transition("0123456789ab", state, TaskState.CANCELLED)


def test_every_live_state_can_still_reach_completion() -> None:
    """No live state is a dead end: from each one a path leads to `completed`."""
    reaches = {TaskState.COMPLETED}
    changed = True
    while changed:
        changed = False
        for state, targets in TRANSITIONS.items():
            if state not in reaches and targets & reaches:
                reaches.add(state)
                changed = True
    assert set(TaskState) - FINAL_STATES <= reaches


def test_cancelling_a_completed_task_is_rejected_by_the_daemon(shared_daemon: Daemon) -> None:
    """Over the socket, cancelling a completed task is -32002 and the task stays completed."""
    task_id = shared_daemon.call("submit_task", text=SHORT_ANSWER)["id"]
    assert shared_daemon.wait_for(task_id)["state"] == "completed"
    with pytest.raises(RpcError) as caught:
        shared_daemon.call("cancel_task", id=task_id)
    assert caught.value.code == ILLEGAL_TRANSITION
    assert task_id in caught.value.message
    assert "completed" in caught.value.message
    assert shared_daemon.call("get_task", id=task_id)["state"] == "completed"


def test_every_state_a_pause_accepts_may_become_paused() -> None:
    """TaskQueue.pause reads a refused write as "the task moved on" and reads again."""
    from taled.tasks.queue import _PAUSABLE

    assert all(TaskState.PAUSED in TRANSITIONS[s] for s in _PAUSABLE)
