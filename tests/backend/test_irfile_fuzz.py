"""Fuzzing .hir headers: random hand edits (CRC recomputed) of node params, nodes, values and tensor records.

The promise under test: backend.load either returns a program or raises IRFileError, and a program that loads runs
on inputs of its declared shapes (no other exception; IRFileError/ProgramInputError would be tolerated, none is
expected). The cases run in one subprocess under an address-space limit, so an edit that slipped through to a huge
allocation fails fast there instead of eating the machine.
"""
from __future__ import annotations

import copy
import json
import random
import re
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

from hat import backend, quant
from hat.models import create_model

ROOT = Path(__file__).resolve().parents[2]
SEED, CASES_PER_PROGRAM = 20240607, 175
NEW_ADDRESS_SPACE = 4 << 30  # bytes the fuzz may map beyond what torch and hat take at import


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """convnet_small from an 8x8 input, and the model with every op kind (tests/backend/test_program.py)."""
    from tests.backend.conftest import calibrate_and_convert
    from tests.backend.test_program import EveryOp

    directory = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    small = calibrate_and_convert(create_model("convnet_small").deploy_model(), [torch.randn(4, 1, 8, 8)])
    qconfig_dict = {"": quant.get_default_qat_qconfig(),
                    "module_name": [("conv16", quant.get_default_qat_qconfig(activation_dtype="qint16")),
                                    ("fc_hp", quant.get_default_qat_out_qconfig())]}
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    every = calibrate_and_convert(EveryOp(), batches, qconfig_dict)
    return [backend.compile(small, (torch.randn(2, 1, 8, 8),)).save(directory / "small.hir"),
            backend.compile(every, (batches[0],)).save(directory / "every.hir")]


def test_random_header_edits_only_ever_raise_irfile_error(programs):
    command = (f"from tests.backend.test_irfile_fuzz import fuzz; "
               f"fuzz({[str(p) for p in programs]!r}, {CASES_PER_PROGRAM}, {SEED}, {NEW_ADDRESS_SPACE})")
    done = subprocess.run([sys.executable, "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], "\n\n".join(result["failures"])
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == CASES_PER_PROGRAM * len(programs)
    assert outcomes.get("refused", 0) > 100 and outcomes.get("ran", 0) >= 10, outcomes  # both paths exercised


# --- the subprocess ------------------------------------------------------------------------------------------------
def fuzz(paths: list[str], cases: int, seed: int, new_address_space: int) -> None:
    """Run `cases` random edits of each program; print one JSON line {"outcomes", "failures"}."""
    import resource

    from hat.backend import ProgramInputError
    from hat.backend.j5.irfile import IRFileError
    from tests.backend.test_irfile import _rewrite

    torch.set_num_threads(1)
    mapped = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + new_address_space, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rng = random.Random(seed)
    outcomes, failures = Counter(), []
    for path in map(Path, paths):
        original = path.read_bytes()
        case_path = path.with_name(path.stem + "_case.hir")
        for case in range(cases):
            case_path.write_bytes(original)
            done = []
            _rewrite(case_path, lambda header: done.append(_mutate(header, rng)), lambda head: _nest(head, rng))
            what = f"{path.name} case {case}: {'; '.join(done[0])}"
            try:
                program = backend.load(case_path)
            except IRFileError:
                outcomes["refused"] += 1
                continue
            except BaseException:  # noqa: B036  (the point: anything else is a finding)
                failures.append(f"load raised, {what}\n{traceback.format_exc(limit=-3)}")
                continue
            try:
                program.run(*(torch.randn(program.values[name].shape) for name in program.inputs))
                outcomes["ran"] += 1
            except (IRFileError, ProgramInputError):
                outcomes["run refused"] += 1
            except BaseException:  # noqa: B036
                failures.append(f"loaded but run raised, {what}\n{traceback.format_exc(limit=-3)}")
    print(json.dumps({"outcomes": outcomes, "failures": failures[:10]}))


_NEST_MARK = "__nest__"


def _nest(head: str, rng: random.Random) -> str:
    """A parameter set to the mark becomes a deeply nested list (RecursionError in a naive parser)."""
    depth = rng.choice([10, 1000, 100_000])
    return head.replace(json.dumps(_NEST_MARK), "[" * depth + "]" * depth)


def _some_value(rng: random.Random, header: dict, old=None):
    """A replacement for a JSON field: a small tweak of the old value, or something from the hostile pool."""
    if old is not None and not isinstance(old, dict) and rng.random() < 0.45:
        return _tweak(rng, old)
    pool = [
        lambda: rng.choice([0, 1, -1, 2, 3, 7, 8, 31, 32, 200, 256, 257, 65536, 200000, 2 ** 31, 2 ** 40, 2 ** 63,
                            -2 ** 63 - 1, 10 ** 30]),
        lambda: rng.choice([True, False, None]),
        lambda: rng.choice([0.5, 1.5, -2.0, 1e300, 1e-300, 0.0]),
        lambda: rng.choice(["ab", "", "qint7", "qint8", "qint16", "qint32", "float32", "int64", "bilinear", "border",
                            "reshape", "view", "permute", "__class__", "...", "v1", "v3", _NEST_MARK]),
        lambda: [rng.randint(-3, 9) for _ in range(rng.randint(0, 5))],
        lambda: rng.choice([[200000, 200000], [0, 0], [1], [2, 2, 2], [[1, 2], [3]], [None, "...", [0, 1, 1]],
                            [[None, None, -1]], [[0, 2 ** 40, None]]]),
        lambda: {"$tensor": rng.choice([*header.get("tensors", {"nope": 0}), "nope"])},
        lambda: rng.choice([{}, {"x": 1}, {"start_dim": 1}, {"dim": 99}, {"$tensor": 3}]),
    ]
    return rng.choice(pool)()


def _tweak(rng: random.Random, old):
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return rng.choice([old + 1, old - 1, old * 2, -old, old // 2, old + 100, 0])
    if isinstance(old, float):
        return rng.choice([old * 2, -old, old / 1e6, 0.0])
    if isinstance(old, list) and old:
        new = list(old)
        i = rng.randrange(len(new))
        choice = rng.random()
        if choice < 0.6:
            new[i] = _tweak(rng, new[i])
        elif choice < 0.8:
            del new[i]
        else:
            new.insert(i, new[i])
        return new
    if isinstance(old, str):
        return rng.choice([old + "x", old[:-1], old.upper()])
    return old


def _pick(rng: random.Random, mapping: dict):
    key = rng.choice(list(mapping))
    return key, mapping[key]


def _mutate(header: dict, rng: random.Random) -> list[str]:
    """One to three random edits of the header, in place; returns what was done."""
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choices(["param", "param_drop", "param_add", "node", "nodes", "tensor", "tensor_dtype", "value",
                            "top"], weights=[8, 1, 1, 2, 1, 3, 1, 3, 1])[0]
        nodes = header["nodes"]
        if not nodes:
            break
        index = rng.randrange(len(nodes))
        node = nodes[index]
        if kind == "param" and node["params"]:
            key, old = _pick(rng, node["params"])
            node["params"][key] = new = _some_value(rng, header, old)
            done.append(f"node {index} ({node['op']}) param {key}: {old!r} -> {new!r}")
        elif kind == "param_drop" and node["params"]:
            key, _ = _pick(rng, node["params"])
            del node["params"][key]
            done.append(f"node {index} ({node['op']}) param {key} dropped")
        elif kind == "param_add":
            key = rng.choice(["speed", "stride", "shift", "multiplier", "x", "dim", "weight", "out_dtype", "axis"])
            node["params"][key] = new = _some_value(rng, header)
            done.append(f"node {index} ({node['op']}) param {key} added: {new!r}")
        elif kind == "node":
            key = rng.choice(["op", "inputs", "output", "module"])
            values = list(header["values"])
            new = {"op": lambda: rng.choice([n["op"] for n in nodes] + ["softmax"]),
                   "inputs": lambda: rng.sample(values, rng.randint(0, 2)),
                   "output": lambda: rng.choice(values),
                   "module": lambda: _some_value(rng, header)}[key]()
            done.append(f"node {index} ({node['op']}) {key}: {node[key]!r} -> {new!r}")
            node[key] = new
        elif kind == "nodes":
            other = rng.randrange(len(nodes))
            action = rng.choice(["swap", "delete", "duplicate"])
            if action == "swap":
                nodes[index], nodes[other] = nodes[other], nodes[index]
            elif action == "delete":
                del nodes[index]
            else:
                nodes.insert(other, copy.deepcopy(node))
            done.append(f"nodes: {action} {index} {other}")
        elif kind in ("tensor", "tensor_dtype"):
            name, record = _pick(rng, header["tensors"])
            if kind == "tensor_dtype":  # a consistent retyping: same bytes, another dtype
                dtype, size = rng.choice([("int8", 1), ("int16", 2), ("int32", 4), ("int64", 8), ("float32", 4),
                                          ("float64", 8)])
                record.update(dtype=dtype, shape=[record["nbytes"] // size] if record["nbytes"] % size == 0 else [])
                done.append(f"tensor {name} retyped {dtype} {record['shape']}")
            else:
                key = rng.choice(["dtype", "shape", "offset", "nbytes"])
                old, record[key] = record[key], _some_value(rng, header, record[key])
                done.append(f"tensor {name} {key}: {old!r} -> {record[key]!r}")
        elif kind == "value":
            name, record = _pick(rng, header["values"])
            key = rng.choice(["dtype", "shape", "shape", "scale", "axis", "constant"])
            old, record[key] = record.get(key), _some_value(rng, header, record.get(key))
            done.append(f"value {name} {key}: {old!r} -> {record[key]!r}")
        else:
            key = rng.choice(["inputs", "outputs", "march", "format"])
            old, header[key] = header[key], _some_value(rng, header, header[key])
            done.append(f"header {key}: {old!r} -> {header[key]!r}")
    return done or ["nothing"]
