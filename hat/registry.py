"""One registry for everything a config can name: `@register` a class or function, `build(cfg)` it.

Only registered names can be built; a config imports code only through its explicit `imports:` list (hat/plugins.py).
Registration happens the first time a name is looked up (the packages in REGISTRANTS import their modules, then
installed packages' `hat.plugins` entry points), so `import hat.quant` stays free of the engine and the data code.
"""
from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from hat.errors import RegistryError

LIST_HINT = "run `python tools/train.py --list` to see every registered name"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    obj: Callable[..., Any]


_ENTRIES: dict[str, Entry] = {}
# Everything a config can name is registered by importing these (once, at the first lookup).
REGISTRANTS = ("hat.data", "hat.evaluation", "hat.models", "hat.engine.int_infer", "hat.engine.optim",
               "hat.engine.quant_stages",
               "hat.engine.stages")


_PLUGINS_LOADED = False


def _load_registrants() -> None:
    global _PLUGINS_LOADED
    for module in REGISTRANTS:
        importlib.import_module(module)
    if not _PLUGINS_LOADED:  # installed packages' `hat.plugins` entry points (hat/plugins.py), once
        from hat.plugins import load_entry_points

        _PLUGINS_LOADED = True
        load_entry_points()


def register(obj: Callable | None = None, *, name: str | None = None, kind: str = "misc"):
    """Register a class or function under `name` (default: its own name); usable bare or with arguments."""

    def add(target: Callable) -> Callable:
        key = name or target.__name__
        if key in _ENTRIES and _ENTRIES[key].obj is not target:
            raise RegistryError(f"'{key}' is registered twice: {_ENTRIES[key].obj!r} and {target!r}; rename one")
        _ENTRIES[key] = Entry(key, kind, target)
        return target

    return add(obj) if obj is not None else add


def list_registered(kind: str | None = None) -> list[str]:
    """Sorted names, optionally of one kind ("model", "dataset", "optimizer", ...)."""
    _load_registrants()
    return sorted(n for n, e in _ENTRIES.items() if kind is None or e.kind == kind)


def kinds() -> list[str]:
    _load_registrants()
    return sorted({e.kind for e in _ENTRIES.values()})


def get(name: str, kind: str | tuple[str, ...] | None = None, where: str = "type") -> Callable:
    """The registered object called `name`; an unknown name raises with close matches and where it came from.

    `kind` (one or a tuple) restricts the lookup, so `optimizer.type: resnet18` is an error, not a surprise.
    """
    _load_registrants()
    kinds_ok = (kind,) if isinstance(kind, str) else kind
    entry = _ENTRIES.get(name)
    if entry is not None and kinds_ok is not None and entry.kind not in kinds_ok:
        raise RegistryError(f"{where}: '{name}' is of kind {entry.kind}, but this key takes kind "
                            f"{' or '.join(kinds_ok)} ({LIST_HINT} by kind)")
    if entry is None:
        candidates = [n for k in (kinds_ok or (None,)) for n in list_registered(k)]
        close = difflib.get_close_matches(str(name), candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        what = f"{' or '.join(kinds_ok)} " if kinds_ok else ""
        raise RegistryError(f"{where}: unknown {what}name '{name}'.{hint} ({LIST_HINT})")
    return entry.obj


def build(cfg: Mapping | DictConfig, where: str = "", kind: str | tuple[str, ...] | None = None,
          **extra: Any) -> Any:
    """Build `cfg['type']` with the other keys as keyword arguments; nested `type:` dicts are built first.

    `extra` adds arguments the config cannot hold (parameters, an optimizer). `where` is the config path used
    in error messages, e.g. "model.backbone".
    """
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise RegistryError(f"{where or 'config'}: expected a mapping with a 'type' key, got {cfg!r}")
    type_key = f"{where}.type" if where else "type"
    target = get(cfg["type"], kind=kind, where=type_key)
    hints, nested_kinds = _type_hints(target), (_ENTRIES[cfg["type"]].kind, *PART_KINDS)
    kwargs = {k: _build_nested(v, f"{where}.{k}" if where else k, hints.get(k), nested_kinds)
              for k, v in cfg.items() if k != "type"}
    kwargs.update(extra)
    _check_arguments(target, kwargs, where or cfg["type"])
    try:
        return target(**kwargs)
    except (ValueError, TypeError) as exc:  # the object refused these values (e.g. a negative LR)
        raise RegistryError(f"{where or cfg['type']}: {cfg['type']} rejected its arguments: {exc}") from exc


PART_KINDS = ("model", "structure", "backbone", "neck", "head", "loss")


def _build_nested(value: Any, where: str, hint: Any, kinds: tuple[str, ...]) -> Any:
    """Build a `type:` mapping inside a config: only of `kinds` (model parts, or the kind of the object it sits
    in), never a stage or an optimizer, and never for an argument that takes a plain value."""
    if isinstance(value, Mapping) and "type" in value:
        if hint is not None and _plain(hint):
            raise RegistryError(f"{where}: takes {_type_name(hint)}, not a built object; remove its `type:` key")
        return build(value, where, kind=tuple(dict.fromkeys(kinds)))
    if isinstance(value, list):
        items = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return [_build_nested(v, f"{where}[{i}]", items[0] if len(items) == 1 else hint, kinds)
                for i, v in enumerate(value)]
    return value


def _plain(hint: Any) -> bool:
    """Whether an annotation admits only plain values (numbers, strings, bools and sequences of them)."""
    args = [a for a in typing.get_args(hint) if a is not Ellipsis and a is not type(None)]
    if hint in _SIMPLE:
        return True
    return bool(args) and typing.get_origin(hint) in (typing.Union, types.UnionType, list, tuple,
                                                      collections.abc.Sequence) and all(map(_plain, args))


def _check_arguments(target: Callable, kwargs: dict, where: str) -> None:
    """Unknown keys and values of a plainly wrong type become messages naming the config key."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in params and not takes_any:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RegistryError(f"{where}.{key}: not an argument of {target.__name__}.{hint} "
                                f"Accepted: {', '.join(accepted)}")
    missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise RegistryError(f"{where}: {target.__name__} needs {', '.join(missing)}; add it to the config")
    hints = _type_hints(target)
    for key, value in kwargs.items():
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            raise RegistryError(f"{where}.{key}: expected {_type_name(expected)}, got {type(value).__name__} "
                                f"{value!r}")


def _type_hints(target: Callable) -> dict:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: skip the type check, never block the build
        return {}


_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected in _SIMPLE:
        if isinstance(value, bool) and expected in (int, float):
            return False
        return isinstance(value, _SIMPLE[expected])
    if origin in (list, tuple, collections.abc.Sequence) or expected in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return not args or all(_matches(v, args[0]) for v in value)
    return True  # anything richer (modules, callables) is checked by the object itself


def _type_name(expected: Any) -> str:
    args = [a for a in typing.get_args(expected) if a is not Ellipsis]
    base = getattr(typing.get_origin(expected) or expected, "__name__", None) or str(expected).replace("typing.", "")
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return f"{base}[{', '.join(_type_name(a) for a in args)}]" if args else base
