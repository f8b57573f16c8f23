"""Exception and warning types.

Every message follows one shape: ``<where>: <what is wrong>; expected <x>, got <y>. <how to fix>``,
where *where* names the file, the experiment and the chromosome when they are known.
"""

from __future__ import annotations

import re


class EpirayError(Exception):
    """Base class of every error epiray raises for a user to read."""


class ConfigError(EpirayError):
    """A configuration file or option is invalid."""


class InputDataError(EpirayError):
    """An input file (manifest, bigWig, array, chain) is missing, malformed or inconsistent."""


class StoreError(EpirayError):
    """The track store is missing, incomplete, or does not match what the caller expects."""


class EpirayWarning(UserWarning):
    """A policy (skip, fill, clip) was applied to the data; counted and reported."""


def collect(problems: list[str], header: str, exc: type[EpirayError] = InputDataError) -> None:
    """Raise one error listing every problem at once, if there is any.

    Parameters
    ----------
    problems
        One line per problem, each already naming its file / experiment / chromosome.
    header
        The first line of the message, e.g. ``"manifest data/m.tsv: 3 problems"``.
    exc
        The exception type to raise.

    Raises
    ------
    EpirayError
        ``exc`` with ``header`` and the numbered problems, when ``problems`` is not empty.
    """
    if problems:
        lines = [f"{header}: {len(problems)} problem(s)"]
        lines += [f"  - {p}" for p in problems]
        raise exc("\n".join(lines))


# ------------------------------------------------------------------------ errors from Ray workers
#: Attributes through which Ray's wrappers hold the exception they wrap, in the order searched:
#: Ray Train's ``WorkerGroupError.worker_failures`` (rank -> the worker's exception),
#: ``ControllerError.controller_failure``, ``UserExceptionWithTraceback._base_exc`` and
#: ``WorkerHealthCheckFailedError.health_check_failure``; ``RayTaskError.cause`` (tasks, actors,
#: Ray Data, Tune trials); an ``ExceptionGroup``'s ``exceptions``; then ``raise ... from`` chains.
_PAYLOADS = (
    "worker_failures",
    "controller_failure",
    "_base_exc",
    "health_check_failure",
    "cause",
    "exceptions",
    "__cause__",
)

#: Exception types (by qualified name, so that this module never imports Ray) that only wrap
#: another exception: the user should read what they wrap instead.
_WRAPPERS = (
    "ray.exceptions.RayTaskError",
    "ray.exceptions.UserCodeException",
    "ray.data.exceptions.RayDataUserCodeException",
    "ray.train.v2._internal.exceptions.RayTrainError",
    "ray.train.base_trainer.TrainingFailedError",
    "ray.tune.error.TuneError",
)

#: The lines Python puts between the tracebacks of chained exceptions: ``raise ... from``
#: (group 1 set) or an exception raised while handling another.
_CHAIN = re.compile(
    r"\n\n(?:(The above exception was the direct cause of the following exception)"
    r"|During handling of the above exception, another exception occurred):\n"
)
#: The last line(s) of a traceback of an epiray exception: ``epiray.errors.ConfigError: ...``.
_ERROR_LINE = re.compile(r"^epiray(?:\.\w+)*\.(\w+): ", flags=re.M)


def _qualnames(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def _is_wrapper(exc: BaseException) -> bool:
    return bool(_qualnames(exc) & set(_WRAPPERS))


def _is_ray_task_error(exc: BaseException) -> bool:
    return "ray.exceptions.RayTaskError" in _qualnames(exc)


def _payloads(exc: BaseException) -> list[BaseException]:
    """The exceptions ``exc`` wraps, most specific first."""
    out: list[BaseException] = []
    for name in _PAYLOADS:
        try:
            value = getattr(exc, name, None)
        except Exception:  # a wrapper's __getattr__ may fail in odd ways
            continue
        if isinstance(value, dict):
            value = [value[k] for k in sorted(value, key=str)]
        elif isinstance(value, BaseException):
            value = [value]
        elif not isinstance(value, list | tuple):
            continue
        out += [v for v in value if isinstance(v, BaseException) and v is not exc]
    return out


def _walk(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it wraps, depth first (each once)."""
    seen: set[int] = set()
    order: list[BaseException] = []
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or len(order) > 1000:
            continue
        seen.add(id(e))
        order.append(e)
        stack.extend(reversed(_payloads(e)))
    return order


def error_from_traceback(text: str, *, final: bool = True) -> EpirayError | None:
    """The :class:`EpirayError` a formatted traceback ends with, re-made from its text.

    ``final=False`` also accepts one that an exception later in the traceback was raised from
    (``raise ... from``): Ray Data raises a ``UserCodeException`` from a UDF's exception, and
    only the text of the pair reaches the driver. Returns None when there is none.
    """
    parts = _CHAIN.split(text)  # block, direct-cause marker or None, block, ...
    blocks, direct = parts[::2], parts[1::2]
    for i in range(len(blocks) - 1, -1, -1):
        found = list(_ERROR_LINE.finditer(blocks[i]))
        if found:
            last = found[-1]
            cls = globals().get(last.group(1))
            if not (isinstance(cls, type) and issubclass(cls, EpirayError)):
                cls = EpirayError
            return cls(blocks[i][last.end() :].rstrip())
        if final or i == 0 or direct[i - 1] is None:
            return None
    return None


def unwrap(exc: BaseException) -> BaseException:
    """The exception a user should read, found inside the wrappers Ray puts around errors
    raised in its workers.

    An error raised in a Ray task, a Ray Data UDF, a Ray Train worker or a Tune trial reaches
    the driver wrapped: ``RayTaskError`` (``.cause``, and a class ``RayTaskError(<cause's
    class>)`` whose text is the whole remote traceback), Ray Train's ``WorkerGroupError``
    (``.worker_failures``) or ``ControllerError`` (``.controller_failure``), Ray Data's
    ``UserCodeException`` (only the traceback text of the original), or chained with
    ``raise ... from``.

    Returns
    -------
    BaseException
        The first :class:`EpirayError` inside (the original one, never Ray's dual-class copy
        of it); else the innermost non-wrapper exception on the first wrapped path (e.g. the
        ``ValueError`` a worker raised); else ``exc`` itself.
    """
    chain = _walk(exc)
    for e in chain:
        if isinstance(e, EpirayError) and not _is_ray_task_error(e):
            return e
    for e in chain:
        if _is_ray_task_error(e):
            found = error_from_traceback(str(e), final=False)
            if found is not None:
                return found
    for e in chain:
        if isinstance(e, EpirayError):  # a dual-class copy whose cause is gone
            return e
    e = exc
    while _is_wrapper(e):
        inner = _payloads(e)
        if not inner:
            break
        e = inner[0]
    return e
