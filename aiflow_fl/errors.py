"""One error type for everything a user can get wrong.

The CLI turns an ``AiflowError`` into a one-paragraph message (no traceback); anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class AiflowError(Exception):
    """A problem with the user's input or environment, explained in one paragraph."""
