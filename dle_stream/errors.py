"""The exceptions a user sees: :class:`DleStreamError` and the subclasses callers tell apart.

Every problem with the user's input (a file, an argument, a model package) is raised as a
:class:`DleStreamError` whose message is one line: what is wrong, where (file or
argument), and how to fix it. The CLI prints it and exits non-zero, never with a traceback.

A problem with a value the caller passed is a :class:`ParameterError` (or one of its
subclasses: :class:`TimingError`, :class:`RoiError`, :class:`EstimatorChoiceError`). Its
message names the parameter as a Python caller passed it (``hop=0: must be at least 1
frame``) and ``parameters`` lists the names; the command line renders the same message
with its own flags (``--hop 0: …``) through :meth:`ParameterError.message_for`. The
library therefore never tells a Python caller to pass a command-line flag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# A parameter inside a message: MARK name [VALUE value text] [TRUE: the value is True] MARK, with
# characters of Unicode's private use area (never in a message, and not white space, which
# the one-line messages fold)
_MARK, _VALUE, _TRUE = "\ue000", "\ue001", "\ue002"
_TOKEN = re.compile(f"{_MARK}(\\w+)(?:{_VALUE}([^{_MARK}{_TRUE}]*))?({_TRUE})?{_MARK}")
_UNSET: Any = object()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


class DleStreamError(Exception):
    """A user-facing error with a one-line message naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))

    def with_prefix(self, prefix: str) -> DleStreamError:
        """The same error (same class) with ``prefix`` before its message, e.g. the file it came from."""
        return DleStreamError(f"{prefix}{self}")


def arg(name: str, value: Any = _UNSET, *, placeholder: str | None = None) -> str:
    """Name the parameter ``name`` (a keyword argument) in a :class:`ParameterError` message
    or a warning rendered with :func:`render_parameters`.

    Without ``value`` it reads ``name`` (CLI: its flag); with it, ``name=value`` (CLI:
    ``--flag value``; a value of True, ``--flag`` alone). Strings are quoted, paths not;
    ``placeholder`` is written as it is (``arg("channel", placeholder="N")``: ``channel=N``).
    """
    if placeholder is not None:
        value = placeholder
    if value is _UNSET:
        return f"{_MARK}{name}{_MARK}"
    if value is True:
        return f"{_MARK}{name}{_VALUE}True{_TRUE}{_MARK}"
    text = repr(value) if isinstance(value, str) and placeholder is None else str(value)
    text = text.replace(_MARK, "").replace(_TRUE, "")
    return f"{_MARK}{name}{_VALUE}{text}{_MARK}"


def render_parameters(text: str, names: Mapping[str, str] | None = None) -> str:
    """``text`` with every :func:`arg` mark written out: as the Python keyword argument
    (``hop=0``), or, for a name in ``names`` (parameter → command-line flag), as the flag
    (``--hop 0``)."""
    names = names or {}

    def one(m: re.Match[str]) -> str:
        name, value, is_true = m.group(1), m.group(2), m.group(3)
        flag = names.get(name)
        if flag is None:
            return name if value is None else f"{name}={value}"
        if value is None or is_true:
            return flag
        return f"{flag} {value}"

    return _TOKEN.sub(one, text)


def parameters_in(text: str) -> tuple[str, ...]:
    """The parameter names marked with :func:`arg` in ``text``, in order of first mention."""
    return tuple(dict.fromkeys(m.group(1) for m in _TOKEN.finditer(text)))


class ParameterError(DleStreamError):
    """A value the caller passed (or the lack of one) is wrong.

    Build the message with :func:`arg` marks for the parameters it names::

        raise ParameterError(f"{arg('hop', hop)}: must be at least 1 frame")

    ``str(error)`` reads ``hop=0: must be at least 1 frame``; :meth:`message_for` with
    the CLI's flags gives ``--hop 0: must be at least 1 frame``.

    Attributes:
        parameters: the parameter names the message mentions, in order.
        template: the message with its marks (for :meth:`message_for`).
    """

    def __init__(self, message: str):
        self.template = _one_line(message)
        self.parameters = parameters_in(self.template)
        super().__init__(render_parameters(self.template))

    @property
    def parameter(self) -> str | None:
        """The first parameter the message names (the one at fault), or None."""
        return self.parameters[0] if self.parameters else None

    def message_for(self, names: Mapping[str, str]) -> str:
        """The message with the parameters in ``names`` (parameter → flag) shown as flags."""
        return render_parameters(self.template, names)

    def with_prefix(self, prefix: str) -> DleStreamError:
        return type(self)(f"{prefix}{self.template}")


class TimingError(ParameterError):
    """The scan timing is invalid, inconsistent, or lacks a field (:mod:`dle_stream.timing`);
    ``parameters`` names the :class:`~dle_stream.timing.ScanTiming` fields at fault."""


class RoiError(ParameterError):
    """A region of interest or the tile layout is unusable (:mod:`dle_stream.tiling`): outside
    the frame, malformed, two ROIs of one name, no tile to estimate."""


class EstimatorChoiceError(ParameterError):
    """The estimator or model chosen cannot serve this stream (unknown estimator, a window
    shorter than the estimator needs)."""
