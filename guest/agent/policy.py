"""The agent policy, on kata's contract, so that policies written for kata work here.

A Rego module in package ``agent_policy`` decides every AgentService request: the agent
evaluates ``data.agent_policy.<Request>`` (the request's message name, e.g.
``ExecProcessRequest``) with the request as ``input`` (:mod:`guest.agent.policy_input`). A rule
yields a bool, or ``{"allowed": bool, "ops": [RFC 6902 operations]}`` whose operations (applied
when allowed) update the state kept between calls under ``data.pstate``. Rules may read a
``policy_data`` document of the same module. ``AllowRequestsFailingPolicy`` (evaluated once,
with input ``{}``) turns denials into passes: a debugging aid, logged at every use.

Order, as kata's: the built-in default (:data:`CONFIDENTIAL_DEFAULT` on a confidential guest,
:class:`AllowAll` otherwise) → initdata's ``policy.rego``, installed before the agent serves
(the attested path) → SetPolicy, only when the policy in force allows the SetPolicyRequest.
A new policy starts with empty state. Health.Check/Version are never policed.

A denial is PERMISSION_DENIED, ``<Request> is blocked by policy: …``; where kata stops there,
this agent names the rule that denied and, for a rule with bodies, the expression each body
stopped at and the request fields it reads (:func:`guest.agent.policy_explain.explain`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from google.protobuf.message import Message

from guest.agent.errors import InvalidArgument

if TYPE_CHECKING:  # the Rego side loads with the first RegoPolicy: not on the path to Check
    from guest.agent.rego import RegoEngine

log = logging.getLogger(__name__)

PACKAGE = "agent_policy"
CONFIDENTIAL_DEFAULT = Path(__file__).resolve().parent / "policies" / "confidential.rego"


class Decision(NamedTuple):
    allowed: bool
    reason: str = ""  # why it was denied (or allowed despite failing)


class Policy(Protocol):
    origin: str  # where the policy came from, for logs

    def decide(self, request: Message) -> Decision: ...


class AllowAll:
    """The development default: everything allowed, no Rego engine loaded."""

    origin = "built-in development default (allow all)"

    def decide(self, request: Message) -> Decision:
        return Decision(True)


class RegoPolicy:
    """A Rego policy in package ``agent_policy`` with its state (``data.pstate``)."""

    def __init__(self, text: str, origin: str, module: str = "policy.rego") -> None:
        from guest.agent.rego import RegoEngine, RegoError

        self.origin = origin
        if not re.search(rf"^\s*package\s+{PACKAGE}\s*$", text, re.MULTILINE):
            raise InvalidArgument(f"policy ({origin}): not a Rego module in package {PACKAGE}")
        try:
            self.engine: RegoEngine = RegoEngine(module, text)
        except RegoError as err:
            raise InvalidArgument(f"policy ({origin}): {err}") from err
        self.allow_failures = self._allows_failures()
        if self.allow_failures:
            log.warning("policy (%s): AllowRequestsFailingPolicy is true: denials are ignored",
                        origin)

    def _allows_failures(self) -> bool:
        result = self.engine.evaluate(f"data.{PACKAGE}.AllowRequestsFailingPolicy", "{}")
        return result.defined and result.value is True

    def decide(self, request: Message) -> Decision:
        from guest.agent.policy_input import request_input, rule_name

        return self.decide_input(rule_name(request), request_input(request))

    def decide_input(self, rule: str, request: dict[str, Any]) -> Decision:
        import json

        from guest.agent.policy_explain import explain

        input_json = json.dumps(request)
        query = f"data.{PACKAGE}.{rule}"
        result = self.engine.evaluate(query, input_json)
        allowed = False
        if result.defined:
            allowed = self._allowed(rule, result.value)
        if allowed:
            return Decision(True)
        reason = explain(self.engine, rule, input_json, defined=result.defined)
        if self.allow_failures:
            log.warning("policy: %s would be blocked (%s); allowed by AllowRequestsFailingPolicy",
                        rule, reason)
            return Decision(True, f"AllowRequestsFailingPolicy (would be blocked: {reason})")
        return Decision(False, reason)

    def _allowed(self, rule: str, value: Any) -> bool:
        import json

        from guest.agent.rego import RegoError

        if isinstance(value, bool):
            return value
        if isinstance(value, dict) and isinstance(value.get("allowed"), bool):
            ops = value.get("ops")
            if value["allowed"] and ops:
                self._apply(rule, ops)
            return bool(value["allowed"])
        raise RegoError(f"rule {rule} gave {json.dumps(value)[:200]}, "
                        'not a bool or {"allowed": bool, "ops": [...]}')

    def _apply(self, rule: str, ops: Any) -> None:
        import jsonpatch  # deferred with the engine: only a Rego policy with state needs it

        from guest.agent.rego import RegoError

        try:
            patched = jsonpatch.apply_patch(self.engine.data, ops)
        except Exception as err:  # JsonPatchException, JsonPointerException, TypeError
            raise RegoError(f"rule {rule}: its state operations do not apply: {err}") from err
        if not isinstance(patched, dict):
            raise RegoError(f"rule {rule}: its state operations replaced the data document")
        self.engine.replace_data(patched)


def confidential_default() -> RegoPolicy:
    return RegoPolicy(CONFIDENTIAL_DEFAULT.read_text(), "built-in confidential default",
                      module=CONFIDENTIAL_DEFAULT.name)


class DeferredPolicy:
    """A policy that is compiled later, off the path to the host's first Check: the built-in
    confidential default (the engine's import and the compile cost ≈ a second of a TCG boot),
    which cannot fail to compile, so settling it later changes no start-up decision.

    The agent imports the engine in its import thread (:meth:`prepare_engine`) and compiles
    the policy (:meth:`load`) in the event loop's thread before the AgentService serves: the
    engine's objects must stay on the thread that made them. A :meth:`decide` that came first
    would compile it then: a request is never decided without the policy.
    """

    def __init__(self, origin: str, make: Callable[[], Policy]) -> None:
        self.origin = origin
        self._make = make
        self._policy: Policy | None = None

    @property
    def loaded(self) -> bool:
        return self._policy is not None

    @staticmethod
    def prepare_engine() -> None:
        """Import the engine's modules (any thread): what :meth:`load` then needs is cheap."""
        import regorus  # noqa: F401

        import guest.agent.rego  # noqa: F401

    def load(self) -> Policy:
        if self._policy is None:
            self._policy = self._make()
        return self._policy

    def decide(self, request: Message) -> Decision:
        return (self._policy or self.load()).decide(request)


def deferred_confidential_default() -> DeferredPolicy:
    return DeferredPolicy("built-in confidential default", confidential_default)


__all__ = [
    "CONFIDENTIAL_DEFAULT",
    "AllowAll",
    "Decision",
    "Policy",
    "RegoPolicy",
    "confidential_default",
]
