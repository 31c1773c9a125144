"""The one exception type users see: a clear sentence, printed by the CLI without a traceback."""


class VQTError(Exception):
    """Bad input or an unsupported request; the message is one sentence meant for the user."""
