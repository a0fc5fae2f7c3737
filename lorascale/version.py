"""The package version, in a module of its own so that any layer can record it without importing the package's
top (lorascale/__init__.py exports the API, which sits above everything)."""

__version__ = "0.1.0"
