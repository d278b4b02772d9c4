"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths, addresses). The message names the field, row or file."""


class ConfigError(UserError):
    """A config file or `key=value` override is invalid."""


class DataError(UserError):
    """A data source cannot be read, or too many of its rows are bad."""
