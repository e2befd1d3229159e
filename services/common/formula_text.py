"""Reading formulas back from text: one tokenizer and one recursive-descent parser.

The boolean grammar of compositional explanations (NOT > AND > OR, left-associative)
is the base, read by the explainer (`explainer/compositional.py`) and by the web UI
that draws formula masks (`gateway/webui/masks.py`); the explainer's
`spatial_formulas.py` extends it with WITH, CLOSE, CLOSE TO, `&` target lists and `-X`
expansions. Consecutive bare words form one label name; a quoted name is a
JSON-style string literal.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

F = TypeVar("F")
# (kind, text); kinds: a reserved character ("(", ")", "&"), "op", "word", "quoted",
# "quoted-X" (a quoted name followed by -X).
Token = tuple[str, str]
EXPANDED = "-X"


def tokenize(text: str, keywords: Sequence[str], reserved: str) -> list[Token]:
    """Split formula text into tokens; `reserved` characters are tokens of their own."""
    chars = re.escape(reserved)
    pattern = re.compile(
        rf'\s*(?:([{chars}])|"((?:[^"\\]|\\.)*)"({EXPANDED})?|([^{chars}"\s]+))'
    )
    tokens: list[Token] = []
    position, end = 0, len(text.rstrip())
    while position < end:
        match = pattern.match(text, position)
        if not match:
            raise ValueError(f"cannot read formula {text!r} at character {position}")
        position = match.end()
        char, quoted, expanded, word = match.groups()
        if char:
            tokens.append((char, ""))
        elif quoted is not None:
            tokens.append(("quoted-X" if expanded else "quoted", re.sub(r"\\(.)", r"\1", quoted)))
        elif word.upper() in keywords:
            tokens.append(("op", word.upper()))
        else:
            tokens.append(("word", word))
    return tokens


class FormulaParser(ABC, Generic[F]):
    """Recursive descent over tokens, loosest first: top, disjunction, conjunction, negation.

    Subclasses build the formula nodes and may put looser operators above the
    disjunction (`top`); `expansions` says whether a `-X` suffix marks an expanded label.
    """

    expansions = False

    def __init__(self, tokens: list[Token], text: str) -> None:
        self.tokens, self.text, self.at = tokens, text, 0

    @abstractmethod
    def either(self, left: F, right: F) -> F:
        """`left OR right`."""

    @abstractmethod
    def both(self, left: F, right: F) -> F:
        """`left AND right`."""

    @abstractmethod
    def negated(self, operand: F) -> F:
        """`NOT operand`."""

    @abstractmethod
    def label(self, name: str, expanded: bool) -> F:
        """A label by name, expanded (`-X`) or not; ValueError for a name it does not know."""

    def unknown(self, name: str) -> ValueError:
        """The error for a label name that is not known."""
        return ValueError(f"unknown label {name!r} in {self.text!r}")

    def parse(self) -> F:
        """The whole text as one formula; ValueError if anything is left over."""
        formula = self.top()
        if self.at < len(self.tokens):
            kind, text = self.tokens[self.at]
            raise ValueError(f"unexpected {text or kind!r} in {self.text!r}")
        return formula

    def top(self) -> F:
        """The loosest-binding level (the disjunction in the boolean grammar)."""
        return self.disjunction()

    def kind(self) -> str | None:
        """The kind of the next token, None at the end."""
        return self.tokens[self.at][0] if self.at < len(self.tokens) else None

    def take(self, kind: str, text: str = "") -> bool:
        """Consume the next token if it is (kind, text)."""
        if self.at < len(self.tokens) and self.tokens[self.at] == (kind, text):
            self.at += 1
            return True
        return False

    def closing(self) -> None:
        """Consume a ')' or say it is missing."""
        if not self.take(")"):
            raise ValueError(f"missing ')' in {self.text!r}")

    def disjunction(self) -> F:
        """Conjunctions joined by OR, left-associative."""
        formula = self.conjunction()
        while self.take("op", "OR"):
            formula = self.either(formula, self.conjunction())
        return formula

    def conjunction(self) -> F:
        """Negations joined by AND, left-associative."""
        formula = self.negation()
        while self.take("op", "AND"):
            formula = self.both(formula, self.negation())
        return formula

    def negation(self) -> F:
        """NOT negation | ( top ) | a label name."""
        if self.take("op", "NOT"):
            return self.negated(self.negation())
        if self.take("("):
            formula = self.top()
            self.closing()
            return formula
        kind = self.kind()
        if kind in ("quoted", "quoted-X"):
            name, expanded = self.tokens[self.at][1], kind == "quoted-X"
            self.at += 1
            if expanded and not self.expansions:
                raise ValueError(f"no expansions ({EXPANDED}) in {self.text!r}")
        elif kind == "word":
            words = []
            while self.kind() == "word":
                words.append(self.tokens[self.at][1])
                self.at += 1
            name = " ".join(words)
            expanded = self.expansions and name.endswith(EXPANDED)
            name = name.removesuffix(EXPANDED) if expanded else name
        else:
            raise ValueError(f"expected a label name in {self.text!r}")
        return self.label(name, expanded)
