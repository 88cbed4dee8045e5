"""Where a program's time goes: each node timed on a batch, with its multiply-accumulates, bytes and executor path.

`Program.profile(x)` (or `tools/predict.py --stage int_infer --profile`) runs the program a few times and reports
per node the median time, the MACs (convs, linears, matmuls), the bytes it reads and writes (inputs, weights,
output) and how it ran (int8 GEMM, exact float sums, reference kernel), slowest first.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class NodeTime:
    output: str
    op: str
    module: str
    path: str  # how the executor ran it
    ms: float  # median over the runs
    macs: int
    bytes: int


@dataclass
class ProgramProfile:
    nodes: list[NodeTime]  # in program order
    batch: int
    runs: int

    @property
    def total_ms(self) -> float:
        return sum(n.ms for n in self.nodes)

    def table(self, top: int = 0) -> str:
        """The slowest nodes first (all of them, or the `top` slowest), one line each, with the totals."""
        total, ranked = self.total_ms, sorted(self.nodes, key=lambda n: -n.ms)
        lines = [f"integer program, batch {self.batch}: {total:.2f} ms per run (median of {self.runs} per node), "
                 f"{sum(n.macs for n in self.nodes) / 1e9:.3f} GMAC",
                 f"{'ms':>8} {'share':>6} {'GMAC/s':>7} {'MB':>7}  {'op':<14} {'path':<12} {'output':<10} module"]
        for n in ranked[:top or None]:
            rate = f"{n.macs / n.ms / 1e6:7.1f}" if n.macs and n.ms > 0 else f"{'':>7}"
            lines.append(f"{n.ms:8.3f} {n.ms / total:6.1%} {rate} {n.bytes / 1e6:7.2f}  {n.op:<14} {n.path:<12} "
                         f"{n.output:<10} {n.module}")
        return "\n".join(lines)

    __str__ = table


def profile(program, *inputs: torch.Tensor, runs: int = 5) -> ProgramProfile:
    """Time each node of `program` over `runs` runs on `inputs` (after one warm-up run) with the fast executor."""
    executors, times = program.executors(), [[] for _ in program.nodes]
    with torch.inference_mode():
        for attempt in range(runs + 1):
            env = program._bind(inputs)
            for i, (node, execute) in enumerate(zip(program.nodes, executors)):
                args = [env[name] for name in node.inputs]
                start = time.perf_counter()
                env[node.output] = execute(*args)
                if attempt:
                    times[i].append(time.perf_counter() - start)
    rows = []
    for node, execute, spent in zip(program.nodes, executors, times):
        args, out = [env[name] for name in node.inputs], env[node.output]
        stored = sum(v.nbytes for v in execute.params.values() if isinstance(v, torch.Tensor))
        rows.append(NodeTime(node.output, node.op, node.module, execute.path(*args), statistics.median(spent) * 1e3,
                             _macs(node.op, args, out, execute.params.get("weight")),
                             sum(a.nbytes for a in args if isinstance(a, torch.Tensor)) + out.nbytes + stored))
    return ProgramProfile(rows, int(inputs[0].shape[0]) if inputs else 0, runs)


def _macs(op: str, args: list, out: torch.Tensor, weight) -> int:
    """Multiply-accumulates of the ops that have them: one per output element and per weight of its filter."""
    if op in ("conv2d", "linear") and weight is not None:
        return out.numel() * weight[0].numel()
    if op == "matmul":
        return out.numel() * args[0].shape[-1]
    return 0
