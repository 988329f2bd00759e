"""Reducers by name: methods register themselves with :func:`register_reducer`; :func:`reducer` builds one."""

from __future__ import annotations

import importlib
import dataclasses
import inspect
from typing import Any, Callable, TypeVar

from .base import Reducer, SiteFacts

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


SITE_ARGUMENTS = tuple(f.name for f in dataclasses.fields(SiteFacts))
"""Constructor arguments a method may leave to the site: ``block``, ``dim``, ``num_heads``, ``tokens_in``,
``keep`` (the :class:`SiteFacts` fields)."""


def _site_dependent(name: str, kwargs: dict[str, Any]) -> list[str]:
    """The constructor arguments of ``name`` named like site facts and not given in ``kwargs``: the site
    supplies them."""
    params = inspect.signature(reducer_class(name).__init__).parameters
    return [p for p in SITE_ARGUMENTS if p in params and p not in kwargs]


def reducer(name: str, **kwargs: Any) -> Reducer | Callable[[SiteFacts], Reducer]:
    """Build the reducer registered as ``name`` with ``kwargs``. A method whose constructor arguments
    include site facts (``dim``, ``num_heads``, ``keep``, ``tokens_in``, ``block``) not given here comes back as a per-site factory that :func:`tokendrop.attach` calls with each site's
    :class:`SiteFacts`. An unknown name or argument raises ``ValueError`` naming it and listing what is
    allowed."""
    allowed = reducer_arguments(name)
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(f"reducer_args: {name} has no argument {unknown[0]!r} "
                         f"(allowed: {', '.join(allowed) if allowed else 'none'})")
    cls = reducer_class(name)
    from_site = _site_dependent(name, kwargs)
    if not from_site:
        return cls(**kwargs)

    def per_site(facts: SiteFacts) -> Reducer:
        return cls(**kwargs, **{arg: getattr(facts, arg) for arg in from_site})

    per_site.__qualname__ = f"{cls.__name__}.per_site({', '.join(from_site)})"
    return per_site
