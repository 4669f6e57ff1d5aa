"""Scripts the tests run in subprocesses (multi-process DDP), as modules from the repository
root: ``python -m tests.scripts.<name>``."""
