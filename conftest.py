"""Root conftest: the harness's own pytest plugin is loaded through its pytest11 entry point."""
