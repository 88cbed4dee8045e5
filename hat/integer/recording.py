"""Who watches integer kernel calls: while `backend.compile` traces a model, every kernel call is reported to its
recorder, so the program is exactly the kernels the quantized model ran (this layer never imports the backend)."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Optional, Protocol, Sequence


class Recorder(Protocol):
    module: str  # the module running now, for messages

    def kernel(self) -> ContextManager[None]:
        """Entered around the kernel's own torch calls (they are not the model's float code)."""

    def record(self, op: str, inputs: Sequence[Any], output: Any, params: dict[str, Any]) -> None:
        """One kernel call: `op`(*inputs, **params) -> output."""


_ACTIVE: list[Recorder] = []


def active() -> Optional[Recorder]:
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.pop()
