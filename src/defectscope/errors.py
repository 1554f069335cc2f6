"""The errors users can cause and fix: one base type (the CLI prints it in one line and exits 2), a kind each."""


class DefectscopeError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""


class InputError(DefectscopeError):
    """An input that cannot be used: a missing or unreadable file, image or dataset, or data a metric needs but lacks."""


class SettingsError(DefectscopeError):
    """A setting (a config field or an option) with an unknown name, a wrong type or a value out of range."""


class ModelFileError(DefectscopeError):
    """A model or deployment file that is damaged, incomplete, or written by an incompatible version."""


class ModelChanged(DefectscopeError):
    """A model file written by someone else while it was being read, or between a change's read and its write."""


class StorageError(DefectscopeError):
    """A file or database that could not be written where it belongs: a full disk, a quota, a read-only or failing
    device (the service answers 507: the request was fine, the server's storage is not)."""


class NotFittedError(DefectscopeError):
    """A model used (scored, saved, exported) before it learned anything."""


def check_fitted(learned: object, name: str, how: str = "fit()") -> None:
    """Raise NotFittedError unless `learned` (what the model learns: a bank, a network, its statistics) is there."""
    if learned is None or learned is False or (isinstance(learned, dict) and not learned):
        raise NotFittedError(f"{name} is not fitted; call {how} or load a model file")


class DataWarning(UserWarning):
    """Something in a dataset that is skipped or never read (a hidden or nested file, a mask folder of no defect):
    said by every command that reads the dataset (the CLI prints it as a `warning:` line)."""
