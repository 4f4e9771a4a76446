"""The pure-Python API surface: enums, conversions, errors, value classes and buffer validation.

Nothing here needs the network or the compiled core.
"""

from __future__ import annotations

import enum
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from pccl._buffers import Staging, as_buffer, is_in_place, validate_pair
from pccl._descriptors import (
    QuantizationOptions, ReduceDescriptor, ReduceInfo, ReduceOpDescriptor, ReduceOperandDescriptor,
    SharedState, SharedStateSyncInfo, TensorInfo, core_reduce_args,
)
from pccl._errors import PCCLError
from pccl._types import (
    Attribute, DataType, DeviceType, DistributionHint, QuantizationAlgorithm, ReduceOp, Result,
    SharedStateSyncStrategy, peer_timeout_ms,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_ALL = {
    "cuda", "Communicator", "MasterNode", "ReduceOp", "Attribute", "SharedStateSyncStrategy", "DataType",
    "DistributionHint", "QuantizationAlgorithm", "ReduceOperandDescriptor", "QuantizationOptions",
    "ReduceDescriptor", "TensorInfo", "SharedState", "SharedStateSyncInfo", "ReduceInfo", "ReduceOpDescriptor",
    "AsyncReduceHandle", "PCCLError",
}


def members(e: type[enum.Enum]) -> dict[str, int]:
    return {m.name: m.value for m in e}


# -- module and enums ----------------------------------------------------------------------------

def test_all_matches_spec_and_extras_are_importable() -> None:
    import pccl

    assert set(pccl.__all__) == SPEC_ALL and len(pccl.__all__) == len(SPEC_ALL)
    assert pccl.Result is Result and pccl.DeviceType is DeviceType
    assert callable(pccl.cuda.is_available)


def test_import_without_torch_and_clear_torch_error() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail as if not installed
        "import pccl\n"
        "assert pccl.cuda.is_available() is False\n"
        "try:\n    pccl.DataType.FLOAT.to_torch_dtype()\n"
        "except ImportError as e:\n    assert 'PyTorch' in str(e), e\n"
        "else:\n    raise AssertionError('no ImportError')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_import_pccl_does_not_import_torch() -> None:
    code = "import sys, pccl; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_result_codes_match_spec() -> None:
    assert members(Result) == {
        "SUCCESS": 0, "NOT_INITIALIZED": 1, "INTERNAL_ERROR": 2, "INVALID_ARGUMENT": 3, "INVALID_USAGE": 4,
        "TOO_FEW_PEERS": 5, "MASTER_CONNECTION_FAILED": 6, "RANK_CONNECTION_FAILED": 7,
        "RANK_CONNECTION_LOST": 8, "NO_SHARED_STATE_AVAILABLE": 9, "PENDING_ASYNC_OPS": 10,
        "UPDATE_TOPOLOGY_FAILED": 11, "TOPOLOGY_OPTIMIZATION_FAILED": 12,
    }


def test_enum_values_crossing_into_the_core() -> None:
    assert members(DataType) == {
        "UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "UINT64": 6, "INT64": 7,
        "FLOAT16": 8, "BFLOAT16": 9, "FLOAT": 10, "DOUBLE": 11,
    }
    assert members(ReduceOp) == {"SUM": 0, "AVG": 1, "PROD": 2, "MAX": 3, "MIN": 4}
    assert members(QuantizationAlgorithm) == {"NONE": 0, "MIN_MAX": 1, "ZERO_POINT_SCALE": 2}
    assert members(Attribute) == {
        "GLOBAL_WORLD_SIZE": 0, "LOCAL_WORLD_SIZE": 1, "NUM_DISTINCT_PEER_GROUPS": 2,
        "LARGEST_PEER_GROUP_WORLD_SIZE": 3,
    }
    assert members(SharedStateSyncStrategy) == {"ENFORCE_POPULAR": 0, "RECEIVE_ONLY": 1, "SEND_ONLY": 2}
    assert members(DeviceType) == {"CPU": 0, "CUDA": 1}
    assert members(DistributionHint) == {"NONE": 0, "NORMAL": 1, "UNIFORM": 2}
    for e in (Result, ReduceOp, Attribute, SharedStateSyncStrategy, DataType, DeviceType, DistributionHint,
              QuantizationAlgorithm):
        assert issubclass(e, enum.Enum)


# -- DataType conversions ------------------------------------------------------------------------

NUMPY_PAIRS = [
    (np.uint8, DataType.UINT8), (np.int8, DataType.INT8), (np.uint16, DataType.UINT16),
    (np.int16, DataType.INT16), (np.uint32, DataType.UINT32), (np.int32, DataType.INT32),
    (np.uint64, DataType.UINT64), (np.int64, DataType.INT64), (np.float16, DataType.FLOAT16),
    (np.float32, DataType.FLOAT), (np.float64, DataType.DOUBLE),
]


@pytest.mark.parametrize(("np_type", "dt"), NUMPY_PAIRS)
def test_numpy_dtype_round_trip(np_type: type, dt: DataType) -> None:
    assert DataType.from_numpy_dtype(np_type) is dt
    assert DataType.from_numpy_dtype(np.dtype(np_type)) is dt
    assert dt.to_numpy_dtype() == np.dtype(np_type)
    assert dt.itemsize == np.dtype(np_type).itemsize


@pytest.mark.parametrize("bad", [np.bool_, np.complex64, np.dtype(">f4"), object, "U3", None])
def test_unsupported_numpy_dtype_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="unsupported numpy dtype"):
        DataType.from_numpy_dtype(bad)


def test_bfloat16_numpy_needs_ml_dtypes() -> None:
    assert DataType.BFLOAT16.itemsize == 2
    try:
        import ml_dtypes
    except ImportError:
        with pytest.raises(ValueError, match="ml_dtypes"):
            DataType.BFLOAT16.to_numpy_dtype()
    else:
        assert DataType.from_numpy_dtype(DataType.BFLOAT16.to_numpy_dtype()) is DataType.BFLOAT16
        assert DataType.BFLOAT16.to_numpy_dtype() == np.dtype(ml_dtypes.bfloat16)


def test_torch_dtype_round_trip() -> None:
    torch = pytest.importorskip("torch")
    for dt in DataType:
        assert DataType.from_torch_dtype(dt.to_torch_dtype()) is dt
    assert DataType.from_torch_dtype(torch.float32) is DataType.FLOAT
    assert DataType.BFLOAT16.to_torch_dtype() is torch.bfloat16
    with pytest.raises(ValueError, match="unsupported torch dtype"):
        DataType.from_torch_dtype(torch.complex64)


# -- errors --------------------------------------------------------------------------------------

def test_pccl_error_fields_and_message() -> None:
    err = PCCLError(Result.RANK_CONNECTION_LOST, "all_reduce", "peer 3 at 127.0.0.1:4000 left the ring")
    assert isinstance(err, Exception)
    assert err.result is Result.RANK_CONNECTION_LOST and err.func_name == "all_reduce"
    assert str(err) == "all_reduce failed: RANK_CONNECTION_LOST (peer 3 at 127.0.0.1:4000 left the ring)"
    assert str(PCCLError(5, "connect")) == "connect failed: TOO_FEW_PEERS"
    assert PCCLError(5, "connect").result is Result.TOO_FEW_PEERS
    unknown = PCCLError(99, "connect")
    assert unknown.result is Result.INTERNAL_ERROR and "99" in str(unknown)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.result, copy.func_name, copy.detail, str(copy)) == (err.result, err.func_name, err.detail, str(err))


def test_pccl_error_check() -> None:
    PCCLError.check(0, "connect")
    PCCLError.check(Result.SUCCESS, "connect")
    with pytest.raises(PCCLError) as info:
        PCCLError.check(1, "get_attribute", "never connected")
    assert info.value.result is Result.NOT_INITIALIZED
    assert str(info.value) == "get_attribute failed: NOT_INITIALIZED (never connected)"


# -- value classes -------------------------------------------------------------------------------

def test_value_classes() -> None:
    assert QuantizationOptions() == QuantizationOptions(DataType.UINT8, QuantizationAlgorithm.MIN_MAX)
    operand = ReduceOperandDescriptor(DataType.FLOAT)
    assert operand.distribution_hint is DistributionHint.NONE
    desc = ReduceDescriptor(4, ReduceOp.SUM, 7, operand, QuantizationOptions())
    assert (desc.count, desc.op, desc.tag) == (4, ReduceOp.SUM, 7)
    info = ReduceInfo(local_world_size=3, tx_bytes=10, rx_bytes=20)
    assert (info.local_world_size, info.tx_bytes, info.rx_bytes) == (3, 10, 20)
    assert "local_world_size=3" in repr(info)
    sync = SharedStateSyncInfo(1, 2)
    assert (sync.tx_bytes, sync.rx_bytes) == (1, 2)


def test_shared_state_revision_and_tensor_info_references() -> None:
    weights = np.zeros(8, dtype=np.float32)
    info = TensorInfo.from_numpy(weights, "weights")
    assert info.data_ptr == weights.ctypes.data and info.numel == 8
    assert info.dtype is DataType.FLOAT and info.device_type is DeviceType.CPU
    assert info.allow_content_inequality is False and info.tensor is weights
    state = SharedState([info, TensorInfo.from_numpy(np.ones(2), "step", allow_content_inequality=True)])
    assert state.revision == 0
    state.push_revision()
    assert state.revision == 1
    state.revision = 41
    state.push_revision()
    assert state.revision == 42
    with pytest.raises(ValueError):
        state.revision = -1
    with pytest.raises(ValueError, match="unique"):
        SharedState([info, info])
    with pytest.raises(ValueError, match="contiguous"):
        TensorInfo.from_numpy(np.zeros((4, 4), dtype=np.float32)[:, 0], "w")
    with pytest.raises(TypeError):
        TensorInfo.from_numpy([1.0, 2.0], "w")  # type: ignore[arg-type]
    raw = TensorInfo("w", weights.ctypes.data, numel=8, dtype=DataType.FLOAT, device_type=DeviceType.CPU,
                     allow_content_inequality=False)
    assert raw.tensor is None


def test_reduce_op_descriptor_from_numpy_validates_and_keeps_references() -> None:
    send, recv = np.ones(4, dtype=np.float32), np.zeros(4, dtype=np.float32)
    desc = ReduceDescriptor(4, ReduceOp.AVG, 1, ReduceOperandDescriptor(DataType.FLOAT), None)
    op = ReduceOpDescriptor.from_numpy(send, recv, desc)
    assert (op.sendbuf_ptr, op.recvbuf_ptr) == (send.ctypes.data, recv.ctypes.data)
    assert op.buffers is not None and op.buffers[0].obj is send and op.buffers[1].obj is recv
    with pytest.raises(ValueError, match="count"):
        ReduceOpDescriptor.from_numpy(send, recv, ReduceDescriptor(3, ReduceOp.SUM, 1, desc.operand_descriptor, None))
    with pytest.raises(ValueError, match="operand_descriptor"):
        ReduceOpDescriptor.from_numpy(
            send, recv, ReduceDescriptor(4, ReduceOp.SUM, 1, ReduceOperandDescriptor(DataType.DOUBLE), None))
    with pytest.raises(ValueError, match="dtypes differ"):
        ReduceOpDescriptor.from_numpy(send, recv.astype(np.float64), desc)
    with pytest.raises(TypeError):
        ReduceOpDescriptor.from_numpy(send, [0.0] * 4, desc)  # type: ignore[arg-type]


def test_core_reduce_args() -> None:
    args = core_reduce_args(4, DataType.FLOAT, ReduceOp.MAX, 9, None, None)
    assert (args.count, args.dtype, args.op, args.tag, args.quant_algorithm) == (4, 10, 3, 9, 0)
    quant = QuantizationOptions(DataType.UINT8, QuantizationAlgorithm.ZERO_POINT_SCALE)
    args = core_reduce_args(4, DataType.FLOAT, ReduceOp.SUM, 0, ReduceOperandDescriptor(DataType.FLOAT), quant)
    assert (args.quant_algorithm, args.quant_dtype) == (2, 0)
    none = QuantizationOptions(DataType.UINT8, QuantizationAlgorithm.NONE)
    assert core_reduce_args(4, DataType.FLOAT, ReduceOp.SUM, 0, None, none).quant_algorithm == 0
    with pytest.raises(ValueError, match="operand_descriptor"):
        core_reduce_args(4, DataType.FLOAT, ReduceOp.SUM, 0, ReduceOperandDescriptor(DataType.INT32), None)
    with pytest.raises(ValueError, match="tag"):
        core_reduce_args(4, DataType.FLOAT, ReduceOp.SUM, -1, None, None)
    with pytest.raises(ValueError, match="op"):
        core_reduce_args(4, DataType.FLOAT, "sum", 0, None, None)


def test_peer_timeout_conversion() -> None:
    assert peer_timeout_ms(None) == 0
    assert peer_timeout_ms(2.5) == 2500
    assert peer_timeout_ms(0.0001) == 1
    for bad in (0, -1, float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError):
            peer_timeout_ms(bad)  # type: ignore[arg-type]


# -- buffer validation ---------------------------------------------------------------------------

def test_buffer_of_numpy_array() -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    buf = as_buffer(a, "send")
    assert (buf.ptr, buf.numel, buf.nbytes) == (a.ctypes.data, 6, 24)
    assert buf.dtype is DataType.INT32 and buf.device is DeviceType.CPU and not buf.readonly and buf.obj is a
    assert as_buffer(np.zeros(0, dtype=np.float32), "send").ptr == 0


def test_validate_pair_accepts_in_place_and_disjoint() -> None:
    a = np.ones(4, dtype=np.float32)
    s, r = validate_pair(a, a)
    assert is_in_place(s, r)
    s, r = validate_pair(a, np.empty_like(a))
    assert not is_in_place(s, r)
    s, r = validate_pair(a[:0], a[:0])
    assert s.numel == 0 and s.ptr == 0
    staging = Staging(s, r)
    assert (staging.send_ptr, staging.recv_ptr) == (0, 0)
    staging.finish(True)


@pytest.mark.parametrize(
    ("send", "recv", "error", "match"),
    [
        (np.ones((4, 4), np.float32)[:, 1], np.ones(4, np.float32), ValueError, "send must be C-contiguous"),
        (np.ones(4, np.float32), np.ones((4, 4), np.float32)[:, 1], ValueError, "recv must be C-contiguous"),
        (np.ones(4, np.bool_), np.ones(4, np.bool_), ValueError, "send: unsupported numpy dtype"),
        (np.ones(4, np.float32), np.ones(4, np.float64), ValueError, "dtypes differ"),
        (np.ones(4, np.float32), np.ones(5, np.float32), ValueError, "sizes differ"),
        ([1.0, 2.0], np.ones(2, np.float32), TypeError, "send must be a numpy.ndarray or a torch.Tensor"),
        (np.ones(2, np.float32), memoryview(b"12345678"), TypeError, "recv must be"),
    ],
)
def test_validate_pair_rejects(send: object, recv: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        validate_pair(send, recv)


def test_validate_pair_rejects_read_only_recv() -> None:
    recv = np.zeros(4, np.float32)
    recv.flags.writeable = False
    with pytest.raises(ValueError, match="recv is read-only"):
        validate_pair(np.ones(4, np.float32), recv)
    validate_pair(recv, np.zeros(4, np.float32))  # a read-only send is fine


def test_validate_pair_rejects_partial_overlap() -> None:
    base = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="partially overlap"):
        validate_pair(base[0:4], base[2:6])
    with pytest.raises(ValueError, match="partially overlap"):
        validate_pair(base[2:6], base[0:4])
    validate_pair(base[0:4], base[4:8])  # adjacent is not overlapping
    view = base.view(np.int32)
    with pytest.raises(ValueError, match="dtypes differ"):
        validate_pair(base[:4], view[:4])


# -- torch paths ---------------------------------------------------------------------------------

def test_torch_cpu_buffers_are_used_in_place() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32)
    s, r = validate_pair(t, t)
    assert s.ptr == t.data_ptr() and s.device is DeviceType.CPU and is_in_place(s, r)
    staging = Staging(s, r)
    assert staging.send_ptr == t.data_ptr()
    with pytest.raises(ValueError, match="send must be contiguous"):
        validate_pair(t.view(2, 3).t(), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="partially overlap"):
        validate_pair(t[0:4], t[2:6])
    with pytest.raises(ValueError, match="dtypes differ"):
        validate_pair(t, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="send: unsupported torch dtype"):
        validate_pair(torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="device"):
        validate_pair(torch.zeros(2, device="meta"), torch.zeros(2, device="meta"))


def test_torch_descriptors() -> None:
    torch = pytest.importorskip("torch")
    t = torch.ones(4, dtype=torch.bfloat16)
    info = TensorInfo.from_torch(t, "t")
    assert info.dtype is DataType.BFLOAT16 and info.data_ptr == t.data_ptr() and info.tensor is t
    desc = ReduceDescriptor(4, ReduceOp.SUM, 0, ReduceOperandDescriptor(DataType.BFLOAT16), None)
    op = ReduceOpDescriptor.from_torch(t, t, desc)
    assert op.sendbuf_ptr == op.recvbuf_ptr == t.data_ptr()
    with pytest.raises(TypeError):
        ReduceOpDescriptor.from_torch(np.ones(4), t, desc)


def test_core_loads_from_a_source_checkout():
    """`python -m pccl.demo` in the repository's root imports the source tree first; after a regular
    (non-editable) install the compiled module must still be found (in the installed copy)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import pccl, pccl._core; print(pccl._core.__file__)"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
