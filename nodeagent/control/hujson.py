"""HuJSON reading for policy files: JSON plus ``//`` and ``/* */`` comments and trailing commas.

Owns turning policy text into plain Python values while remembering where every value started, so
the policy compiler can point at the offending ``line:column`` of a semantic error as well as of a
syntax error. Positions are keyed by the value's path (a tuple of object keys and list indices).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

Path = tuple[str | int, ...]

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}
_MAX_DEPTH = 64


class HuJSONError(ValueError):
    """Bad policy text; ``line`` and ``column`` are 1-based."""

    def __init__(self, line: int, column: int, msg: str) -> None:
        super().__init__(f"{line}:{column}: {msg}")
        self.line = line
        self.column = column
        self.msg = msg


@dataclass
class Document:
    value: Any
    text: str
    positions: dict[Path, int] = field(default_factory=dict)  # path → character offset

    def where(self, path: Path) -> tuple[int, int]:
        """1-based line and column of the value at ``path`` (or its nearest known parent)."""
        p = tuple(path)
        while p not in self.positions and p:
            p = p[:-1]
        return line_col(self.text, self.positions.get(p, 0))

    def error(self, path: Path, msg: str) -> HuJSONError:
        line, col = self.where(path)
        return HuJSONError(line, col, msg)


def line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.positions: dict[Path, int] = {}

    def fail(self, msg: str, at: int | None = None) -> HuJSONError:
        line, col = line_col(self.s, self.i if at is None else at)
        return HuJSONError(line, col, msg)

    def skip(self) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t\r\n\ufeff":
                self.i += 1
            elif s.startswith("//", self.i):
                nl = s.find("\n", self.i)
                self.i = n if nl < 0 else nl + 1
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i + 2)
                if end < 0:
                    raise self.fail("unterminated /* comment")
                self.i = end + 2
            else:
                return

    def value(self, path: Path, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise self.fail("nesting too deep")
        self.skip()
        if self.i >= len(self.s):
            raise self.fail("unexpected end of input")
        self.positions[path] = self.i
        c = self.s[self.i]
        if c == "{":
            return self.obj(path, depth)
        if c == "[":
            return self.arr(path, depth)
        if c == '"':
            return self.string()
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            t = m.group()
            return float(t) if any(ch in t for ch in ".eE") else int(t)
        for word, v in _LITERALS.items():
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return v
        raise self.fail(f"unexpected character {c!r}")

    def string(self) -> str:
        try:
            v, self.i = json.decoder.scanstring(self.s, self.i + 1, True)  # type: ignore[attr-defined]
        except json.JSONDecodeError as e:
            raise self.fail(e.msg.lower(), e.pos) from None
        return v

    def obj(self, path: Path, depth: int) -> dict[str, Any]:
        self.i += 1
        out: dict[str, Any] = {}
        while True:
            self.skip()
            if self.i >= len(self.s):
                raise self.fail("unterminated object")
            if self.s[self.i] == "}":
                self.i += 1
                return out
            if self.s[self.i] != '"':
                raise self.fail("expected a quoted key or '}'")
            kpos = self.i
            key = self.string()
            if key in out:
                raise self.fail(f"duplicate key {key!r}", kpos)
            self.skip()
            if self.i >= len(self.s) or self.s[self.i] != ":":
                raise self.fail("expected ':' after key")
            self.i += 1
            out[key] = self.value((*path, key), depth + 1)
            self.skip()
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1
            elif self.i < len(self.s) and self.s[self.i] == "}":
                continue
            else:
                raise self.fail("expected ',' or '}'")

    def arr(self, path: Path, depth: int) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        while True:
            self.skip()
            if self.i >= len(self.s):
                raise self.fail("unterminated array")
            if self.s[self.i] == "]":
                self.i += 1
                return out
            out.append(self.value((*path, len(out)), depth + 1))
            self.skip()
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1
            elif self.i < len(self.s) and self.s[self.i] == "]":
                continue
            else:
                raise self.fail("expected ',' or ']'")


def parse(text: str) -> Document:
    """Parse HuJSON text; raises :class:`HuJSONError` with the line and column of the problem."""
    p = _Parser(text)
    v = p.value((), 0)
    p.skip()
    if p.i != len(text):
        raise p.fail("unexpected text after the value")
    return Document(v, text, p.positions)
