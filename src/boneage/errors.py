"""Errors meant for people: each names the file or row and what is wrong.

Stages catch `BoneAgeError` once at the top and print its message without a traceback.
"""


class BoneAgeError(Exception):
    """Base of every error a user can act on."""


class ConfigError(BoneAgeError):
    """A configuration file or override is wrong."""


class InputError(BoneAgeError):
    """An input image, CSV or folder breaks the input contract."""


class StageInputError(BoneAgeError):
    """A stage's input from an earlier stage is missing or broken."""
