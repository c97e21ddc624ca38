"""Explaining a policy denial: the rule that denied and, for a rule with bodies, the
expression each body stopped at and the request fields it reads (:func:`explain`). Loaded with
the first denial (:class:`guest.agent.policy.RegoPolicy`), off the agent's start-up path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from guest.agent.policy import PACKAGE
from guest.agent.rego import RegoEngine

MAX_REASON = 2000  # characters of explanation in a denial

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
