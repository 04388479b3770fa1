"""The project's own error types. Every message is one line naming the file, key or value at fault."""


class HMKDError(Exception):
    """Base class of every error hmkd raises on bad input."""


class ConfigError(HMKDError):
    """A config key, type or value is wrong (message names the key)."""


class DataError(HMKDError):
    """A data set file is unreadable or malformed (message names the file and entry)."""


class CheckpointError(HMKDError):
    """A weights file does not fit the model it is loaded into (message names the keys)."""


class NonFiniteLossError(HMKDError):
    """A loss term became NaN or infinite (message names the term and the iteration)."""
