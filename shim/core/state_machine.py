"""Named transitions for the explicit state machines (pod, process): each transition says which
states it may start from and where it leads; misuse is FailedPrecondition."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from shim.core.errors import FailedPrecondition


class Transition(enum.Enum):
    """Base of a transition enum: members are ``(verb, sources, target)``."""

    def __init__(self, verb: str, sources: Iterable[enum.Enum], target: enum.Enum) -> None:
        self.verb = verb
        self.sources = frozenset(sources)
        self.target = target


def check(transition: Transition, state: enum.Enum) -> None:
    """FailedPrecondition("cannot <verb> in state <state>") unless ``transition`` may start
    from ``state``."""
    if state not in transition.sources:
        raise FailedPrecondition(f"cannot {transition.verb} in state {state.value}")
