"""--rename FROM=TO: the same result as Python's re.sub wherever both accept the rule, RE2's linear-time
matching whatever the pattern, and every rule that does not compile (for any reason) an OptionError naming
--rename (exit 2).  Through the real script: tests/test_hostile_input.py."""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorascale.errors import OptionError
from lorascale.io.tensor_names import MAX_TENSOR_NAME_BYTES
from lorascale.plan.rename import MAX_RULE_CHARS, parse_renames, renamed

# Rules a user writes (anchored prefixes, groups, named groups, alternation, optional groups), and rules that
# exercise re.sub's corner cases (empty matches, matches next to each other, non-ASCII).
RULES = [
    r"^transformer\.h\.(\d+)\.=model.layers.\1.",
    r"\.attn\.=.self_attn.",
    r"^(?P<stem>.+)\.(?P<kind>weight|bias)$=\g<kind>.\g<stem>",
    r"(a)|(b)=[\1\2]",
    r"x*=-",
    r"(é+)=<\1>",
    r"\.(\d)\.=.0\1.",
    r"^=prefix.",
    r"$=.suffix",
    r"[^.]+=\g<0>\g<0>",
    r"(?i)LAYERS=layer",
    r"a?=\\",
]
# Not here: a pattern that prefers an empty match where a longer one exists (lazy `a??`).  After an empty
# match, Python's re.sub retries the same position for a non-empty match; RE2 cannot ask for "non-empty", so
# lorascale moves on one character (as Perl and RE2's own GlobalReplace do).  plan/rename.py says so.
NAMES = st.text(alphabet="ab.x019éLAYERSlayers_€𝄞", max_size=40)


@settings(max_examples=150, deadline=None)
@given(name=NAMES, rule=st.sampled_from(RULES))
def test_a_rule_renames_as_python_re_sub(name, rule):
    (parsed,) = parse_renames([rule])
    source, _, target = rule.partition("=")
    assert parsed.apply(name) == re.sub(source, target, name)


def test_rules_apply_in_order():
    rules = parse_renames([r"^h\.=model.layers.", r"\.attn\.=.self_attn."])
    assert renamed("h.3.attn.q_proj.weight", rules) == "model.layers.3.self_attn.q_proj.weight"


# --- Every rule that does not compile is exit 2 naming --rename --------------------------------------------


@pytest.mark.parametrize("spec, words", [
    ("a{4294967296}=x", "OverflowError"),  # crashed as an internal error (exit 70) with Python's re
    ("(" * 1500 + "a" + ")" * 1500 + "=x", "RecursionError"),  # likewise
    ("(" * 5000 + "a" + ")" * 5000 + "=x", f"limited to {MAX_RULE_CHARS} characters"),
    ("(unclosed=x", "not a valid regular expression"),
    (r"(a)\1=x", "a backreference"),
    (r"(?P<n>a)b(?P=n)c(?P<m>d)=x", "not a valid regular expression"),  # split at the first '='
    (r"(?!a)b=x", "a negative lookahead or lookbehind"),
    (r"(?<!a)b=x", "a negative lookahead or lookbehind"),
    (r"(?>ab)c=x", "an atomic group"),
    (r"a++=x", "a possessive quantifier"),
    (r"a{1001}=x", "does not compile as an RE2 pattern"),  # Python's re takes it; RE2 counts to 1000
    (r"\Z=x", "does not compile as an RE2 pattern"),
    (r"a=\n", "TO has the escape \\n"),
    (r"a=\0", "TO has the escape \\0"),
    (r"a=\2", "refers to group '2'"),
    (r"(?P<n>a)=\g<m>", "refers to group 'm'"),
    ("a=" + "b" * (MAX_RULE_CHARS + 1), f"limited to {MAX_RULE_CHARS} characters"),
])
def test_a_rule_that_does_not_compile_is_an_option_error(spec, words):
    with pytest.raises(OptionError) as caught:
        parse_renames([spec])
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert message.startswith("rename='") and words in message, message
    assert "\n" not in message and len(message) < 800


# --- Linear time: adversarial rules over the longest names the readers accept ------------------------------


@contextmanager
def _hang_guard(seconds: int):
    """Fails the test instead of hanging it: Python's re took exponential time here (never finished)."""
    def stop(*_):
        raise TimeoutError(f"renaming did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("rule, name", [
    (r"(a+)+$=x", "a" * (MAX_TENSOR_NAME_BYTES - 1) + "!"),
    (r"^(.+\.)+q_proj\.weight$=x", "a." * (MAX_TENSOR_NAME_BYTES // 2 - 8) + "q_projXweight"),
    (r"(x+x+)+y=z", "x" * MAX_TENSOR_NAME_BYTES),
    (r"(\w|\w\w)*\.=", "ab" * (MAX_TENSOR_NAME_BYTES // 2)),
])
def test_nested_quantifiers_over_long_names_finish(rule, name):
    (parsed,) = parse_renames([rule])
    with _hang_guard(60):
        result = [parsed.apply(name + str(i)) for i in range(50)]
    assert result[0] == name + "0"  # none of them matches: the names come back unchanged
