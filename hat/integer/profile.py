"""Every J5 ("bayes") number in one object: ranges, rounding, multiplier width, shifts and checker limits.

The checker, the quantized modules and the integer executor all read this object, so they cannot disagree;
a correction is a one-line change here. Sources and choices: ../shared/J5_ARITHMETIC.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

QRANGES = MappingProxyType({"qint8": (-128, 127), "qint16": (-32768, 32767), "qint32": (-2**31, 2**31 - 1)})
TORCH_DTYPES = MappingProxyType({"qint8": torch.int8, "qint16": torch.int16, "qint32": torch.int32})


def qrange(dtype: str) -> tuple[int, int]:
    """(qmin, qmax) of a quantized dtype: a fact of the dtype, the same on every march."""
    try:
        return QRANGES[dtype]
    except KeyError:
        raise ValueError(f"unknown quantized dtype '{dtype}'; use one of {', '.join(QRANGES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The quantized dtype name of an integer tensor's dtype (torch.int8 -> "qint8")."""
    for name, torch_dtype in TORCH_DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise ValueError(f"{dtype} is not a quantized dtype; integer kernels take "
                     f"{', '.join(map(str, TORCH_DTYPES.values()))}")


def scale_divisor(dtype: str) -> float:
    """scale = max(|min|, |max|) / divisor; (qmax - qmin) / 2, so 127.5 for qint8."""
    qmin, qmax = qrange(dtype)
    return (qmax - qmin) / 2


@dataclass(frozen=True)
class ConvLimits:
    max_in_channels: int = 8192
    max_out_channels: int = 8192
    max_out_channels_model_output: int = 16384
    kernel_range: tuple[int, int] = (1, 31)
    max_weight_elements_per_filter: int = 65535  # C * kH * kW must stay below this
    max_padding: int = 256
    max_dilation: int = 16
    max_stride: int = 256
    strides_with_fused_add: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class TensorLimits:
    max_hwc: int = 65536
    max_batch: int = 4096
    max_bytes: int = 1 << 30


@dataclass(frozen=True)
class GridSampleLimits:
    max_hw: int = 1024
    max_area: int = 720 * 1024
    modes: tuple[str, ...] = ("bilinear", "nearest")
    padding_modes: tuple[str, ...] = ("zeros", "border")
    max_coord_shift: int = 8  # fractional bits of the int16 grid: clamp(15 - ceil(log2(...)), 0, 8)


@dataclass(frozen=True)
class Profile:
    """Integer arithmetic of one march; the fields are the facts, the methods derive from them."""

    march: str
    rounding: str = "half_up"  # rounding to the integer grid and in right shifts: floor(x + 0.5)
    activation_dtypes: tuple[str, ...] = ("qint8", "qint16")
    weight_dtype: str = "qint8"
    bias_dtype: str = "qint32"
    accumulator_dtype: str = "qint32"
    multiplier_max: int = 32767  # requantization multiplier is an int16: |m| <= 32767
    max_shift: int = 31
    add_max_shift: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({"qint8": 23, "qint16": 15}))
    lut_internal_dtype: str = "qint16"  # sigmoid/tanh/exp tables; an int8 result is (v + 128) >> 8
    lut_tables: int = 6  # segmented table (int16 input): 6 tables between 7 dividing points, a line at each end
    lut_table_entries: int = 64  # entries per table (the vendor's num_entries_per_table)
    lut_max_index_bits: int = 15  # fractional bits of a table index: entry difference * fraction stays in int32
    conv: ConvLimits = field(default_factory=ConvLimits)
    tensor: TensorLimits = field(default_factory=TensorLimits)
    grid_sample: GridSampleLimits = field(default_factory=GridSampleLimits)

    def qrange(self, dtype: str) -> tuple[int, int]:
        return qrange(dtype)

    def __deepcopy__(self, memo: dict) -> "Profile":
        return self  # immutable: a copied model shares its march's profile

    def __reduce__(self):
        return get_profile, (self.march,)  # pickled by name: a loaded model gets this process's profile

    def lut_output_shift(self, out_dtype: str) -> int:
        """Right shift from the internal table grid to out_dtype's: 8 for qint8 ((v + 128) >> 8), 0 for qint16."""
        ratio = (self.qrange(self.lut_internal_dtype)[1] + 1) // (self.qrange(out_dtype)[1] + 1)
        if out_dtype not in self.activation_dtypes or ratio < 1:
            raise ValueError(f"a table's output is one of {', '.join(self.activation_dtypes)}, not '{out_dtype}'")
        return ratio.bit_length() - 1

    def scale_divisor(self, dtype: str) -> float:
        return scale_divisor(dtype)


J5 = Profile(march="bayes")
_PROFILES: dict[str, Profile] = {"bayes": J5}
PROFILES: Mapping[str, Profile] = MappingProxyType(_PROFILES)  # every march a config may name


def get_profile(march: str) -> Profile:
    try:
        return _PROFILES[march]
    except KeyError:
        raise ValueError(f"unknown march '{march}'; known: {', '.join(PROFILES)}") from None
