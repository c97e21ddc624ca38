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
stopped at and the request fields it reads (:func:`explain`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.message import Message

from guest.agent.errors import InvalidArgument
from guest.agent.policy_input import request_input, rule_name
from guest.agent.rego import RegoEngine, RegoError

log = logging.getLogger(__name__)

PACKAGE = "agent_policy"
CONFIDENTIAL_DEFAULT = Path(__file__).resolve().parent / "policies" / "confidential.rego"
MAX_REASON = 2000  # characters of explanation in a denial


@dataclass(frozen=True)
class Decision:
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
        self.origin = origin
        if not re.search(rf"^\s*package\s+{PACKAGE}\s*$", text, re.MULTILINE):
            raise InvalidArgument(f"policy ({origin}): not a Rego module in package {PACKAGE}")
        try:
            self.engine = RegoEngine(module, text)
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
        return self.decide_input(rule_name(request), request_input(request))

    def decide_input(self, rule: str, request: dict[str, Any]) -> Decision:
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


# -- explaining a denial ----------------------------------------------------------------------

_INPUT_REF = re.compile(r"\binput((?:\.[A-Za-z_][A-Za-z0-9_]*|\[[^\]\[]*\])*)")
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
_RULE_REF = re.compile(r"(?<![.\w])[A-Za-z_][A-Za-z0-9_]*\b(?!\s*:?=)")  # not x.name, not x :=
_ASSIGN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:?=(?!=)\s*(.+)$", re.DOTALL)
EXPLAIN_DEPTH = 3


@dataclass
class _Statement:
    line: int
    text: str


@dataclass
class _Body:
    line: int
    statements: list[_Statement]


@dataclass
class _Definition:
    line: int
    text: str  # the whole definition for a default, the head otherwise
    default: bool
    bodies: list[_Body] = field(default_factory=list)


def _span_text(source: bytes, node: Any) -> str:
    span = node.get("span", {}) if isinstance(node, dict) else {}
    start, end = span.get("start", 0), span.get("end", 0)
    if end < len(source) and source[end : end + 1] in (b'"', b"`"):
        end += 1  # a span ending in a string literal stops before its closing quote
    return source[start:end].decode(errors="replace").strip()


def _single(node: Any) -> Any:
    """The payload of a one-key {"Kind": {...}} node."""
    if isinstance(node, dict) and len(node) == 1:
        return next(iter(node.values()))
    return node


def _definitions(tree: dict[str, Any], source: bytes) -> dict[str, list[_Definition]]:
    out: dict[str, list[_Definition]] = {}
    for rule in tree.get("rules", []):
        kind, body = next(iter(rule.items()))
        line = int(body.get("span", {}).get("line", 0))
        if kind == "Default":
            name = _span_text(source, _single(body.get("refr")))
            out.setdefault(name, []).append(
                _Definition(line, _span_text(source, body), default=True)
            )
            continue
        head = _single(body.get("head"))
        if not isinstance(head, dict):
            continue
        name = _span_text(source, _single(head.get("refr")))
        bodies = []
        for rule_body in body.get("bodies") or []:
            statements = [
                _Statement(int(s.get("span", {}).get("line", 0)), _span_text(source, s))
                for s in (rule_body.get("query") or {}).get("stmts", [])
            ]
            bodies.append(_Body(int(rule_body.get("span", {}).get("line", line)), statements))
        out.setdefault(name, []).append(
            _Definition(line, _span_text(source, head), default=False, bodies=bodies)
        )
    return out


def _input_fields(statements: list[_Statement], failing: int) -> list[str]:
    """The request fields the failing statement reads, following ``x := input.…`` bindings."""
    bound: dict[str, list[str]] = {}
    for statement in statements[:failing]:
        match = _ASSIGN.match(statement.text)
        if match:
            refs = [f"input{m.group(1)}" for m in _INPUT_REF.finditer(match.group(2))]
            for name in _IDENT.findall(match.group(2)):
                refs.extend(bound.get(name, []))
            if refs:
                bound[match.group(1)] = refs
    text = statements[failing].text
    fields = [f"input{m.group(1)}" for m in _INPUT_REF.finditer(text)]
    for name in _IDENT.findall(text):
        fields.extend(bound.get(name, []))
    return list(dict.fromkeys(fields))


def _where_body_failed(
    body: _Body,
    definitions: dict[str, list[_Definition]],
    covered: set[int],
    module: str,
    depth: int,
    rule: str,
) -> str | None:
    reached = [i for i, s in enumerate(body.statements) if s.line in covered]
    if not body.statements or not reached:
        return None
    index = max(reached)
    statement = body.statements[index]
    text = f"{module}:{statement.line} `{_shorten(statement.text)}`"
    fields = _input_fields(body.statements, index)
    if fields:
        text += f" (request field{'s' if len(fields) > 1 else ''}: {', '.join(fields)})"
    if depth < EXPLAIN_DEPTH:
        for name in dict.fromkeys(_RULE_REF.findall(statement.text)):
            if name == rule:
                continue
            inner = [
                _where_body_failed(b, definitions, covered, module, depth + 1, name)
                for d in definitions.get(name, [])
                for b in d.bodies
            ]
            inner_text = [t for t in inner if t]
            if inner_text:
                text += f" ← {name} failed at " + " or ".join(inner_text)
                break
    return text


def _shorten(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def explain(engine: RegoEngine, rule: str, input_json: str, *, defined: bool) -> str:
    """Which rule denied, and where its bodies stopped (from the evaluation's coverage)."""
    tree = engine.syntax_tree()
    if tree is None:
        return f"rule {rule} denied the request"
    source = engine.text.encode()
    definitions = _definitions(tree, source)
    own = definitions.get(rule, [])
    if not own:
        return f"the policy has no rule {rule} (nor a default): denied"
    if not defined:
        return f"rule {rule} is undefined for this request and has no default: denied"
    defaults = [d for d in own if d.default]
    bodies = [b for d in own for b in d.bodies]
    covered = engine.covered_lines(f"data.{PACKAGE}.{rule}", input_json)
    failures = [
        t
        for b in bodies
        if (t := _where_body_failed(b, definitions, covered, engine.module, 0, rule))
    ]
    parts = [f"rule {rule}"]
    if failures:
        parts.append("failed at " + "; or at ".join(failures))
    elif bodies:
        parts.append("no rule body applies")
    if defaults:
        d = defaults[0]
        parts.append(f"its default `{_shorten(d.text)}` ({engine.module}:{d.line}) holds")
    reason = ": ".join(parts[:2]) + ("; " + parts[2] if len(parts) > 2 else "")
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


__all__ = [
    "CONFIDENTIAL_DEFAULT",
    "AllowAll",
    "Decision",
    "Policy",
    "RegoPolicy",
    "confidential_default",
    "explain",
]
