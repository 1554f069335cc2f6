"""The library version, in a module of its own so nothing imports it from the package root."""

__version__ = "0.1.0"
