"""The two errors a user sees as one line (speft_ds.cli.run_main)."""


class ConfigError(ValueError):
    """Bad user input: reported as one line and exit code 2, before any heavy work starts."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss): reported as one line and exit code 1."""
