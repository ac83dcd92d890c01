"""Rooms of a readable size: no product module over 400 lines, no class over 250."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("gateway", "engines", "telemetry")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def product_modules() -> list[Path]:
    return sorted(p for package in PRODUCT for p in (ROOT / package).rglob("*.py"))


def test_the_product_has_modules_to_measure() -> None:
    assert len(product_modules()) > 40


def test_no_module_over_400_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in product_modules()}
    assert not {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}


def test_no_class_over_250_lines() -> None:
    big = {}
    for path in product_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    big[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not big
