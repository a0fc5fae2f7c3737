"""`--rename FROM=TO`: rewrite tuned tensor names before matching, in time linear in the names.

FROM is matched by RE2 (the `google-re2` package), whose automaton never backtracks: a pattern costs time
linear in the name it is matched against, whatever its nesting, so `(a+)+$` over a long adversarial name
is as quick as `a`.  A rule must also be a valid Python regular expression, so that it means what a Python
user reads in it; the two dialects agree on everything a rename needs (classes, groups, named groups,
alternation, anchors, counted repetition up to 1000).  What RE2 leaves out, because it cannot be matched in
linear time, is refused with its name: backreferences (`\\1`, `(?P=name)`), lookarounds (`(?=`, `(?!`,
`(?<=`, `(?<!`), conditional groups, atomic groups and possessive quantifiers.  Differences that remain:
`\\d`, `\\w`, `\\s` and `\\b` are ASCII-only in RE2, and `$` matches only at the very end (tensor names hold
no newline).

TO is a literal with group references `\\1`..`\\99`, `\\g<1>`, `\\g<name>` and `\\\\` for a backslash; any
other escape is refused.  Replacement follows Python's `re.sub`: every non-overlapping match, left to right,
empty matches included; one difference: after an empty match the next match starts one character later,
where Python's re would first retry the same position for a non-empty match (it matters only for a pattern
that prefers the empty match, such as a lazy `a??`).  Every refusal is an OptionError (exit 2) naming --rename.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import re2

from lorascale.errors import MismatchError, OptionError, option

# No rename rule needs more; it also bounds what Python's parser and RE2's compiler are given.
MAX_RULE_CHARS = 4096
_FIX = ("FROM is a regular expression in Python syntax, matched by RE2, so without backreferences or "
        "lookarounds; TO may use \\1 or \\g<name> for its groups")
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print its own message on stderr; ours is the one line


@dataclass(frozen=True)
class Rename:
    """One compiled rule: FROM as an RE2 program over UTF-8 bytes, TO as literal bytes and group references."""

    spec: str
    pattern: object  # re2._Regexp over bytes
    template: tuple[bytes | int, ...]

    def apply(self, name: str) -> str:
        """`re.sub(FROM, TO, name)`, matched by RE2: linear in len(name) per match."""
        text = name.encode("utf-8", "surrogatepass")
        pieces: list[bytes] = []
        copied = position = 0
        while position <= len(text):
            match = self.pattern.search(text, position)
            if match is None:
                break
            start, end = match.span()
            pieces.append(text[copied:start])
            pieces.extend(piece if isinstance(piece, bytes) else (match.group(piece) or b"")
                          for piece in self.template)
            copied = end
            if end > start:
                position = end
                continue
            # An empty match: step over one whole character, so that no later match splits a UTF-8 sequence.
            position = end + 1
            while position < len(text) and text[position] & 0xC0 == 0x80:
                position += 1
        pieces.append(text[copied:])
        try:
            return b"".join(pieces).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise MismatchError(f"{option('rename', _shown(self.spec))} cuts the name {name[:80]!r} inside a "
                                "character", fix="make the pattern match whole characters") from None


def _shown(spec: str) -> str:
    return spec if len(spec) <= 120 else f"{spec[:120]}..."


def _refuse(spec: str, why: str) -> OptionError:
    return OptionError(f"{option('rename', _shown(spec))}: {why}", fix=_FIX)


def parse_renames(specs: Sequence[str]) -> tuple[Rename, ...]:
    """The rename rules "FROM=TO", in the order given; a rule that does not compile, for any reason, is an
    OptionError naming it (exit 2)."""
    rules = []
    for spec in specs:
        source, sep, target = spec.partition("=")
        if not sep or not source:
            raise OptionError(f"{option('rename', _shown(spec))} is not FROM=TO",
                              fix="e.g. " + option("rename", "^transformer\\.=model."))
        if len(source) > MAX_RULE_CHARS or len(target) > MAX_RULE_CHARS:
            raise _refuse(spec, f"FROM and TO are limited to {MAX_RULE_CHARS} characters each")
        _check_python_syntax(spec, source)
        pattern = _compile(spec, source)
        rules.append(Rename(spec, pattern, _template(spec, target, pattern)))
    return tuple(rules)


def _check_python_syntax(spec: str, source: str) -> None:
    """FROM must be a Python regular expression, compiled (never matched) by Python's `re`: whatever makes that
    fail (re.error, OverflowError for a{4294967296}, RecursionError for thousands of nested groups, ...) is a
    refusal, not a crash."""
    try:
        re.compile(source)
    except Exception as exc:  # noqa: BLE001 - any failure to compile a user pattern is the user's to fix
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise _refuse(spec, f"FROM is not a valid regular expression ({type(exc).__name__}"
                            + (f": {detail})" if detail else ")")) from None


def _compile(spec: str, source: str):
    try:
        return re2.compile(source.encode("utf-8", "surrogatepass"), _OPTIONS)
    except Exception as exc:  # noqa: BLE001 - re2.error, or anything else its compiler raises: refused
        error = exc
    feature = _unsupported_feature(source)
    if feature is not None:
        raise _refuse(spec, f"FROM uses {feature}, which lorascale does not support: patterns are matched by "
                            "RE2, in time linear in the name, and RE2 has no backreferences or lookarounds")
    reason = error.args[0] if error.args else type(error).__name__
    reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    raise _refuse(spec, f"FROM does not compile as an RE2 pattern ({reason[:200]})")


def _unsupported_feature(source: str) -> str | None:
    """The first Python-only construct in `source` (already known to parse), for the refusal's wording."""
    try:
        from re import _parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    names = {"GROUPREF": "a backreference, \\1 or (?P=name)", "GROUPREF_EXISTS": "a conditional group",
             "ASSERT": "a lookahead or lookbehind, (?=...) or (?<=...)",
             "ASSERT_NOT": "a negative lookahead or lookbehind, (?!...) or (?<!...)",
             "ATOMIC_GROUP": "an atomic group, (?>...)", "POSSESSIVE_REPEAT": "a possessive quantifier, *+, ++ or ?+"}
    try:
        stack = [sre_parse.parse(source)]
    except Exception:  # noqa: BLE001 - only wording depends on it
        return None
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)) or type(item).__name__ == "SubPattern":
            if len(item) == 2 and str(item[0]) in names:
                return names[str(item[0])]
            stack.extend(part for part in item if isinstance(part, (list, tuple)) or
                         type(part).__name__ == "SubPattern")
    return None


_REFERENCE = re.compile(r"\\(?:([1-9]\d?)|g<([^>]*)>|(\\))|\\(.?)", re.DOTALL)


def _template(spec: str, target: str, pattern) -> tuple[bytes | int, ...]:
    """TO as literal bytes and group numbers, every reference checked against FROM's groups now (a
    reference to a group that does not exist would otherwise only fail on the first name that matches)."""
    pieces: list[bytes | int] = []
    end = 0
    groups = {name.decode() if isinstance(name, bytes) else name: index
              for name, index in pattern.groupindex.items()}
    for match in _REFERENCE.finditer(target):
        pieces.append(target[end:match.start()].encode("utf-8", "surrogatepass"))
        end = match.end()
        number, name, backslash, other = match.groups()
        if backslash:
            pieces.append(b"\\")
            continue
        if other is not None:
            raise _refuse(spec, f"TO has the escape \\{other}; only \\1..\\99, \\g<name> and \\\\ are supported")
        reference = number if number is not None else name
        index = int(reference) if reference.isdigit() else groups.get(reference)
        if index is None or index > pattern.groups:
            raise _refuse(spec, f"TO refers to group {reference!r}, which FROM does not have")
        pieces.append(index)
    pieces.append(target[end:].encode("utf-8", "surrogatepass"))
    return tuple(piece for piece in pieces if piece != b"")


def renamed(name: str, rules: Sequence[Rename]) -> str:
    for rule in rules:
        name = rule.apply(name)
    return name


def renamed_names(reference: str, names: Iterable[str], rules: Sequence[Rename]) -> dict[str, str]:
    """renamed name -> stored name for the names of checkpoint `reference`; two renamed alike are refused."""
    out: dict[str, str] = {}
    for name in names:
        new = renamed(name, rules)
        if new in out:
            raise MismatchError(f"{option('rename')} maps both {out[new]!r} and {name!r} to {new!r}", path=reference,
                                fix=f"make the {option('rename')} patterns more specific")
        out[new] = name
    return out
