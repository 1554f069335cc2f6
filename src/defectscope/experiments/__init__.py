"""Experiments: a config file of attempts, trained and evaluated in turn, compared in one table."""
