"""The package version, in a module of its own so any part of the harness can name it without importing
the package root (which imports the checker, which imports the store: a cycle)."""

__version__ = "0.1.0"
