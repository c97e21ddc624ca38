"""Import arrows around the attestation pieces: shim never imports kbs or guest; guest never
imports shim or kbs; kbs imports neither shim, hypervisor nor guest (it is the workload owner's
side); protocols imports nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "shim": {"kbs", "guest"},
    "hypervisor": {"kbs", "guest", "shim"},
    "guest": {"shim", "kbs", "hypervisor"},
    "kbs": {"shim", "hypervisor", "guest"},
    "protocols": {"shim", "hypervisor", "guest", "kbs"},
}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_arrows(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
        if imported_roots(path) & FORBIDDEN[package]
    }
    assert offenders == {}
