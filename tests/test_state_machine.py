"""The nydusd state machine: every legal transition, every illegal input."""

from __future__ import annotations

import pytest

from nydus_actors.exceptions import OtherError, UnexpectedEvent
from nydus_actors.models import DaemonState
from nydus_actors.state_machine import TRANSITIONS, Action, DaemonStateMachine, Fsm, Input


def machine_in(fsm: Fsm) -> DaemonStateMachine:
    machine = DaemonStateMachine()
    path = {
        Fsm.INIT: [],
        Fsm.READY: [Input.MOUNT],
        Fsm.RUNNING: [Input.MOUNT, Input.START],
        Fsm.DIE: [Input.STOP],
    }[fsm]
    for event in path:
        machine.fire(event, lambda action: None)
    assert machine.fsm is fsm
    return machine


def test_normal_start_never_shows_ready() -> None:
    machine = DaemonStateMachine()
    seen = [machine.state]
    actions: list[Action] = []
    seen.append(machine.fire(Input.MOUNT, actions.append))
    seen.append(machine.fire(Input.START, actions.append))
    assert seen == [DaemonState.INIT, DaemonState.INIT, DaemonState.RUNNING]
    assert actions == [Action.NONE, Action.START_SERVICE]


def test_takeover_then_start() -> None:
    machine = DaemonStateMachine()
    assert machine.fire(Input.TAKEOVER, lambda a: None) is DaemonState.READY
    assert machine.fire(Input.START, lambda a: None) is DaemonState.RUNNING


def test_stop_from_running_twice_unmounts() -> None:
    machine = machine_in(Fsm.RUNNING)
    actions: list[Action] = []
    assert machine.fire(Input.STOP, actions.append) is DaemonState.READY
    assert machine.fire(Input.STOP, actions.append) is DaemonState.STOPPED
    assert actions == [Action.TERMINATE_SERVICE, Action.UMOUNT]


def test_exit_does_not_unmount() -> None:
    machine = machine_in(Fsm.RUNNING)
    actions: list[Action] = []
    machine.fire(Input.STOP, actions.append)
    assert machine.fire(Input.EXIT, actions.append) is DaemonState.STOPPED
    assert Action.UMOUNT not in actions


@pytest.mark.parametrize("fsm", [Fsm.INIT, Fsm.READY, Fsm.RUNNING])
@pytest.mark.parametrize("event", list(Input))
def test_illegal_inputs_are_unexpected(fsm: Fsm, event: Input) -> None:
    if (fsm, event) in TRANSITIONS:
        return
    machine = machine_in(fsm)
    before = (machine.fsm, machine.state)
    with pytest.raises(UnexpectedEvent) as info:
        machine.fire(event, lambda a: pytest.fail("no action may run"))
    assert info.value.debug() == f'UnexpectedEvent("{event.value}")'
    assert (machine.fsm, machine.state) == before


def test_failed_action_keeps_states_in_step() -> None:
    machine = DaemonStateMachine()

    def fail(action: Action) -> None:
        raise OtherError("restore failed")

    with pytest.raises(OtherError):
        machine.fire(Input.TAKEOVER, fail)
    assert machine.fsm is Fsm.INIT and machine.state is DaemonState.INIT


def test_stopped_machine_refuses_everything() -> None:
    machine = machine_in(Fsm.DIE)
    assert machine.state is DaemonState.STOPPED
    for event in Input:
        with pytest.raises(OtherError, match="failed to send message to channel"):
            machine.fire(event, lambda a: None)
