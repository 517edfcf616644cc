"""The one exception hierarchy of mlxman: every error carries an exit code and a next step."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class MlxmanError(Exception):
    """Base of every error mlxman reports to a user: a message plus the next step to take."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(MlxmanError):
    """The command line or a setting is malformed."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """The config file cannot be read or holds a bad value."""


class NotFoundError(MlxmanError):
    """A model, adapter or file does not exist where it was looked for."""


class ModelError(MlxmanError):
    """A model cannot be resolved, read or loaded."""


class AdapterError(MlxmanError):
    """An adapter is malformed, incompatible or cannot be applied."""


class MemoryBudgetError(MlxmanError):
    """A load does not fit the pool's memory budget or the machine's available memory."""


class InUseError(MlxmanError):
    """An entry cannot be changed now because requests are using it (HTTP 409)."""


class ContextError(UsageError):
    """A prompt plus its max_tokens does not fit the context the pool admitted for the model."""


class ServerError(MlxmanError):
    """The mlxman server cannot be reached or answered with an error."""


class DistributedError(MlxmanError):
    """A sharded run cannot start or goes on no further: a host, a rank or their versions."""


class Interrupted(MlxmanError):
    """The user pressed Ctrl-C."""

    exit_code = EXIT_INTERRUPTED
