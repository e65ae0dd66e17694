"""Helpers for the terminal chat tests (unit and integration)."""

from __future__ import annotations


def scripted(lines: list[str]):
    """read_line for chat_loop: returns the lines in order, then end of input."""
    it = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read_line
