"""Suites: the phase gates of the agent loop (``run_gate``), the shared per-model pytest suite
(``model_suite.ModelSuite``), and the op-level cases of phase 1 (``ops``).

Importing this package stays light: torch loads only when a phase runs.
"""
