"""The nydusd daemon state machine (reference §4), pure and synchronous.

`DaemonActor` owns one instance and runs the actions; this module only decides
which (state, input) pairs are legal, which action each runs and which state is
exposed afterwards.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from nydus_actors.exceptions import OtherError, UnexpectedEvent
from nydus_actors.models import DaemonState

logger = logging.getLogger(__name__)


class Fsm(enum.Enum):
    """Internal states; `DIE` ends the machine."""

    INIT = "Init"
    READY = "Ready"
    RUNNING = "Running"
    DIE = "Die"


class Input(enum.Enum):
    """State-machine inputs, valued with the names clients see in `UnexpectedEvent`."""

    MOUNT = "Mount"
    TAKEOVER = "Takeover"
    START = "Start"
    STOP = "Stop"
    EXIT = "Exit"


class Action(enum.Enum):
    """What a transition does, named as in nydusd."""

    NONE = "None"
    RESTORE = "Restore"
    START_SERVICE = "StartService"
    TERMINATE_SERVICE = "TerminateService"
    UMOUNT = "Umount"
    STOP_STATE_MACHINE = "StopStateMachine"


@dataclass(frozen=True, slots=True)
class Transition:
    """Where a legal input leads: the next FSM state, the action, the exposed state."""

    to: Fsm
    action: Action
    exposed: DaemonState | None  # None leaves the exposed state as it was


TRANSITIONS: dict[tuple[Fsm, Input], Transition] = {
    # A mount during start-up leaves the exposed state at INIT: clients never see READY there.
    (Fsm.INIT, Input.MOUNT): Transition(Fsm.READY, Action.NONE, None),
    (Fsm.INIT, Input.TAKEOVER): Transition(Fsm.READY, Action.RESTORE, DaemonState.READY),
    (Fsm.INIT, Input.STOP): Transition(Fsm.DIE, Action.STOP_STATE_MACHINE, DaemonState.STOPPED),
    (Fsm.READY, Input.START): Transition(Fsm.RUNNING, Action.START_SERVICE, DaemonState.RUNNING),
    (Fsm.READY, Input.STOP): Transition(Fsm.DIE, Action.UMOUNT, DaemonState.STOPPED),
    (Fsm.READY, Input.EXIT): Transition(Fsm.DIE, Action.STOP_STATE_MACHINE, DaemonState.STOPPED),
    (Fsm.RUNNING, Input.STOP): Transition(Fsm.READY, Action.TERMINATE_SERVICE, DaemonState.READY),
}


class DaemonStateMachine:
    """Tracks the FSM state and the exposed state and applies transitions.

    Unlike nydusd, a failed action rolls the FSM back, so the FSM state and the
    exposed state never disagree (reference §4.2 allows this).
    """

    def __init__(self) -> None:
        self.fsm = Fsm.INIT
        self.state = DaemonState.INIT

    def fire(self, event: Input, run_action: Callable[[Action], None]) -> DaemonState:
        """Apply `event`, running its action; return the exposed state after it.

        Raises:
            UnexpectedEvent: the current state does not accept `event`.
            OtherError: the machine has stopped (nydusd's channel error).
        """
        if self.fsm is Fsm.DIE:
            raise OtherError("failed to send message to channel, the state machine has stopped")
        transition = TRANSITIONS.get((self.fsm, event))
        if transition is None:
            logger.warning("state machine: input %s is not accepted in state %s", event.value, self.fsm.value)
            raise UnexpectedEvent(event.value)
        run_action(transition.action)
        before = self.state
        self.fsm = transition.to
        if transition.exposed is not None:
            self.state = transition.exposed
        logger.info(
            "state machine: %s -> %s on %s (action %s)",
            before.name,
            self.state.name,
            event.value,
            transition.action.value,
        )
        return self.state
