"""The error every piece raises for bad user input (the CLI turns it into one line and exit code 2)."""


class ConfigError(ValueError):
    """A hyperparameter or option is out of range."""
