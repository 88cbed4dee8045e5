"""User code without a fork: the modules a config lists under `imports:` and installed packages' `hat.plugins` entry
points, imported before anything is built, so that their `@register` decorators add models, datasets, evaluators...

A config's modules are looked up on sys.path, then in the config file's folder, then in the working directory.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hat.errors import ConfigError, HatError

ENTRY_POINT_GROUP = "hat.plugins"


def import_config_modules(names: Any, config_dir: Path) -> None:
    """Import each module of a config's `imports:` list; any failure is one ConfigError saying which and why."""
    if names is None:
        return
    if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"imports: expected a list of module names, e.g. imports: [my_models], got {names!r}")
    for folder in (config_dir, Path.cwd()):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))  # after the installed packages: a user module never shadows one of them
    for name in names:
        _import(name, f"imports: '{name}'", f"put {name.replace('.', '/')}.py next to the config ({config_dir}) or "
                                             f"in the working directory, or add its folder to PYTHONPATH")


def load_entry_points() -> None:
    """Import every module installed packages declare under the `hat.plugins` entry-point group."""
    for point in entry_points(group=ENTRY_POINT_GROUP):
        package = point.dist.name if point.dist is not None else "?"
        try:
            point.load()
        except Exception as exc:  # a broken plugin is named, never a traceback from deep inside
            raise HatError(f"plugin '{point.name}' ({ENTRY_POINT_GROUP} entry point of package {package}, "
                           f"'{point.value}') failed to import: {_cause(exc)}; fix or uninstall that package") from None


def _import(name: str, what: str, where: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise ConfigError(f"{what}: no module named '{exc.name}'; {where}") from None
        raise ConfigError(f"{what} failed to import: {_cause(exc)}") from None
    except ConfigError:
        raise
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"{what} failed to import: {_cause(exc)}") from None


def _cause(exc: BaseException) -> str:
    """The exception and the line of user code that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"
