"""Code tables of the bitsandbytes 4-bit and dynamic 8-bit formats (float32), and the decision
thresholds its CUDA quantizer compares against. Facts of the format, checked against bitsandbytes
in ``python_tests/test_codes.py``.
"""
from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantization: one float32 scale per 256 absmax values

#: NF4 (QLoRA's NormalFloat): 16 quantiles of N(0, 1) scaled to [-1, 1], index order = value order.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

#: FP4 (1 sign, 2 exponent, 1 mantissa bit; bitsandbytes' bias): bit 3 is the sign, the low
#: three bits 000..111 encode 0, 0.0625, 8, 12, 4, 6, 2, 3; divided by the maximum, 12.
FP4_VALUES = tuple(v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))

#: The quantizer's decision thresholds (element goes above a threshold when ``scaled > t``).
#: For NF4 they are exactly the float32 midpoints of adjacent codes.
NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)
#: FP4 thresholds on |scaled| (bitsandbytes' decimal constants; 0.583333 is not the exact midpoint).
FP4_MAGNITUDE_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
#: FP4 bit pattern (without sign) of each magnitude rank 0..7 (rank = thresholds exceeded).
FP4_RANK_TO_BITS = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry float32 code table of ``quant_type`` ("nf4" or "fp4"), indexed by the 4-bit value."""
    if quant_type == "nf4":
        values = NF4_VALUES
    elif quant_type == "fp4":
        values = FP4_VALUES
    else:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_values() -> tuple[float, ...]:
    # Signed dynamic 8-bit map (Dettmers 2015): for each exponent level i = 0..6 (scale 10^(i-6)),
    # 2^i fraction values = midpoints of linspace(0.1, 1, 2^i + 1), with both signs; plus 0 and 1.
    # Computed in float32 exactly as bitsandbytes' create_dynamic_map(signed=True) does.
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    assert len(values) == 256
    return tuple(sorted(values))


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 sorted float32 values of the signed dynamic 8-bit map (double quantization's code)."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32, device=device)
