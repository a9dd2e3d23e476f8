"""Shared kit for every voice chat service."""

__version__ = "0.1.0"
