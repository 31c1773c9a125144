"""The one exception type users see: a clear sentence, printed by the CLI without a traceback."""


class VQTError(Exception):
    """Bad input or an unsupported request; the message is one sentence meant for the user."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (an empty file's EOFError)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
