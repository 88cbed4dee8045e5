"""The local zoo index: finished projects' weights, reusable by name (`create_model(name, pretrained=True)`).

Everything lives under `$HAT_HOME/zoo/` (default ~/.cache/hat/zoo): `index.json` (name -> model config, checkpoint
file, sha256, metrics, the project's config) and one `<name>.pt` per entry. Nothing downloads: an entry comes from
`tools/zoo.py register` (a finished project) or from a copied HAT_HOME; every read verifies the sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from hat.checkpoint import load_checkpoint, save_checkpoint
from hat.errors import CheckpointError, ConfigError
from hat.fileio import atomic_write

INDEX_FILE = "index.json"


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
    """The index entry `name`; a clear error listing the entries (and how to add one) when it is absent."""
    index = read_index()
    if name not in index:
        known = ", ".join(sorted(index)) or "none"
        raise ConfigError(f"no pretrained weights named '{name}' in the local zoo {zoo_dir() / INDEX_FILE} (entries: "
                          f"{known}). Register a finished project with `python tools/zoo.py register --config "
                          f"PROJECT.yaml --name {name}`, or set HAT_HOME to a folder holding a zoo; nothing downloads")
    return index[name]


def checkpoint_path(name: str, item: Any) -> Path:
    """The file of index entry `name`, checked to be a plain name that resolves (symlinks followed) inside the zoo
    folder: a hostile or hand-edited index cannot make a load read, or `remove` delete, a file elsewhere."""
    value = item.get("checkpoint") if isinstance(item, dict) else None
    problem = _checkpoint_problem(value)
    if problem:
        raise CheckpointError(f"zoo entry '{name}' in {zoo_dir() / INDEX_FILE}: 'checkpoint' {value!r} {problem}; "
                              f"nothing was read or deleted. Edit the entry's \"checkpoint\" to its file name in "
                              f"that folder (e.g. \"{name}.pt\") or delete the entry from index.json")
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


def verified_checkpoint(name: str) -> Path:
    """The checkpoint file of entry `name`, after checking its sha256 against the index."""
    item = entry(name)
    path = checkpoint_path(name, item)
    if not path.is_file():
        raise CheckpointError(f"zoo entry '{name}': {path} is missing; register the project again")
    actual = sha256(path)
    if actual != item["sha256"]:
        raise CheckpointError(f"zoo entry '{name}': {path} has sha256 {actual[:16]}..., the index says "
                              f"{item['sha256'][:16]}...: the file was changed or damaged; register the project again")
    return path


def register_checkpoint(name: str, checkpoint: Path, model_cfg: dict, metrics: dict[str, float],
                        config_yaml: str = "", overwrite: bool = False) -> dict[str, Any]:
    """Copy `checkpoint` (its model weights only) into the zoo as entry `name` and index it with its sha256."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"zoo name '{name}': use letters, digits, '_' and '-' only")
    index = read_index()
    if name in index and not overwrite:
        raise ConfigError(f"zoo entry '{name}' exists (from {index[name].get('source', '?')}); pass --overwrite to "
                          f"replace it or choose another --name")
    state = load_checkpoint(checkpoint, required=("model",))
    folder = zoo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.pt"
    save_checkpoint({"model": state["model"], "config": config_yaml}, target)
    item = {"model": model_cfg, "checkpoint": target.name, "sha256": sha256(target), "metrics": metrics,
            "source": str(Path(checkpoint).resolve()), "config": config_yaml}
    _write_index({**index, name: item})
    return item


def _write_index(index: dict) -> None:
    atomic_write(zoo_dir() / INDEX_FILE, lambda f: f.write(json.dumps(index, indent=2).encode()))


def remove(name: str) -> None:
    """Delete entry `name` and its file; the file's path is checked first, so a hostile entry touches nothing."""
    index = read_index()
    if name not in index:
        entry(name)  # raises, listing the entries
    path = checkpoint_path(name, index.pop(name))
    path.unlink(missing_ok=True)  # a link inside the folder: removes the link, never its target
    _write_index(index)


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

