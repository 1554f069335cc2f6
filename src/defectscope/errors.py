"""The one error type users can cause and fix."""


class DefectscopeError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""
