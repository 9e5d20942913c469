"""Veil: anonymize whole image datasets before they are released."""

__version__ = "0.1.0"
