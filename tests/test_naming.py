"""NAME=REF labels: the split rule, defaults, and the errors for duplicates and bad labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorascale.errors import OptionError
from lorascale.naming import check_label, name_references, split_label


def test_split_on_the_first_equals_sign_when_the_name_is_a_label():
    assert split_label("lora-r16=org/adapter@main") == ("lora-r16", "org/adapter@main")
    assert split_label("v1.2=./runs/a=b") == ("v1.2", "./runs/a=b")
    assert split_label("org/adapter") == (None, "org/adapter")
    # Left of '=' not a label (a '/' or a space in it): the whole text is the reference.
    assert split_label("runs/lr=3e-4/final") == (None, "runs/lr=3e-4/final")
    assert split_label("my run=x") == (None, "my run=x")
    assert split_label("=./x") == (None, "=./x")


def test_an_existing_path_with_equals_is_a_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=3e-4").mkdir()
    assert split_label("lr=3e-4") == (None, "lr=3e-4")
    assert split_label(str(tmp_path / "lr=3e-4")) == (None, str(tmp_path / "lr=3e-4"))
    assert split_label("lr=3e-5") == ("lr", "3e-5")  # not a path: a label and a reference


def test_a_label_without_a_reference_is_refused():
    with pytest.raises(OptionError, match="no checkpoint reference"):
        split_label("lora=")


def test_labels_and_defaults():
    base, tuned = name_references("org/base", ["lora=./runs/a", "./runs/b/final", "org/full"])
    assert (base.reference, base.label) == ("org/base", "base")
    assert [(t.reference, t.label) for t in tuned] == [("./runs/a", "lora"), ("./runs/b/final", "final"),
                                                      ("org/full", "full")]
    base, tuned = name_references({"pre": "org/base"}, {"a": "./x", "b": "./y"})
    assert base.label == "pre" and [(t.reference, t.label) for t in tuned] == [("./x", "a"), ("./y", "b")]
    assert name_references("B=org/base", "org/t")[1][0].label == "t"  # one string is one model


@pytest.mark.parametrize(("base", "tuned", "match"), [
    ("org/base", ["x=./a", "x=./b"], "two tuned models have the label 'x'"),
    ("org/base", ["./a", "./a"], "given twice"),
    ("org/base", ["a=./x", "./x"], "given twice"),
    ("x=org/base", ["x=./a"], "the base and a tuned model"),
    ("org/base", {"bad label": "./a"}, "not a valid label"),
    ("org/base", {"ok": ""}, "non-empty"),
    ("org/base", [], "at least one tuned"),
    ({"a": "org/b", "c": "org/d"}, ["./a"], "exactly one base"),
])
def test_bad_names_are_option_errors(base, tuned, match):
    with pytest.raises(OptionError, match=match) as error:
        name_references(base, tuned)
    assert error.value.exit_code == 2


def test_label_rule():
    assert check_label("LoRA_r16.v2+x-1", role="tuned") == "LoRA_r16.v2+x-1"
    for bad in ("", "-x", "a/b", "a b", "x" * 65, 3):
        with pytest.raises(OptionError):
            check_label(bad, role="tuned")
