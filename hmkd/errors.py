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


def did_you_mean(name: object, known: "list[str] | tuple[str, ...]") -> str:
    """``"; did you mean 'hmkd'?"`` when one of ``known`` is close to ``name`` (difflib), else ``""``:
    the tail of an "unknown X" message after its list of known names."""
    import difflib

    near = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean '{near[0]}'?" if near else ""
