"""Hardware backends: turn a quantized model into an integer program for a march, check it, save and load it.

    report = backend.check_model(qmodel, example_inputs=(x,), march="bayes")   # deployable? what to fix
    prog = backend.compile(qmodel, example_inputs=(x,), march="bayes")         # ModelCheckError if not deployable
    prog.save("model.hir"); prog = backend.load("model.hir"); y = prog.run(x)  # bit-exact with qmodel(x)
    backend.try_pipeline(float_model, batches).stage                           # how far a float model gets
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from torch import nn

from hat.backend.j5.program import Program, ProgramInputError
from hat.backend.trial import Trial, try_pipeline


def check_model(model: nn.Module, example_inputs: Sequence[torch.Tensor], march: str = "bayes"):
    """The deployability Report of a converted model: `report.deployable`, str(report) lists each problem."""
    from hat.backend.j5.checker import check_model as check

    return check(model, example_inputs, march)


def compile(model: nn.Module, example_inputs: Sequence[torch.Tensor], march: str = "bayes") -> Program:  # noqa: A001
    """The integer program of a converted model; raises ModelCheckError (with the report) when not deployable."""
    from hat.backend.j5.checker import compile_model

    return compile_model(model, example_inputs, march)


def load(path: Union[str, os.PathLike]) -> Program:
    """A program saved with `Program.save`, validated (IRFileError for a corrupt, foreign or newer file)."""
    from hat.backend.j5.irfile import load as load_file

    return load_file(path)


__all__ = ["check_model", "compile", "load", "Program", "ProgramInputError", "Trial", "try_pipeline"]
