"""Errors the compiler raises; they share the runtime's base so one handler reports both."""

from runtime.errors import MoeccError


class RecipeError(MoeccError):
    """A recipe that does not parse or does not validate."""


class CheckpointError(MoeccError):
    """A checkpoint that is missing, malformed or does not match its architecture."""


class BuildError(MoeccError):
    """A stage that failed on valid input."""
