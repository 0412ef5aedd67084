"""The configuration layer's one error type."""


class ConfigError(ValueError):
    """A configuration the user must fix; the message is one line naming the field and the fix."""
