"""pyproject says requires-python >= 3.10: regular expressions must not use what `re` gained in 3.11 (possessive
quantifiers `++ *+ ?+ }+`, atomic groups `(?>...)`); on 3.10 they are a re.error when the module is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RE_CALLS = {"compile", "match", "search", "fullmatch", "sub", "subn", "split", "findall", "finditer"}
NEWER = re.compile(r"(?<!\\)(?:[+*?}]\+|\(\?>)")


def _pattern_text(node: ast.AST) -> str:
    """The literal parts of a pattern argument (a str, or an f-string's constant pieces)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return ""


def test_no_regex_needs_python_3_11():
    found = []
    for folder in ("qwen_tts_core", "serve", "jobs", "cluster", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RE_CALLS
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "re" and node.args):
                    text = _pattern_text(node.args[0])
                    # a "+" right after a character class's "]" or a group's ")" is an ordinary quantifier
                    if NEWER.search(text.replace("\\\\", "")):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text[:80]!r}")
    assert not found, "patterns that Python 3.10 cannot compile:\n" + "\n".join(found)
