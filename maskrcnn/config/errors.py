"""The error every bad config raises: its message is one line naming the file and field."""


class ConfigError(ValueError):
    """A config that cannot be used; str(error) is a one-line message for the user."""
