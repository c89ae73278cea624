"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in what the user asked for (config, paths, data). Exit code 2, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, type or component name that the schema does not accept."""
