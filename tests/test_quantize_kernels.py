"""The quantisation kernels of the ring (csrc/kernels/quantize.hpp) through pccl._core.quant.

No network: round-trip error bounds, exact constants, non-finite blocks, bit-exact fused reduce,
and the accuracy of a simulated 2-peer quantised ring all-reduce.
"""

from __future__ import annotations

import numpy as np
import pytest

from pccl import _core

q = _core.quant

# DataType, QuantizationAlgorithm and ReduceOp codes (csrc/common/types.hpp).
UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64, FLOAT16, BFLOAT16, FLOAT, DOUBLE = range(12)
NONE, MIN_MAX, ZERO_POINT_SCALE = range(3)
SUM, AVG, PROD, MAX, MIN = range(5)

BLOCK = q.BLOCK_ELEMENTS
PARAM_BYTES = q.PARAM_BYTES_PER_BLOCK
# The integers each wire type carries: (qmin, qmax, bits of qmax - qmin, numpy dtype).
WIRE = {
    UINT8: (0, 255, 8, np.uint8),
    INT8: (-128, 127, 8, np.int8),
    UINT16: (0, 65535, 16, np.uint16),
}
FORMATS = [(MIN_MAX, UINT8), (MIN_MAX, UINT16), (ZERO_POINT_SCALE, UINT8), (ZERO_POINT_SCALE, UINT16),
           (ZERO_POINT_SCALE, INT8)]
SIZES = [1, 255, 256, 257, 100_003]
SOURCE_NUMPY = {FLOAT: np.float32, DOUBLE: np.float64, FLOAT16: np.float16}
CANONICAL_NAN_BITS = {FLOAT: (np.uint32, 0x7FC00000), DOUBLE: (np.uint64, 0x7FF8000000000000),
                      FLOAT16: (np.uint16, 0x7E00), BFLOAT16: (np.uint16, 0x7FC0)}
# The ring's accuracy target for uint8 MIN_MAX: a third of PCCL 1.0's 3.8e-2 relative L2 error.
RING_ERROR_TARGET = 1.27e-2
# The wire may cost at most this much more than one byte per element (uint8 wire).
MAX_WIRE_OVERHEAD = 0.05


def blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def wire_params(data: bytes, n: int) -> np.ndarray:
    """The (first, second) float32 parameters of each block, as the header defines them."""
    return np.frombuffer(data, dtype="<f4", count=2 * blocks(n)).reshape(-1, 2)


def wire_values(data: bytes, n: int, wire: int) -> np.ndarray:
    dtype = np.dtype(WIRE[wire][3]).newbyteorder("<")
    return np.frombuffer(data, dtype=dtype, offset=blocks(n) * PARAM_BYTES, count=n)


def scales(data: bytes, n: int, algorithm: int) -> np.ndarray:
    p = wire_params(data, n)
    return (p[:, 1] if algorithm == MIN_MAX else p[:, 0]).astype(np.float64)


def reference_dequantize(data: bytes, n: int, wire: int, algorithm: int, dtype=np.float32) -> np.ndarray:
    """The documented formula, evaluated with the same float operations (numpy never fuses them)."""
    p = wire_params(data, n).astype(dtype)
    per_element = np.repeat(np.arange(blocks(n)), BLOCK)[:n]
    values = wire_values(data, n, wire).astype(dtype)
    if algorithm == MIN_MAX:
        return p[per_element, 0] + values * p[per_element, 1]
    return (values - p[per_element, 1]) * p[per_element, 0]


def bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def error_bound(x: np.ndarray, data: bytes, algorithm: int, wire: int, source_ulp: float = 0.0) -> np.ndarray:
    """Per element: scale/2, the float32 rounding of the encoder (a few ulp of q) and of the decoder
    (a few ulp of the block's largest magnitude), plus the source type's own rounding of the result."""
    n = x.size
    qmin, qmax, _, _ = WIRE[wire]
    steps = qmax - qmin
    scale = np.repeat(scales(data, n, algorithm), BLOCK)[:n]
    padded = np.zeros(blocks(n) * BLOCK)
    padded[:n] = np.abs(x.astype(np.float64))
    magnitude = np.repeat(padded.reshape(-1, BLOCK).max(axis=1), BLOCK)[:n]
    return scale * (0.5 + steps * 2.0**-21) + magnitude * (2.0**-21 + source_ulp)


def round_trip(x: np.ndarray, algorithm: int, wire: int, source: int = FLOAT, source_dtype: int = -1):
    data = q.quantize(x, wire, algorithm, source_dtype)
    return data, q.dequantize(data, x.size, source, wire, algorithm)


def data_sets(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    normal = rng.standard_normal(n)
    return {
        "normal": normal,
        "all_negative": -np.abs(normal) - 5.0,
        "all_positive_offset": np.abs(normal) * 1e-3 + 1000.0,
        "wide_magnitudes": normal * np.exp(rng.uniform(-20, 20, n)),
        "tiny": normal * 1e-30,
    }


# ---- format checks -----------------------------------------------------------------------------


def test_validate_accepts_exactly_the_supported_formats():
    for source in (FLOAT, DOUBLE, FLOAT16, BFLOAT16):
        for algorithm, wire in FORMATS:
            assert q.validate(source, wire, algorithm) == ""
    message = q.validate(INT32, UINT8, MIN_MAX)
    assert "floating-point" in message and "int32" in message
    for source in (UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64):
        assert q.validate(source, UINT8, ZERO_POINT_SCALE) != ""
    assert "uint8 or uint16" in q.validate(FLOAT, INT8, MIN_MAX)
    assert "uint8, uint16 or int8" in q.validate(FLOAT, INT16, ZERO_POINT_SCALE)
    assert q.validate(FLOAT, FLOAT16, MIN_MAX) != ""
    assert "NONE" in q.validate(FLOAT, UINT8, NONE)


def test_bad_arguments_raise_value_error():
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError):
        q.quantize(x.astype(np.int32), UINT8, MIN_MAX)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        q.quantize(x, INT8, MIN_MAX)
    with pytest.raises(ValueError):
        q.validate(FLOAT, 12, MIN_MAX)
    with pytest.raises(ValueError):
        q.validate(FLOAT, UINT8, 3)
    data = q.quantize(x, UINT8, MIN_MAX)
    with pytest.raises(ValueError, match="bytes"):
        q.dequantize(data[:-1], 10, FLOAT, UINT8, MIN_MAX)
    with pytest.raises(ValueError):
        q.dequantize_reduce(data, x, 5, 0, UINT8, MIN_MAX)
    with pytest.raises(ValueError):
        q.dequantize_reduce(data, np.ones(11, np.float32), SUM, 0, UINT8, MIN_MAX)


@pytest.mark.parametrize("n", [0, *SIZES, 1 << 20])
def test_wire_bytes_formula(n):
    for algorithm, wire in FORMATS:
        size = WIRE[wire][3]().itemsize
        for source in (FLOAT, DOUBLE, FLOAT16, BFLOAT16):
            assert q.wire_bytes(n, source, wire, algorithm) == blocks(n) * PARAM_BYTES + n * size
    assert len(q.quantize(np.zeros(n, np.float32), UINT8, MIN_MAX)) == blocks(n) * PARAM_BYTES + n
    if n and n % BLOCK == 0:  # whole blocks: 8 parameter bytes per 256 values, +3.1%
        assert q.wire_bytes(n, FLOAT, UINT8, MIN_MAX) / n - 1 <= MAX_WIRE_OVERHEAD


def test_empty_input():
    for algorithm, wire in FORMATS:
        assert q.quantize(np.zeros(0, np.float32), wire, algorithm) == b""
        assert q.dequantize(b"", 0, FLOAT, wire, algorithm).size == 0
        assert q.dequantize_reduce(b"", np.zeros(0, np.float32), SUM, 0, wire, algorithm).size == 0


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,wire", FORMATS)
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_error_is_at_most_half_a_step(algorithm, wire, n):
    rng = np.random.default_rng(n)
    for name, values in data_sets(n, rng).items():
        x = values.astype(np.float32)
        data, y = round_trip(x, algorithm, wire)
        assert y.dtype == np.float32 and y.shape == x.shape
        err = np.abs(y.astype(np.float64) - x)
        bound = error_bound(x, data, algorithm, wire)
        worst = int(np.argmax(err - bound))
        assert np.all(err <= bound), f"{name}: error {err[worst]} > bound {bound[worst]} at {worst}"


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_scale_covers_the_block_and_is_tight(algorithm, wire):
    qmin, qmax, qbits, _ = WIRE[wire]
    x = np.random.default_rng(1).standard_normal(64 * BLOCK).astype(np.float32)
    data = q.quantize(x, wire, algorithm)
    blocks_x = x.astype(np.float64).reshape(-1, BLOCK)
    if algorithm == MIN_MAX:
        span = blocks_x.max(axis=1) - blocks_x.min(axis=1)
    else:
        span = np.maximum(blocks_x.max(axis=1), 0) - np.minimum(blocks_x.min(axis=1), 0)
    grid = scales(data, x.size, algorithm) * (qmax - qmin)
    assert np.all(grid >= span)
    # Rounded up to 24 - qbits significant bits (so q * scale is exact): at most that much wider.
    assert np.all(grid <= span * (1 + 2.0 ** (qbits - 23)))
    dropped_bits = (1 << qbits) - 1
    assert not np.any(scales(data, x.size, algorithm).astype(np.float32).view(np.uint32) & dropped_bits)


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_dequantize_follows_the_documented_formula_bit_for_bit(algorithm, wire):
    x = np.random.default_rng(2).standard_normal(10 * BLOCK + 77).astype(np.float32) * 3 - 1
    data, y = round_trip(x, algorithm, wire)
    assert np.array_equal(bits(y), bits(reference_dequantize(data, x.size, wire, algorithm)))
    qmin, qmax, _, _ = WIRE[wire]
    values = wire_values(data, x.size, wire)
    assert values.min() >= qmin and values.max() <= qmax
    if algorithm == ZERO_POINT_SCALE:
        zero_points = wire_params(data, x.size)[:, 1]
        assert np.all(zero_points == np.round(zero_points))
        assert np.all((zero_points >= qmin) & (zero_points <= qmax))


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_constant_blocks_are_exact(algorithm, wire):
    constants = [0.0, -0.0, 1.5, -3.25, 1e-30, -7e20, 0.1, -0.1, 2.0**-140, 3.0e38, -3.4028235e38]
    x = np.concatenate([np.full(BLOCK, c, np.float32) for c in constants] + [np.full(7, -2.5, np.float32)])
    _, y = round_trip(x, algorithm, wire)
    assert np.array_equal(y, x)  # -0.0 comes back as 0.0, which compares equal


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_zero_is_exact_with_zero_point_scale_and_min_max_keeps_the_minimum(algorithm, wire):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(8 * BLOCK).astype(np.float32)
    x[::5] = 0.0
    _, y = round_trip(x, algorithm, wire)
    if algorithm == ZERO_POINT_SCALE:
        assert np.all(y[::5] == 0.0)
    blocks_x, blocks_y = x.reshape(-1, BLOCK), y.reshape(-1, BLOCK)
    if algorithm == MIN_MAX:
        assert np.array_equal(blocks_y.min(axis=1), blocks_x.min(axis=1))


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_all_negative_data(algorithm, wire):
    x = (-np.abs(np.random.default_rng(4).standard_normal(5 * BLOCK + 3)) - 0.5).astype(np.float32)
    data, y = round_trip(x, algorithm, wire)
    assert np.all(y < 0)
    assert np.all(np.abs(y - x) <= error_bound(x, data, algorithm, wire))
    qmin, qmax, _, _ = WIRE[wire]
    relative_step = 1.0 / (qmax - qmin)
    # The whole block range is used: the error is a fraction of a step of the data's own range.
    assert np.abs(y - x).max() <= (x.max() - x.min()) * relative_step


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_non_finite_blocks_become_canonical_nan_and_only_those(algorithm, wire):
    n = 7 * BLOCK + 13
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    bad = {1: np.nan, 3: np.inf, 5: -np.inf, 7: np.nan}  # block 7 is the short last one
    for block, value in bad.items():
        x[block * BLOCK + 3] = value
    data, y = round_trip(x, algorithm, wire)
    dtype, nan_bits = CANONICAL_NAN_BITS[FLOAT]
    for block in range(blocks(n)):
        part = slice(block * BLOCK, min(n, (block + 1) * BLOCK))
        if block in bad:
            assert np.all(y[part].view(dtype) == nan_bits)
            assert np.all(wire_params(data, n)[block].view(np.uint32) == CANONICAL_NAN_BITS[FLOAT][1])
            assert not wire_values(data, n, wire)[part].any()
        else:
            assert np.all(np.isfinite(y[part]))
    good = np.isfinite(y)
    assert np.all(np.abs(y - x)[good] <= error_bound(np.where(good, x, 0), data, algorithm, wire)[good])


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_blocks_beyond_float32_range_become_nan(algorithm, wire):
    x = np.concatenate([np.array([-3e38, 3e38] * (BLOCK // 2), np.float32), np.ones(BLOCK, np.float32)])
    _, y = round_trip(x, algorithm, wire)
    assert np.all(np.isnan(y[:BLOCK]))
    assert np.array_equal(y[BLOCK:], x[BLOCK:])


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_quantize_and_dequantize_are_deterministic(algorithm, wire):
    x = np.random.default_rng(6).standard_normal(3 * BLOCK + 1).astype(np.float32)
    data = q.quantize(x, wire, algorithm)
    assert q.quantize(x.copy(), wire, algorithm) == data
    first = q.dequantize(data, x.size, FLOAT, wire, algorithm)
    again = q.dequantize(bytes(bytearray(data)), x.size, FLOAT, wire, algorithm)
    assert np.array_equal(bits(first), bits(again))
    # Any bytes at all decode the same way twice (a pure function of the wire).
    noise = np.random.default_rng(7).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    a = q.dequantize(noise, x.size, FLOAT, wire, algorithm)
    b = q.dequantize(noise, x.size, FLOAT, wire, algorithm)
    assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_pieces_cut_at_block_boundaries_decode_like_the_whole(algorithm, wire):
    x = np.random.default_rng(8).standard_normal(20 * BLOCK + 9).astype(np.float32)
    whole = q.dequantize(q.quantize(x, wire, algorithm), x.size, FLOAT, wire, algorithm)
    cut = 12 * BLOCK
    pieces = [q.dequantize(q.quantize(p, wire, algorithm), p.size, FLOAT, wire, algorithm) for p in (x[:cut], x[cut:])]
    assert np.array_equal(bits(np.concatenate(pieces)), bits(whole))


# ---- other sources -------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,wire", FORMATS)
@pytest.mark.parametrize("n", SIZES)
def test_float64_source(algorithm, wire, n):
    rng = np.random.default_rng(9)
    for name, x in data_sets(n, rng).items():
        data, y = round_trip(x, algorithm, wire, source=DOUBLE)
        assert y.dtype == np.float64
        bound = error_bound(x, data, algorithm, wire)
        assert np.all(np.abs(y - x) <= bound), name
    constant = np.full(BLOCK + 5, -0.375)
    assert np.array_equal(round_trip(constant, algorithm, wire, source=DOUBLE)[1], constant)
    x = np.ones(2 * BLOCK)
    x[BLOCK + 1] = np.nan
    y = round_trip(x, algorithm, wire, source=DOUBLE)[1]
    assert np.array_equal(y[:BLOCK], x[:BLOCK])
    assert np.all(y[BLOCK:].view(np.uint64) == CANONICAL_NAN_BITS[DOUBLE][1])


@pytest.mark.parametrize("algorithm,wire", FORMATS)
@pytest.mark.parametrize("n", SIZES)
def test_float16_source(algorithm, wire, n):
    rng = np.random.default_rng(10)
    for name in ("normal", "all_negative"):
        x = data_sets(n, rng)[name].astype(np.float16)
        data, y = round_trip(x, algorithm, wire, source=FLOAT16)
        assert y.dtype == np.float16
        bound = error_bound(x, data, algorithm, wire, source_ulp=2.0**-11)
        assert np.all(np.abs(y.astype(np.float64) - x) <= bound), name
        # Computed in float32 and rounded once: exactly the float32 formula, rounded to float16.
        expected = reference_dequantize(data, n, wire, algorithm).astype(np.float16)
        assert np.array_equal(bits(y), bits(expected))
    x = np.full(BLOCK, np.float16(-1.5))
    x[0] = np.inf
    y = round_trip(x, algorithm, wire, source=FLOAT16)[1]
    assert np.all(y.view(np.uint16) == CANONICAL_NAN_BITS[FLOAT16][1])


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_bfloat16_source(algorithm, wire):
    torch = pytest.importorskip("torch")
    n = 3 * BLOCK + 17
    x = torch.randn(n, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    x_bits = x.view(torch.int16).numpy().view(np.uint16)
    data, y_bits = round_trip(x_bits, algorithm, wire, source=BFLOAT16, source_dtype=BFLOAT16)
    assert y_bits.dtype == np.uint16
    y = torch.from_numpy(y_bits.view(np.int16)).view(torch.bfloat16).double().numpy()
    x64 = x.double().numpy()
    bound = error_bound(x64, data, algorithm, wire, source_ulp=2.0**-8)
    assert np.all(np.abs(y - x64) <= bound)
    reference = torch.from_numpy(reference_dequantize(data, n, wire, algorithm)).to(torch.bfloat16)
    assert np.array_equal(y_bits, reference.view(torch.int16).numpy().view(np.uint16))
    reduced = q.dequantize_reduce(data, x_bits, SUM, 0, wire, algorithm, source_dtype=BFLOAT16)
    expected = (torch.from_numpy(reference_dequantize(data, n, wire, algorithm)) + x.float()).to(torch.bfloat16)
    assert np.array_equal(reduced, expected.view(torch.int16).numpy().view(np.uint16))
    nan_block = np.full(BLOCK, 0x3F80, np.uint16)  # 1.0
    nan_block[9] = 0x7F80  # +inf
    y = round_trip(nan_block, algorithm, wire, source=BFLOAT16, source_dtype=BFLOAT16)[1]
    assert np.all(y == CANONICAL_NAN_BITS[BFLOAT16][1])


# ---- the fused reduce --------------------------------------------------------------------------

NUMPY_OPS = {SUM: np.add, AVG: np.add, PROD: np.multiply, MAX: np.maximum, MIN: np.minimum}


def expected_reduce(deq: np.ndarray, local: np.ndarray, op: int, divide_by: int) -> np.ndarray:
    out = NUMPY_OPS[op](deq, local)
    if op == AVG and divide_by:
        out = out / out.dtype.type(divide_by)
    return out


@pytest.mark.parametrize("algorithm,wire", FORMATS)
@pytest.mark.parametrize("source", [FLOAT, DOUBLE])
@pytest.mark.parametrize("op,divide_by", [(SUM, 0), (AVG, 0), (AVG, 3), (PROD, 0), (MAX, 0), (MIN, 0)])
def test_dequantize_reduce_equals_dequantize_then_op_bit_for_bit(algorithm, wire, source, op, divide_by):
    dtype = SOURCE_NUMPY[source]
    rng = np.random.default_rng(12)
    n = 9 * BLOCK + 31
    x = rng.standard_normal(n).astype(dtype)
    local = rng.standard_normal(n).astype(dtype)
    # NaN in the local operand propagates like the unquantised reduce; its sign bit differs from the
    # canonical NaN, which a non-finite wire block (block 4) must still produce whatever the op.
    local[::97] = -np.nan
    x[4 * BLOCK + 2] = np.inf  # block 4 is non-finite on the wire
    data = q.quantize(x, wire, algorithm)
    deq = q.dequantize(data, n, source, wire, algorithm)
    expected = expected_reduce(deq, local, op, divide_by)
    expected[4 * BLOCK:5 * BLOCK] = np.nan
    got = q.dequantize_reduce(data, local, op, divide_by, wire, algorithm)
    got_nan, expected_nan = np.isnan(got), np.isnan(expected)
    assert np.array_equal(got_nan, expected_nan)
    assert np.array_equal(bits(got)[~got_nan], bits(expected)[~expected_nan])
    nan_dtype, nan_bits = CANONICAL_NAN_BITS[source]
    assert np.all(got[4 * BLOCK:5 * BLOCK].view(nan_dtype) == nan_bits)
    in_place = local.copy()
    returned = q.dequantize_reduce(data, in_place, op, divide_by, wire, algorithm, in_place=True)
    assert np.shares_memory(returned, in_place)
    assert np.array_equal(bits(in_place), bits(got))


@pytest.mark.parametrize("algorithm,wire", FORMATS)
def test_dequantize_reduce_float16_rounds_once(algorithm, wire):
    rng = np.random.default_rng(13)
    n = 4 * BLOCK + 5
    x = rng.standard_normal(n).astype(np.float16)
    local = rng.standard_normal(n).astype(np.float16)
    data = q.quantize(x, wire, algorithm)
    deq32 = reference_dequantize(data, n, wire, algorithm)  # not rounded to float16 first
    for op, divide_by in [(SUM, 0), (AVG, 2), (PROD, 0), (MAX, 0)]:
        expected = expected_reduce(deq32, local.astype(np.float32), op, divide_by).astype(np.float16)
        got = q.dequantize_reduce(data, local, op, divide_by, wire, algorithm)
        assert got.dtype == np.float16
        assert np.array_equal(bits(got), bits(expected))


@pytest.mark.parametrize("constant", [0.0, 1.0, 2.0**-5, 3.0, -1.5])
def test_float16_conversions_round_every_value_like_numpy(constant):
    """Every float16 bit pattern through widen, the float32 op and the rounding back (SUM with an
    exact zero, PROD with exact constants that push results into subnormals and past 65504)."""
    local = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    data = q.quantize(np.full(local.size, constant, np.float16), UINT8, MIN_MAX)
    op = SUM if constant == 0.0 else PROD
    with np.errstate(invalid="ignore", over="ignore"):
        expected = NUMPY_OPS[op](np.float32(constant), local.astype(np.float32)).astype(np.float16)
    got = q.dequantize_reduce(data, local, op, 0, UINT8, MIN_MAX)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(bits(got)[~nan], bits(expected)[~nan])


# ---- the accuracy of a quantised ring ------------------------------------------------------------


def simulated_ring_error(wire: int, algorithm: int, n: int = 1 << 20, seed: int = 2024) -> float:
    """A 2-peer ring SUM of N(0,1) float32 data, with the kernels used as the ring uses them.

    Chunk c starts at peer c, which quantises it; the other peer (its owner) dequantize_reduces it
    with its own data, quantises the final sum and sends it round; every peer's result is the
    dequantisation of those bytes (the owner's too, so all peers hold the same bits)."""
    rng = np.random.default_rng(seed)
    peers = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)]
    exact = peers[0].astype(np.float64) + peers[1]
    result = np.empty(n, np.float32)
    bounds = [0, n // 2, n]
    for chunk in range(2):
        part = slice(bounds[chunk], bounds[chunk + 1])
        starter, owner = peers[chunk], peers[1 - chunk]
        sent = q.quantize(starter[part], wire, algorithm)
        reduced = q.dequantize_reduce(sent, owner[part], SUM, 0, wire, algorithm)
        final = q.quantize(reduced, wire, algorithm)
        result[part] = q.dequantize(final, reduced.size, FLOAT, wire, algorithm)
    return float(np.linalg.norm(result - exact) / np.linalg.norm(exact))


def test_simulated_ring_accuracy_meets_the_target():
    errors = {
        "uint8 MIN_MAX": simulated_ring_error(UINT8, MIN_MAX),
        "uint8 ZERO_POINT_SCALE": simulated_ring_error(UINT8, ZERO_POINT_SCALE),
        "int8 ZERO_POINT_SCALE": simulated_ring_error(INT8, ZERO_POINT_SCALE),
        "uint16 MIN_MAX": simulated_ring_error(UINT16, MIN_MAX),
    }
    for name, error in errors.items():
        print(f"2-peer quantised ring SUM, relative L2 error, {name}: {error:.3e}")
    assert errors["uint8 MIN_MAX"] <= RING_ERROR_TARGET
    assert errors["uint8 ZERO_POINT_SCALE"] <= RING_ERROR_TARGET
    assert errors["int8 ZERO_POINT_SCALE"] <= RING_ERROR_TARGET
    assert errors["uint16 MIN_MAX"] <= RING_ERROR_TARGET / 200
