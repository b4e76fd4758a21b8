"""The error type for bad input and failed builds: one line for the user, with what to do next."""

from __future__ import annotations


class MoeccError(Exception):
    """An expected failure (bad recipe, bad checkpoint, failed gate) reported without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ArtifactError(MoeccError):
    """An artifact that is missing, malformed, tampered with or half-written."""
