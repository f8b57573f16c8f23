"""Exception and warning types.

Every message follows one shape: ``<where>: <what is wrong>; expected <x>, got <y>. <how to fix>``,
where *where* names the file, the experiment and the chromosome when they are known.
"""

from __future__ import annotations


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
