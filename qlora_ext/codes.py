"""Code tables of the bitsandbytes 4-bit and dynamic 8-bit formats (float32), and the decision
thresholds its CUDA quantizer compares against. Facts of the format, checked against bitsandbytes
in ``python_tests/test_codes.py``.
"""
from __future__ import annotations

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

#: The quantizer's decision thresholds, as the float32 values bitsandbytes' CUDA kernel compares
#: against (``scaled > t``: an element exactly on a threshold takes the lower code). Its source writes
#: them as decimals parsed straight to float32, so four NF4 thresholds (the 1st, 9th, 13th and 15th)
#: sit one ulp off the float32 midpoints of adjacent codes. Hex literals keep them exact here.
NF4_THRESHOLDS = (
    float.fromhex("-0x1.b239b20000000p-1"),  # -0.8480964303016663
    float.fromhex("-0x1.38a4e00000000p-1"),  # -0.6106328964233398
    float.fromhex("-0x1.d709000000000p-2"),  # -0.4599952697753906
    float.fromhex("-0x1.5bd4ec0000000p-2"),  # -0.33967941999435425
    float.fromhex("-0x1.e079d80000000p-3"),  # -0.23460739850997925
    float.fromhex("-0x1.1a71780000000p-3"),  # -0.13791173696517944
    float.fromhex("-0x1.74f0e20000000p-5"),  # -0.045525018125772476
    float.fromhex("0x1.45f5fe0000000p-5"),  # 0.03979014977812767
    float.fromhex("0x1.ec90c60000000p-4"),  # 0.1202552542090416
    float.fromhex("0x1.a0cfc00000000p-3"),  # 0.2035212516784668
    float.fromhex("0x1.2b05a80000000p-2"),  # 0.2920137643814087
    float.fromhex("0x1.8ea7f20000000p-2"),  # 0.3893125355243683
    float.fromhex("0x1.00da060000000p-1"),  # 0.5016633868217468
    float.fromhex("0x1.491b5e0000000p-1"),  # 0.6427869200706482
    float.fromhex("0x1.b913b20000000p-1"),  # 0.8614783883094788
)
#: FP4 thresholds on |scaled| (bitsandbytes' decimal constants; 0.583333 is not the exact midpoint).
FP4_MAGNITUDE_THRESHOLDS = (
    float.fromhex("0x1.5555720000000p-9"),  # 0.0026041700039058924
    float.fromhex("0x1.6000000000000p-4"),  # 0.0859375
    float.fromhex("0x1.aaaaaa0000000p-3"),  # 0.2083333283662796
    float.fromhex("0x1.2aaaaa0000000p-2"),  # 0.2916666567325592
    float.fromhex("0x1.aaaaac0000000p-2"),  # 0.4166666865348816
    float.fromhex("0x1.2aaaa00000000p-1"),  # 0.5833330154418945
    float.fromhex("0x1.aaaaaa0000000p-1"),  # 0.8333333134651184
)
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


def _dynamic_map_values(signed: bool) -> tuple[float, ...]:
    # Dynamic 8-bit map (Dettmers 2015): for each exponent level i = 0..6 (scale 10^(i-6)), the
    # midpoints of linspace(0.1, 1, k + 1) with k = 2^i (signed: both signs) or 2^(i+1) (unsigned);
    # plus 0 and 1. Computed in float32 as bitsandbytes' create_dynamic_map does.
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, (2**i if signed else 2 ** (i + 1)) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    assert len(values) == 256
    return tuple(sorted(values))


# computed once, at import (torch.compile sees constants)
DYNAMIC_MAP_VALUES = _dynamic_map_values(signed=True)
DYNAMIC_MAP_UNSIGNED_VALUES = _dynamic_map_values(signed=False)


def dynamic_map(device: torch.device | str | None = None, signed: bool = True) -> torch.Tensor:
    """The 256 sorted float32 values of the dynamic 8-bit map: signed (double quantization's code,
    8-bit Adam's first moment) or unsigned (8-bit Adam's second moment)."""
    values = DYNAMIC_MAP_VALUES if signed else DYNAMIC_MAP_UNSIGNED_VALUES
    return torch.tensor(values, dtype=torch.float32, device=device)
