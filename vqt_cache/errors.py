"""The one exception type users see: a clear sentence, printed by the CLI without a traceback; and the rule that a
check a reader relies on is never skipped (`recorded`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class VQTError(Exception):
    """Bad input or an unsupported request; the message is one sentence meant for the user."""


class VQTWarning(UserWarning):
    """Something that will run but likely not as meant (one sentence); the CLI prints it as `warning: ...`."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (an empty file's EOFError)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Damaged(VQTError):
    """Something vqt-cache wrote that can no longer be trusted: "<what> is damaged (<problem>); <advice>"."""

    def __init__(self, what: str, problem: str, advice: str = "delete it or restore it, then re-run") -> None:
        super().__init__(f"{what} is damaged ({problem}); {advice}")


def recorded(
    record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str, advice: str = "", field: str = ""
) -> Any:
    """The value of a checksum, hash or version field `key` that a reader is about to check something against.

    Fail closed: every artifact this vqt-cache writes carries these fields, so one that is missing, null or of
    another type is damage, never "nothing to check" (`Damaged` naming `what`, and the field as `field` when given,
    with `advice` when given). Every reader of such a field goes through here.
    """
    field = field or key
    value = record.get(key) if isinstance(record, Mapping) else None
    if value is not None and isinstance(value, kind) and not (isinstance(value, bool) and bool not in _kinds(kind)):
        return value
    if not isinstance(record, Mapping) or key not in record:
        problem = f"its {field} is missing"
    elif value is None:
        problem = f"its {field} is null"
    else:
        names = " or ".join(_NAMES.get(k, k.__name__) for k in _kinds(kind))
        problem = f"its {field} is {_NAMES.get(type(value), type(value).__name__)} ({value!r:.40}), not {names}"
    raise Damaged(what, problem, *([advice] if advice else []))


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "a table", list: "a list"}


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
