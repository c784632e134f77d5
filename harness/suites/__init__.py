"""Suites: the phase gates of the agent loop (``run_gate``), the shared per-model pytest suite
(``model_suite.ModelSuite``), and the op registry of phase 1 (``op_registry``, run by ``ops_phase``).

Importing this package stays light: torch loads only when a phase runs.
"""
