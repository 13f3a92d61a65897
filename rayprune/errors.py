"""User-facing errors, and finding them again after Ray has wrapped them.

``InputError`` (a ``ValueError``) means the user's input is wrong: a config option, a
pool file, a row, a checkpoint. Its message names the option, file, row or id and what
is allowed. The command lines print it as one line, ``<prog>: error: <message>``, and
exit with ``EXIT_INPUT`` (2, as argparse does for bad flags); any other exception is a
bug or an infrastructure failure and keeps its traceback (exit status 1).

Errors raised inside Ray tasks, actors, Ray Data UDFs and Ray Train workers reach the
driver wrapped (``RayTaskError``, ``UserCodeException``, ``WorkerGroupError`` ...), and
pickling drops ``__cause__``, so :func:`user_error_message` follows the wrappers'
attributes and, failing that, reads the remote traceback text.
"""

from __future__ import annotations

import re

EXIT_INPUT = 2

# Attributes under which Ray's wrappers keep the exception they wrap.
_WRAPPED_ATTRS = ("cause", "_base_exc", "controller_failure")
_TEXT_ATTRS = ("traceback_str", "_traceback_str")


class InputError(ValueError):
    """Bad user input (option, file, row, id, checkpoint); the message says what is allowed."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def _input_error_classes() -> list[type[InputError]]:
    out: list[type[InputError]] = []
    todo: list[type[InputError]] = [InputError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def _from_text(text: str) -> str | None:
    """The message of the first ``module.SomeInputError: message`` line in a traceback text,
    among the final exception and its explicit causes."""
    text = text.rsplit("During handling of the above exception, another exception occurred:", 1)[-1]
    names = "|".join(re.escape(f"{c.__module__}.{c.__qualname__}") for c in _input_error_classes())
    match = re.search(rf"^\s*(?:{names}): (.+)$", text, flags=re.MULTILINE)
    return one_line(match.group(1)) if match else None


def _wrapped(e: BaseException, with_cause: bool = True) -> list[BaseException]:
    """The exceptions ``e`` wraps: Ray's wrapper attributes, then (optionally) ``__cause__``."""
    inner = [getattr(e, a, None) for a in _WRAPPED_ATTRS]
    inner += list((getattr(e, "worker_failures", None) or {}).values())
    if with_cause:
        inner.append(e.__cause__)
    return [w for w in inner if isinstance(w, BaseException) and w is not e]


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of the InputError behind ``exc``, or None if there is none."""
    seen: set[int] = set()
    texts: list[str] = []

    def walk(e: BaseException | None) -> str | None:
        if e is None or id(e) in seen:
            return None
        seen.add(id(e))
        wrapped = _wrapped(e, with_cause=False)
        texts.extend(t for t in (getattr(e, a, None) for a in _TEXT_ATTRS) if isinstance(t, str))
        # A RayTaskError "dual" instance is also an instance of its cause's class, but
        # its str() is the whole remote traceback: prefer the wrapped cause's message.
        if isinstance(e, InputError) and not wrapped:
            return one_line(e)
        # Only explicit causes: an error raised while *handling* an InputError is a bug.
        for inner in (*wrapped, e.__cause__):
            found = walk(inner)
            if found:
                return found
        if isinstance(e, InputError):
            return one_line(e.args[0]) if e.args and isinstance(e.args[0], str) else one_line(e)
        texts.append(str(e))
        return None

    return walk(exc) or next((m for m in map(_from_text, texts) if m), None)


def error_text(exc: BaseException) -> str:
    """Everything ``exc`` says about itself: its message, the messages of the exceptions
    it wraps (Ray's wrappers and explicit causes) and the remote traceback texts."""
    seen: set[int] = set()
    parts: list[str] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        parts.append(f"{type(e).__module__}.{type(e).__qualname__}: {e}")
        parts.extend(t for t in (getattr(e, a, None) for a in _TEXT_ATTRS) if isinstance(t, str))
        todo.extend(_wrapped(e))
    return "\n".join(parts)


def is_read_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (however Ray wrapped it) came from pyarrow failing to decode data:
    worth checking the input files to name the broken one."""
    return bool(re.search(r"pyarrow|parquet|ArrowInvalid|ArrowIOError|snappy|thrift", error_text(exc),
                          flags=re.IGNORECASE))
