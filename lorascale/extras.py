"""Optional features and the extra that installs each: Ray (`lorascale[ray]`) and the report's figures
(`lorascale[report]`, matplotlib).  The base install compares checkpoints in-process and prints summaries;
a feature whose package is missing ends with one line naming the extra to install."""

from __future__ import annotations

import importlib.util

from lorascale.errors import OptionError

EXTRAS = {"ray": "ray", "matplotlib": "report"}  # importable module -> the extra that installs it


def require(module: str, feature: str) -> None:
    """OptionError (exit 2) naming `pip install "lorascale[EXTRA]"` when `module` cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
        found = False
    if not found:
        raise OptionError(f"{feature} needs {module}, which is not installed",
                          fix=f'pip install "lorascale[{EXTRAS[module]}]"')
