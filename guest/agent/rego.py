"""The Rego engine behind the agent policy: regorus, the engine kata's agent embeds.

Imported on first use only (the library is ≈ 11 MiB): an agent without a Rego policy (the
development profile's allow-all default) never loads it. As in kata's agent, policies are Rego
v0 (kata policies say ``import future.keywords...``), and the engine's data document holds the
policy state under ``pstate``. Input and data travel as JSON text: the binding's conversion of
Python objects turns ``True`` into ``1.0``.

regorus 0.9.1 keeps its built-in policy limits (1024 columns per line, 20 000 lines, 1 MiB);
kata's agent raises them through an API that no 0.9.1 build has. A policy beyond them is
refused when it is loaded, naming the limit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from guest.agent.errors import AgentError

log = logging.getLogger(__name__)

INITIAL_DATA: dict[str, Any] = {"pstate": {}}


class RegoError(AgentError):
    """The engine refused a policy, or an evaluation failed."""


def _first_lines(err: Exception, lines: int = 8) -> str:
    text = "\n".join(line for line in str(err).splitlines() if line.strip())
    head = text.split("Stack backtrace:")[0].strip().splitlines()
    return "\n".join(head[:lines])


@dataclass(frozen=True)
class Result:
    defined: bool
    value: Any = None


class RegoEngine:
    """One compiled policy module plus its data document."""

    def __init__(self, module: str, text: str, data: dict[str, Any] | None = None) -> None:
        self.module = module
        self.text = text
        try:
            self._engine = self._compile()
        except Exception as err:  # the binding raises RuntimeError with the parser's report
            raise RegoError(f"policy {module} does not compile:\n{_first_lines(err)}") from err
        self._data: dict[str, Any] = {}
        self.replace_data(data if data is not None else INITIAL_DATA)

    def _compile(self) -> Any:
        import regorus  # deferred: only a Rego policy needs the engine

        engine = regorus.Engine()
        engine.set_rego_v0(True)
        engine.set_gather_prints(True)  # print() output: logged at debug, never on the console
        engine.add_policy(self.module, self.text)
        return engine

    @property
    def data(self) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(self._data))  # the caller may change it
        return copy

    def replace_data(self, data: dict[str, Any]) -> None:
        self._engine.clear_data()
        self._engine.add_data_json(json.dumps(data))
        self._data = json.loads(json.dumps(data))

    def evaluate(self, query: str, input_json: str) -> Result:
        """``query`` (e.g. ``data.agent_policy.ExecProcessRequest``) against ``input_json``."""
        try:
            self._engine.set_input_json(input_json)
            answer = json.loads(self._engine.eval_query_as_json(query))
        except Exception as err:
            raise RegoError(f"evaluating {query} failed: {_first_lines(err)}") from err
        finally:
            prints = self._engine.take_prints()
            if prints and log.isEnabledFor(logging.DEBUG):
                log.debug("%s printed:\n%s", query, "\n".join(prints)[:4000])
        results = answer.get("result") or []
        if not results:
            return Result(False)
        expressions = results[0].get("expressions") or []
        if len(results) != 1 or len(expressions) != 1:
            raise RegoError(f"evaluating {query} gave {len(results)} results, not one")
        return Result(True, expressions[0].get("value"))

    def covered_lines(self, query: str, input_json: str) -> set[int]:
        """The lines of this module an evaluation of ``query`` went through (on a second engine
        with the same policy and data, so the live one never runs with coverage on)."""
        try:
            probe = self._compile()
            probe.add_data_json(json.dumps(self._data))
            probe.set_enable_coverage(True)
            probe.set_input_json(input_json)
            probe.eval_query_as_json(query)
            probe.take_prints()
            report = json.loads(probe.get_coverage_report_as_json())
        except Exception:
            return set()
        lines: set[int] = set()
        for entry in report.get("files", []):
            if entry.get("path") == self.module:
                lines.update(int(n) for n in entry.get("covered", []))
        return lines

    def syntax_tree(self) -> dict[str, Any] | None:
        """The module's AST as regorus prints it (spans with lines and byte offsets)."""
        try:
            modules = json.loads(self._engine.get_ast_as_json())
        except Exception:
            return None
        for module in modules:
            if module.get("source", {}).get("file") == self.module:
                ast = module.get("ast")
                return ast if isinstance(ast, dict) else None
        return None


__all__ = ["INITIAL_DATA", "RegoEngine", "RegoError", "Result"]
