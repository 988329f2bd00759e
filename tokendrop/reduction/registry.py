"""Reducers by name: methods register themselves with :func:`register_reducer`; :func:`reducer` builds one."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, TypeVar

from .base import Reducer

R = TypeVar("R", bound=type[Reducer])
_REDUCERS: dict[str, type[Reducer]] = {}


def register_reducer(name: str) -> Callable[[R], R]:
    """Class decorator: make a :class:`Reducer` subclass buildable as ``tokendrop.reducer(name, **kwargs)``."""

    def decorate(cls: R) -> R:
        if name in _REDUCERS and _REDUCERS[name] is not cls:
            raise ValueError(f"reducer name {name!r} is already registered by {_REDUCERS[name].__name__}")
        _REDUCERS[name] = cls
        cls.registered_name = name
        return cls

    return decorate


def _registered() -> dict[str, type[Reducer]]:
    """The registry, with the shipped methods in it (importing :mod:`tokendrop.methods` registers them;
    ``import tokendrop`` alone does not import it)."""
    importlib.import_module("tokendrop.methods")
    return _REDUCERS


def reducer_names() -> tuple[str, ...]:
    """Names of every registered reducer, sorted."""
    return tuple(sorted(_registered()))


def reducer_class(name: str) -> type[Reducer]:
    """The class registered as ``name``; ``ValueError`` listing the names otherwise."""
    _registered()
    try:
        return _REDUCERS[name]
    except KeyError:
        raise ValueError(f"reducer: unknown method {name!r} (allowed: {', '.join(reducer_names())})") from None


def reducer_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments the reducer ``name`` accepts."""
    params = inspect.signature(reducer_class(name).__init__).parameters
    return tuple(p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                             inspect.Parameter.VAR_KEYWORD))


def reducer(name: str, **kwargs: Any) -> Reducer:
    """Build the reducer registered as ``name`` with ``kwargs``. An unknown name or argument raises
    ``ValueError`` naming it and listing what is allowed."""
    allowed = reducer_arguments(name)
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(f"reducer_args: {name} has no argument {unknown[0]!r} "
                         f"(allowed: {', '.join(allowed) if allowed else 'none'})")
    return reducer_class(name)(**kwargs)
