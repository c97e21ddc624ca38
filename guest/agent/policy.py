"""SetPolicy: an allow/deny decision per AgentService RPC (full Rego evaluation comes later).

Two document formats are accepted.

JSON (the reference format)::

    {"default": "allow", "rules": {"ExecProcess": "deny", "ReadStdout": "allow"}}

``default`` is "allow" or "deny" (or true/false); ``rules`` keys are RPC names
(``ExecProcess``) or request message names (``ExecProcessRequest``).

Rego subset, so that Kata/CoCo policy files load: only ``default <Name> := true|false`` lines
are read, e.g. ``default ExecProcessRequest := false``. A request whose default is false stays
denied even when the document has rule bodies that might allow it (bodies are not evaluated
yet); ``default AllowRequestsFailingPolicy := true`` allows everything.

Before any SetPolicy, everything is allowed. Health.Check/Version are never policed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from guest.agent.errors import InvalidArgument

_REGO_DEFAULT = re.compile(r"^\s*default\s+([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(true|false)\s*$")


def _decision(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("allow", "deny"):
        return value == "allow"
    raise InvalidArgument(f'policy: {where} must be "allow" or "deny", not {value!r}')


@dataclass(frozen=True)
class Policy:
    default: bool = True
    rules: dict[str, bool] = field(default_factory=dict)
    source_format: str = "none"

    def allows(self, rpc: str, request_type: str = "") -> bool:
        for key in (rpc, request_type):
            if key and key in self.rules:
                return self.rules[key]
        return self.default

    @classmethod
    def allow_all(cls) -> Policy:
        return cls()

    @classmethod
    def parse(cls, document: str) -> Policy:
        text = document.strip()
        if not text:
            raise InvalidArgument("policy: empty document")
        if text.startswith("{"):
            return cls._from_json(text)
        return cls._from_rego(text)

    @classmethod
    def _from_json(cls, text: str) -> Policy:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"policy: not valid JSON: {err}") from err
        if not isinstance(doc, dict):
            raise InvalidArgument("policy: the document must be a JSON object")
        unknown = set(doc) - {"default", "rules"}
        if unknown:
            raise InvalidArgument(f"policy: unknown keys {sorted(unknown)}")
        rules = doc.get("rules", {})
        if not isinstance(rules, dict):
            raise InvalidArgument("policy: rules must be an object")
        return cls(
            default=_decision(doc.get("default", "deny"), "default"),
            rules={str(k): _decision(v, f"rules.{k}") for k, v in rules.items()},
            source_format="json",
        )

    @classmethod
    def _from_rego(cls, text: str) -> Policy:
        rules: dict[str, bool] = {}
        for line in text.splitlines():
            match = _REGO_DEFAULT.match(line)
            if match:
                rules[match.group(1)] = match.group(2) == "true"
        if not rules:
            raise InvalidArgument("policy: neither JSON nor Rego with `default X := bool` lines")
        allow_failing = rules.pop("AllowRequestsFailingPolicy", False)
        return cls(
            default=allow_failing, rules={} if allow_failing else rules, source_format="rego"
        )
