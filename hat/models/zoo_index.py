"""The local zoo index: finished projects' weights, reusable by name (`create_model(name, pretrained=True)`).

Everything lives under `$HAT_HOME/zoo/` (default ~/.cache/hat/zoo): `index.json` (name -> model config, checkpoint
file, sha256, metrics, the project's config) and per entry `<name>.pt` (float weights) and, once the project ran
QAT and int_infer, `<name>.qat.pt` and `<name>.hir` (a deployable entry). Nothing downloads: an entry comes from
`tools/zoo.py register` (a finished project) or from a copied HAT_HOME; every read verifies the sha256.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from hat.checkpoint import load_checkpoint, save_checkpoint
from hat.errors import CheckpointError, ConfigError
from hat.fileio import atomic_write

INDEX_FILE = "index.json"
ARTIFACTS = {"float": "float weights", "qat": "QAT checkpoint", "program": "integer program"}
SUFFIXES = {"float": ".pt", "qat": ".qat.pt", "program": ".hir"}


def zoo_dir() -> Path:
    return Path(os.environ.get("HAT_HOME") or Path.home() / ".cache" / "hat") / "zoo"


def read_index() -> dict[str, dict[str, Any]]:
    path = zoo_dir() / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"zoo index {path} is not valid JSON ({exc}); restore it or remove it and register "
                              f"the projects again") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"zoo index {path} holds a {type(index).__name__}, not a mapping of names to entries")
    return index


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry(name: str) -> dict[str, Any]:
    """The index entry `name`; a clear error listing the entries (a did-you-mean, and how to add one) when absent."""
    index = read_index()
    if name not in index:
        close = difflib.get_close_matches(name, list(index), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(index)) or "none"
        raise ConfigError(f"no pretrained weights named '{name}' in the local zoo {zoo_dir() / INDEX_FILE}.{hint} "
                          f"(entries: {known}). Register a finished project with `python tools/zoo.py register "
                          f"--config PROJECT.yaml --name {name}`, or set HAT_HOME to a folder holding a zoo; nothing "
                          f"downloads")
    return index[name]


def artifacts(item: Any) -> list[str]:
    """The kinds of file an index entry holds (float weights always; QAT checkpoint and program when registered)."""
    return [kind for kind in ARTIFACTS if _recorded(item, kind)[0] is not None]


def _recorded(item: Any, kind: str) -> tuple[Any, Any]:
    """(file name, sha256) of an entry's `kind` file as the index records them; (None, None) when it has none. The
    float weights are the entry's own `checkpoint`/`sha256`, the others `{kind: {file, sha256}}`."""
    if not isinstance(item, dict):
        return None, None
    if kind == "float":
        return item.get("checkpoint"), item.get("sha256")
    part = item.get(kind)
    return (part.get("file"), part.get("sha256")) if isinstance(part, dict) else (None, None)


def checkpoint_path(name: str, item: Any, kind: str = "float") -> Path:
    """The `kind` file of index entry `name`, checked to be a plain name that resolves (symlinks followed) inside
    the zoo folder: a hostile or hand-edited index cannot make a load read, or `remove` delete, a file elsewhere."""
    value = _recorded(item, kind)[0]
    problem = _checkpoint_problem(value)
    if problem:
        key = "checkpoint" if kind == "float" else f"{kind}.file"
        raise CheckpointError(f"zoo entry '{name}' in {zoo_dir() / INDEX_FILE}: '{key}' {value!r} {problem}; "
                              f"nothing was read or deleted. Edit the entry's \"{key}\" to its file name in "
                              f"that folder (e.g. \"{name}{SUFFIXES[kind]}\") or delete the entry from index.json")
    return zoo_dir() / value


def _checkpoint_problem(value: Any) -> str:
    """Why `value` is not a zoo file name ('' when it is one): not a plain name, or resolving outside the folder."""
    folder = zoo_dir().resolve()
    if not isinstance(value, str) or "\0" in value or Path(value).name != value or value in ("", "..", INDEX_FILE):
        return f"is not the name of a file in the zoo folder {folder}"
    resolved = (folder / value).resolve()
    if not resolved.is_relative_to(folder) or resolved in (folder, folder / INDEX_FILE):
        return f"leads (through a symlink) to {resolved}, not a file in the zoo folder {folder}"
    return ""


def verified_checkpoint(name: str, kind: str = "float") -> Path:
    """The `kind` file (float weights, QAT checkpoint, integer program) of entry `name`, after checking its sha256
    against the index."""
    item = entry(name)
    if kind not in artifacts(item):
        raise CheckpointError(f"zoo entry '{name}' has no {ARTIFACTS[kind]} (it holds: {', '.join(artifacts(item))}): "
                              f"run the project's qat and int_infer stages, then `python tools/zoo.py register "
                              f"--config PROJECT.yaml --name {name} --overwrite`")
    path = checkpoint_path(name, item, kind)
    if not path.is_file():
        raise CheckpointError(f"zoo entry '{name}': {path} is missing; register the project again")
    actual = sha256(path)
    expected = _recorded(item, kind)[1]
    if actual != expected:
        raise CheckpointError(f"zoo entry '{name}': {path} has sha256 {actual[:16]}..., the index says "
                              f"{str(expected)[:16]}...: the file was changed or damaged; register the project again")
    return path


def register_checkpoint(name: str, checkpoint: Path, model_cfg: dict, metrics: dict[str, float],
                        config_yaml: str = "", overwrite: bool = False, qat_checkpoint: Optional[Path] = None,
                        program: Optional[Path] = None) -> dict[str, Any]:
    """Copy `checkpoint` (its model weights only) into the zoo as entry `name` and index it with its sha256; with
    the project's QAT checkpoint and integer program too, the entry is deployable."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"zoo name '{name}': use letters, digits, '_' and '-' only")
    index = read_index()
    if name in index and not overwrite:
        raise ConfigError(f"zoo entry '{name}' exists (from {index[name].get('source', '?')}); pass --overwrite to "
                          f"replace it or choose another --name")
    states = {"float": load_checkpoint(checkpoint, required=("model",))}
    if qat_checkpoint is not None:
        states["qat"] = load_checkpoint(qat_checkpoint, required=("model",))
    if program is not None:
        from hat import backend

        backend.load(program)  # a damaged or foreign file is refused here, not when someone deploys it
    folder = zoo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, state in states.items():
        written[kind] = folder / f"{name}{SUFFIXES[kind]}"
        save_checkpoint({"model": state["model"], "config": config_yaml}, written[kind])
    if program is not None:
        written["program"] = folder / f"{name}{SUFFIXES['program']}"
        data = Path(program).read_bytes()
        atomic_write(written["program"], lambda f: f.write(data))
    item = {"model": model_cfg, "checkpoint": written["float"].name, "sha256": sha256(written["float"]),
            "metrics": metrics, "source": str(Path(checkpoint).resolve()), "config": config_yaml}
    item.update({kind: {"file": path.name, "sha256": sha256(path)} for kind, path in written.items() if kind != "float"})
    old = index.get(name) if overwrite else None
    _write_index({**index, name: item})
    for kind in artifacts(old):  # an overwritten entry's files that the new one no longer has
        if kind not in written:
            checkpoint_path(name, old, kind).unlink(missing_ok=True)
    return item


def _write_index(index: dict) -> None:
    atomic_write(zoo_dir() / INDEX_FILE, lambda f: f.write(json.dumps(index, indent=2).encode()))


def remove(name: str) -> None:
    """Delete entry `name` and its files; every path is checked first, so a hostile entry touches nothing."""
    index = read_index()
    if name not in index:
        entry(name)  # raises, listing the entries
    item = index.pop(name)
    paths = [checkpoint_path(name, item, kind) for kind in artifacts(item) or ["float"]]
    for path in paths:
        path.unlink(missing_ok=True)  # a link inside the folder: removes the link, never its target
    _write_index(index)


def resolve(value: str, kind: str) -> str:
    """A tool's --ckpt: `zoo:NAME` as the verified `kind` file of that entry, anything else as given."""
    return str(verified_checkpoint(value[4:], kind)) if value.startswith("zoo:") else value


def pretrained_path(value: Any, model_name: Optional[str] = None) -> Optional[str]:
    """A `pretrained` setting as a checkpoint path: a path as given, `zoo:NAME` or True (the entry named like the
    model) as the verified zoo checkpoint, None/False as None."""
    if value is None or value is False:
        return None
    if value is True:
        if not model_name:
            raise ConfigError("pretrained=True needs a model name to look up in the zoo")
        return str(verified_checkpoint(model_name))
    if isinstance(value, str) and value.startswith("zoo:"):
        return str(verified_checkpoint(value[4:]))
    return str(value)

