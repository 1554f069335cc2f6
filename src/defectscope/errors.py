"""The errors users can cause and fix: one base type (the CLI prints it in one line and exits 2), a kind each."""


class DefectscopeError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""


class InputError(DefectscopeError):
    """An input that cannot be used: a missing or unreadable file, image or dataset, or data a metric needs but lacks."""


class SettingsError(DefectscopeError):
    """A setting (a config field or an option) with an unknown name, a wrong type or a value out of range."""


class ModelFileError(DefectscopeError):
    """A model or deployment file that is damaged, incomplete, or written by an incompatible version."""
