"""A peer process for the tests: `python peer_main.py '<json spec>'`.

The spec names a scenario (a function below) and its arguments. Scenarios print JSON lines (events)
that the test reads back; they exit 0 when they ran to the end, whatever the events say.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

import pccl
from pccl import Attribute, PCCLError, ReduceOp, Result

INT_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"]
FLOAT_DTYPES = ["float16", "float32", "float64"]
ALL_DTYPES = INT_DTYPES + FLOAT_DTYPES + ["bfloat16"]
OPS = ["SUM", "AVG", "PROD", "MAX", "MIN"]


_EMIT_LOCK = threading.Lock()


def emit(**event: Any) -> None:
    """One JSON line per event, whole even when several threads report at once."""
    event.setdefault("t", time.time())
    line = json.dumps(event) + "\n"
    with _EMIT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def digest(array: Any) -> str:
    if hasattr(array, "numpy"):  # torch: hash the raw bytes, bfloat16 included
        import torch
        array = array.detach().cpu().contiguous().view(torch.uint8 if array.element_size() == 1 else torch.int16
                                        if array.element_size() == 2 else torch.int32
                                        if array.element_size() == 4 else torch.int64).numpy()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def local_world(comm: pccl.Communicator) -> int:
    return comm.get_attribute(Attribute.LOCAL_WORLD_SIZE)


def join(comm: pccl.Communicator, world: int, timeout: float = 60.0, attribute=Attribute.LOCAL_WORLD_SIZE) -> None:
    """Pump membership (the collective pending vote) until the world has `world` peers."""
    deadline = time.monotonic() + timeout
    while comm.get_attribute(attribute) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"world stayed at {comm.get_attribute(attribute)} < {world}")
        if comm.are_peers_pending():
            comm.update_topology()
        else:
            time.sleep(0.02)


def connect(spec: dict[str, Any]) -> pccl.Communicator:
    comm = pccl.Communicator(spec["master"], peer_group=spec.get("group", 0),
                             p2p_connection_pool_size=spec.get("pool", 1))
    comm.connect(n_attempts=spec.get("attempts", 20))
    return comm


# ------------------------------------------------------------------ data for the correctness matrix

def make_input(dtype: str, op: str, count: int, index: int, case_id: int) -> np.ndarray:
    """Cheap, deterministic, varied data; floats are multiples of 1/16 so sums are mostly exact."""
    i = np.arange(count, dtype=np.int64)
    k = (i * (7 + 2 * index) + 3 * index + case_id) % 101 - 50
    if dtype in INT_DTYPES:
        if op == "PROD":
            k = k % 3 - (0 if dtype.startswith("u") else 1)
        elif dtype.startswith("u"):
            k = k + 50
        return k.astype(dtype)
    values = 1.0 + k / 128.0 if op == "PROD" else k / 16.0
    return values.astype("float32" if dtype == "bfloat16" else dtype)


def expected_result(dtype: str, op: str, inputs: list[np.ndarray]) -> np.ndarray:
    n = len(inputs)
    if dtype in INT_DTYPES:
        acc = inputs[0].copy()
        for x in inputs[1:]:
            acc = {"SUM": np.add, "AVG": np.add, "PROD": np.multiply, "MAX": np.maximum, "MIN": np.minimum}[op](acc, x)
        if op == "AVG":  # truncating integer division of the (wrapped) sum
            wide = acc.astype(np.uint64 if dtype.startswith("u") else np.int64)
            if dtype.startswith("u"):
                acc = (wide // n).astype(dtype)
            else:
                acc = (np.sign(wide) * (np.abs(wide) // n)).astype(dtype)
        return acc
    xs = [x.astype(np.float64) for x in inputs]
    if op in ("SUM", "AVG"):
        r = np.sum(xs, axis=0)
        return r / n if op == "AVG" else r
    if op == "PROD":
        return np.prod(xs, axis=0)
    return (np.max if op == "MAX" else np.min)(xs, axis=0)


def tolerance(dtype: str, op: str, n: int) -> float:
    if dtype in INT_DTYPES or op in ("MAX", "MIN"):
        return 0.0
    return {"float16": 4e-3, "bfloat16": 3e-2, "float32": 1e-6, "float64": 1e-12}[dtype] * n


def as_buffer(values: np.ndarray, dtype: str, backend: str = "numpy"):
    """numpy as is; "torch" a CPU tensor; "cuda" a tensor on the GPU (bfloat16 always via torch)."""
    if dtype == "bfloat16" or backend in ("torch", "cuda"):
        import torch
        t = torch.from_numpy(values)
        if dtype == "bfloat16":
            t = t.to(torch.bfloat16)
        return t.cuda() if backend == "cuda" else t
    return values


def to_float64(buf: Any) -> np.ndarray:
    if hasattr(buf, "numpy"):
        import torch
        return buf.to(torch.float64).numpy()
    return buf.astype(np.float64)


def scenario_matrix(spec: dict[str, Any]) -> None:
    comm = connect(spec)
    world, index = spec["world"], spec["index"]
    join(comm, world)
    dtypes = spec.get("dtypes", ALL_DTYPES)
    if "bfloat16" in dtypes:
        try:
            import torch  # noqa: F401
        except ImportError:
            dtypes = [d for d in dtypes if d != "bfloat16"]
            emit(event="skip", what="bfloat16 needs torch")
    case_id = 0
    for dtype in dtypes:
        for op in spec.get("ops", OPS):
            for count in spec.get("counts", [0, 1, 3, 1000, 10**6 + 7]):
                for inplace in (True, False):
                    case_id += 1
                    inputs = [make_input(dtype, op, count, j, case_id) for j in range(world)]
                    mine = inputs[index]
                    send = as_buffer(mine.copy(), dtype, spec.get("backend", "numpy"))
                    recv = send if inplace else as_buffer(np.zeros_like(mine), dtype, spec.get("backend", "numpy"))
                    info = comm.all_reduce(send, recv, op=getattr(ReduceOp, op), tag=case_id % 7)
                    if dtype == "bfloat16":  # the inputs themselves were rounded to bfloat16
                        want = expected_result("float64", op, [to_float64(as_buffer(x, dtype)) for x in inputs])
                    else:
                        want = expected_result(dtype, op, inputs)
                    got = recv.numpy() if hasattr(recv, "numpy") and dtype != "bfloat16" else recv
                    if dtype in INT_DTYPES:
                        ok = bool(np.array_equal(got, want))
                        err = 0.0 if ok else float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                    else:
                        g = to_float64(got)
                        err = float(np.max(np.abs(g - want) / np.maximum(1.0, np.abs(want)))) if count else 0.0
                        ok = err <= tolerance(dtype, op, world)
                    send_intact = True
                    if not inplace:
                        send_intact = bool(np.array_equal(to_float64(send), to_float64(as_buffer(mine, dtype, "numpy"))))
                    emit(case=f"{dtype}/{op}/{count}/{'in' if inplace else 'out'}", ok=ok and send_intact,
                         err=err, send_intact=send_intact, digest=digest(got), world=info.local_world_size,
                         tx=info.tx_bytes, rx=info.rx_bytes)
    comm.close()
    emit(event="done")


# ------------------------------------------------------------------ training-loop style scenarios

def scenario_loop(spec: dict[str, Any]) -> None:
    """all_reduce in a loop with the membership pump and retries, like a training loop.

    Every peer contributes index+1 everywhere, so a result tells which peers took part. Ends after
    `ops` successes, when left alone for `alone_grace` seconds, or after `max_seconds`.
    """
    comm = connect(spec)
    emit(event="connected", world=local_world(comm))
    join(comm, spec.get("world", 2), attribute=Attribute.LOCAL_WORLD_SIZE)
    count = spec.get("count", 1 << 20)
    index = spec["index"]
    ops, successes = spec.get("ops", 50), 0
    x = None
    started = time.monotonic()
    last_success = time.monotonic()
    stop_file = spec.get("stop_file")
    while successes < ops and time.monotonic() - started < spec.get("max_seconds", 60):
        if stop_file and os.path.exists(stop_file):
            break
        try:
            if comm.are_peers_pending():
                comm.update_topology()
            world = local_world(comm)
            if world < 2:
                if time.monotonic() - last_success > spec.get("alone_grace", 5):
                    emit(event="alone")
                    break
                time.sleep(0.05)
                continue
            # A failed op leaves an in-place buffer as it was: the retry reuses it, so a result
            # tells whether pccl restored it (a fresh buffer comes only after a success).
            if x is None:
                x = np.full(count, index + 1, dtype=np.float32)
            y = x if spec.get("inplace", True) else np.empty_like(x)
            if spec.get("die_mid_op_after") is not None and successes >= spec["die_mid_op_after"]:
                die_mid_op(comm, x)
            t0 = time.time()
            info = comm.all_reduce(x, y)  # one tag: ops of a step must use the same tag on every peer
            x = None
            successes += 1
            last_success = time.monotonic()
            emit(event="op", ok=True, world=info.local_world_size, value=float(y[0]),
                 uniform=bool(np.all(y == y[0])), seconds=time.time() - t0, n=successes)
            if spec.get("pause"):
                time.sleep(spec["pause"])
        except PCCLError as e:
            emit(event="fail", code=e.result.value, result=e.result.name, message=str(e),
                 world=_safe_world(comm))
            if e.result in (Result.MASTER_CONNECTION_FAILED, Result.NOT_INITIALIZED):
                if not spec.get("rejoin", False):
                    break
                comm.close()
                comm = connect(spec)
                emit(event="rejoined", world=local_world(comm))
            elif e.result == Result.TOO_FEW_PEERS:
                time.sleep(0.05)
        if spec.get("leave_after") and successes >= spec["leave_after"]:
            emit(event="leaving")
            break
    comm.close()
    emit(event="done", successes=successes)


DIE_MID_OP_ATTEMPTS = 50


def die_mid_op(comm: pccl.Communicator, x: np.ndarray) -> None:
    """SIGKILL this process while the ring's data flows through it: part of the result is here and
    part is not, so its ring part is unfinished, its OP_END cannot have gone out, and the op must fail
    for everyone. On a busy machine this thread may only look again once the whole result arrived:
    then that op succeeds like any other and the next one is tried."""
    for _ in range(DIE_MID_OP_ATTEMPTS):
        recv = np.full_like(x, np.nan)
        handle = comm.all_reduce_async(x, recv)
        while True:
            arrived = ~np.isnan(recv[::4096])
            if arrived.all():
                break  # too late for this op
            if arrived.any():
                emit(event="dying")
                os.kill(os.getpid(), 9)
            time.sleep(0.0002)
        handle.wait()
    raise RuntimeError(f"never caught one of {DIE_MID_OP_ATTEMPTS} ops in flight")


def _safe_world(comm: pccl.Communicator) -> int:
    try:
        return local_world(comm)
    except PCCLError:
        return 0


def scenario_mismatch(spec: dict[str, Any]) -> None:
    """Each peer passes its own (count, dtype, op); reports the outcome, then a matching op."""
    comm = connect(spec)
    join(comm, spec["world"])
    time.sleep(spec.get("delay", 0))
    x = np.ones(spec["count"], dtype=spec["dtype"])
    y = np.zeros_like(x)
    try:
        comm.all_reduce(x, y, op=getattr(ReduceOp, spec["op"]), tag=7)
        emit(event="mismatch", ok=True, value=float(y[0]) if len(y) else None)
    except PCCLError as e:
        emit(event="mismatch", ok=False, result=e.result.name, message=str(e), y_untouched=bool(np.all(y == 0)))
        if spec.get("retry_same_tag"):  # at once, with the arguments a late peer will bring
            x = np.ones(100, dtype=np.float32)
            comm.all_reduce(x, x, tag=7)
            emit(event="retried", value=float(x[0]))
    x = np.ones(100, dtype=np.float32)
    info = comm.all_reduce(x, x, tag=8)
    emit(event="after", value=float(x[0]), world=info.local_world_size)
    comm.close()


def scenario_groups(spec: dict[str, Any]) -> None:
    comm = connect(spec)
    join(comm, spec["global_world"], attribute=Attribute.GLOBAL_WORLD_SIZE)
    x = np.full(1000, spec["index"] + 1, dtype=np.int64)
    comm.all_reduce(x, x)
    emit(event="groups", value=int(x[0]), uniform=bool(np.all(x == x[0])),
         **{a.name: comm.get_attribute(a) for a in Attribute})
    # Stay until every group is done: leaving early would shrink the other group's vote.
    time.sleep(spec.get("linger", 1.0))
    comm.close()


def scenario_idle(spec: dict[str, Any]) -> None:
    """Joins and then sits in time.sleep, never calling a collective (a partner that stalls)."""
    comm = connect(spec)
    join(comm, spec["world"])
    emit(event="joined")
    time.sleep(spec.get("seconds", 60))
    comm.close()


def scenario_interrupt(spec: dict[str, Any]) -> None:
    """Blocks in all_reduce (the partner never joins the op) until SIGINT; counts on another thread."""
    comm = connect(spec)
    join(comm, spec["world"])
    ticks = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.01)

    threading.Thread(target=count, daemon=True).start()
    x = np.arange(1000, dtype=np.float32)
    before = x.copy()
    emit(event="blocking")
    t0 = time.time()
    try:
        comm.all_reduce(x, x)
        emit(event="returned")
    except KeyboardInterrupt:
        emit(event="interrupted", t_interrupt=time.time(), ticks=ticks[0], blocked_for=time.time() - t0,
             buffer_intact=bool(np.array_equal(x, before)))
    stop.set()
    comm.close()


def scenario_multi(spec: dict[str, Any]) -> None:
    """all_reduce_multiple_with_retry over many tensors; the victim kills itself mid-flight."""
    from pccl import (DataType, QuantizationAlgorithm, QuantizationOptions, ReduceDescriptor, ReduceOpDescriptor,
                      ReduceOperandDescriptor)
    comm = connect(spec)
    join(comm, spec["world"])
    index = spec["index"]
    tensors = [np.full(spec.get("count", 1 << 20), index + 1, dtype=np.float32) for _ in range(spec.get("pieces", 8))]
    descriptors = [
        ReduceOpDescriptor.from_numpy(t, t, ReduceDescriptor(t.size, ReduceOp.SUM, i,
                                                             ReduceOperandDescriptor(DataType.FLOAT),
                                                             QuantizationOptions(algorithm=QuantizationAlgorithm.NONE)))
        for i, t in enumerate(tensors)
    ]
    if spec.get("die"):
        def watch() -> None:
            while all(t[0] == index + 1 for t in tensors):
                time.sleep(0.0002)
            emit(event="dying")
            os.kill(os.getpid(), 9)
        threading.Thread(target=watch, daemon=True).start()
    info = comm.all_reduce_multiple_with_retry(descriptors, max_in_flight=spec.get("max_in_flight", 4))
    emit(event="multi", values=[float(t[0]) for t in tensors], uniform=[bool(np.all(t == t[0])) for t in tensors],
         digests=[digest(t) for t in tensors], world=info.local_world_size)
    comm.close()


def scenario_concurrency(spec: dict[str, Any]) -> None:
    """Many all-reduces in flight: async from one thread, from several threads, duplicate tags,
    membership calls while ops run, and a small op overtaking a big one on the same connection."""
    comm = connect(spec)
    world, index = spec["world"], spec["index"]
    join(comm, world)
    want = world * (world + 1) // 2

    # 8 tags in flight from one thread, each with its own size and values.
    xs = [np.full(1000 * (t + 1) + t, (index + 1) * (t + 1), dtype=np.int64) for t in range(8)]
    handles = [comm.all_reduce_async(x, x, tag=t) for t, x in enumerate(xs)]
    results = [h.wait() for h in handles]
    emit(event="async8", ok=all(r[0] for r in results),
         exact=all(bool(np.all(x == want * (t + 1))) for t, x in enumerate(xs)))

    # A duplicate live tag is refused at once; the first op is unaffected.
    big = np.ones(1 << 20, dtype=np.float32)
    first = comm.all_reduce_async(big, big, tag=99)
    try:
        comm.all_reduce_async(np.ones(4, np.float32), np.ones(4, np.float32), tag=99)
        emit(event="duplicate", refused=False)
    except PCCLError as e:
        emit(event="duplicate", refused=True, result=e.result.name, message=str(e))
    # update_topology with an op in flight: PENDING_ASYNC_OPS.
    try:
        comm.update_topology()
        emit(event="update_in_flight", refused=False)
    except PCCLError as e:
        emit(event="update_in_flight", refused=True, result=e.result.name)
    ok = first.wait()[0]
    emit(event="first_after_duplicate", ok=ok, value=float(big[0]))

    # Several Python threads, each with its own tags.
    errors: list[str] = []

    def worker(base: int) -> None:
        try:
            for k in range(10):
                x = np.full(5000, index + 1, dtype=np.float64)
                comm.all_reduce(x, x, tag=1000 + base * 100 + k)
                if not np.all(x == want):
                    errors.append(f"thread {base} op {k}: {x[0]}")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    # are_peers_pending from this thread while the others run all-reduces.
    pending_answers = [comm.are_peers_pending() for _ in range(3)]
    for t in threads:
        t.join(60)
    emit(event="threads", errors=errors, pending=pending_answers)

    # Fair sharing: a small op launched right after a big one finishes first.
    huge = np.full(spec.get("huge", 32 << 20), 1.0, dtype=np.float32)
    out = np.empty_like(huge)
    small = np.full(1024, 1.0, dtype=np.float32)
    t0 = time.monotonic()
    h_big = comm.all_reduce_async(huge, out, tag=500)
    t_big_call = time.monotonic() - t0
    h_small = comm.all_reduce_async(small, small, tag=501)
    t_small_call = time.monotonic() - t0
    h_small.wait()
    small_s = time.monotonic() - t0
    big_done_when_small_done = h_big.done()
    h_big.wait()
    emit(event="fair", big_done_first=big_done_when_small_done, calls=(t_big_call, t_small_call), small_s=small_s, big_s=time.monotonic() - t0)
    comm.close()


def scenario_tags(spec: dict[str, Any]) -> None:
    """Many distinct tags, a few in flight at a time: memory must stay flat."""
    import resource
    comm = connect(spec)
    join(comm, spec["world"])
    x = [np.ones(16, dtype=np.float32) for _ in range(16)]

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    total, batch, tag = spec["tags"], 16, 0
    samples = []
    while tag < total:
        handles = [comm.all_reduce_async(x[i], x[i], tag=tag + i) for i in range(batch)]
        for h in handles:
            if not h.wait()[0]:
                raise RuntimeError("an op failed")
        tag += batch
        if tag % (total // 10) < batch:
            samples.append(rss_kib())
    emit(event="tags", samples=samples, maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    comm.close()


def make_tensor(dtype: str, count: int, seed: int, backend: str):
    """Deterministic content per seed, for every dtype (bfloat16 via torch)."""
    rng = np.random.default_rng(seed)
    if dtype in INT_DTYPES:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=count, dtype=dtype, endpoint=True)
    else:
        values = rng.standard_normal(count).astype("float32" if dtype == "bfloat16" else dtype)
    return as_buffer(values, dtype, backend)


class _CountStaging:
    """Wraps the core communicator to count how often a sync asked for host memory."""

    def __init__(self, core: Any, calls: list[int]) -> None:
        self._core, self._calls = core, calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def sync_shared_state(self, revision, entries, strategy, stage=None):
        def counted():
            self._calls[0] += 1
            return stage()
        return self._core.sync_shared_state(revision, entries, strategy, counted if stage else None)


def scenario_sync(spec: dict[str, Any]) -> None:
    """Runs a script of steps: ["join", n], ["sync", {options}], ["hold", seconds], ["mark", event]
    (reports that event), ["wait_for", path] (until that file exists, at most a minute).

    Tensors: spec["tensors"] = [[name, dtype, count, seed, allow_content_inequality], ...]; a sync
    step may re-seed some of them first ({"reseed": {name: seed}}), push or set the revision, and
    pick a strategy. After each sync the digests of every tensor are reported.
    """
    from pccl import SharedState, SharedStateSyncStrategy, TensorInfo
    backend = spec.get("backend", "numpy")
    tensors = {name: make_tensor(dtype, count, seed, backend) for name, dtype, count, seed, _ in spec["tensors"]}
    comm = connect(spec)
    emit(event="connected")
    unequal = {name: bool(flag) for name, _, _, _, flag in spec["tensors"]}

    def info_of(name):
        t = tensors[name]
        make = TensorInfo.from_torch if hasattr(t, "numpy") else TensorInfo.from_numpy
        return make(t, name, allow_content_inequality=unequal[name])

    state = SharedState([info_of(name) for name in tensors])
    state.revision = spec.get("revision", 0)
    # "hash_in_place": torch tensors are hashed by pccl's torch kernel and staged on demand, the way
    # CUDA tensors are; "staged" counts the calls that needed host memory.
    stage_calls = [0]
    if spec.get("hash_in_place"):
        comm._core = _CountStaging(comm._core, stage_calls)

        def sync(state, strategy):
            return comm._sync_shared_state(state, strategy, [True] * len(state.tensor_infos))
    else:
        sync = comm.sync_shared_state
    for step, arg in spec["script"]:
        if step == "join":
            join(comm, arg)
        elif step == "hold":
            time.sleep(arg)
        elif step == "mark":
            emit(event=arg)
        elif step == "wait_for":
            deadline = time.monotonic() + 60
            while not os.path.exists(arg):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{arg} did not appear")
                time.sleep(0.02)
        elif step == "sync":
            for name, seed in arg.get("reseed", {}).items():
                fresh = make_tensor(dict((n, d) for n, d, *_ in spec["tensors"])[name], len(tensors[name]), seed, backend)
                tensors[name][...] = fresh
            if arg.get("push"):
                state.push_revision()
            if "set_revision" in arg:
                state.revision = arg["set_revision"]
            strategy = getattr(SharedStateSyncStrategy, arg.get("strategy", "ENFORCE_POPULAR"))
            t0 = time.time()
            try:
                info = sync(state, strategy)
                emit(event="synced", ok=True, revision=state.revision, tx=info.tx_bytes, rx=info.rx_bytes,
                     seconds=time.time() - t0, digests={n: digest(t) for n, t in tensors.items()},
                     staged=stage_calls[0])
            except PCCLError as e:
                emit(event="synced", ok=False, result=e.result.name, message=str(e), revision=state.revision,
                     digests={n: digest(t) for n, t in tensors.items()}, staged=stage_calls[0])
        elif step == "report_receiving":
            # Tell the test the moment bytes start landing in tensor `arg` (so it can kill a sender then).
            watched = tensors[arg]
            before = np.array(watched[:: 1 << 16], copy=True)

            def watch() -> None:
                while np.array_equal(np.asarray(watched[:: 1 << 16]), before):
                    time.sleep(0.0005)
                emit(event="receiving")
            threading.Thread(target=watch, daemon=True).start()
    comm.close()
    emit(event="done")


def quant_input(kind: str, count: int, index: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + index)
    if kind == "constant":
        return np.full(count, 0.25 * (index + 1), dtype=np.float64)
    if kind == "negative":
        return -np.abs(rng.standard_normal(count)) - 3.0
    values = rng.standard_normal(count)
    if kind == "nan" and index == 0:
        values[5] = np.nan        # block 0 of the first piece
        values[700] = np.inf      # block 2
    return values


def scenario_quant(spec: dict[str, Any]) -> None:
    """Quantized all-reduces; reports digests (bit parity), the relative L2 error and bytes sent."""
    from pccl import DataType, QuantizationAlgorithm, QuantizationOptions
    comm = connect(spec)
    world, index = spec["world"], spec["index"]
    join(comm, world)
    for case in spec["cases"]:
        source, count, op = case["source"], case["count"], case.get("op", "SUM")
        mine = quant_input(case["kind"], count, index)
        x = as_buffer(mine.astype("float32" if source == "bfloat16" else source), source, spec.get("backend", "numpy"))
        y = x if case.get("inplace") else as_buffer(np.zeros(count, "float32" if source == "bfloat16" else source),
                                                     source, spec.get("backend", "numpy"))
        options = QuantizationOptions(getattr(DataType, case["wire"]), getattr(QuantizationAlgorithm, case["algorithm"]))
        try:
            info = comm.all_reduce(x, y, op=getattr(ReduceOp, op), quantization_options=options)
        except (PCCLError, ValueError) as e:
            emit(case=case, ok=False, error=str(e))
            continue
        inputs = [quant_input(case["kind"], count, j) for j in range(world)]
        if source in ("float16", "bfloat16"):
            inputs = [to_float64(as_buffer(v.astype("float32"), source, "torch" if source == "bfloat16" else "numpy"))
                      for v in inputs]
        exact = {"SUM": np.sum, "AVG": np.mean, "MAX": np.max, "MIN": np.min, "PROD": np.prod}[op](inputs, axis=0)
        got = to_float64(y)
        finite = np.isfinite(exact) & np.isfinite(got)
        err = float(np.linalg.norm(got[finite] - exact[finite]) / max(np.linalg.norm(exact[finite]), 1e-30))
        emit(case=case, ok=True, digest=digest(y), rel_l2=err, tx=info.tx_bytes, rx=info.rx_bytes,
             exact_match=bool(np.array_equal(got[finite], exact[finite])),
             nan_positions=[int(i) for i in np.flatnonzero(np.isnan(got))[:2000:256]],
             nan_count=int(np.isnan(got).sum()))
    comm.close()


def scenario_cuda(spec: dict[str, Any]) -> None:
    """CUDA tensors, in place and out of place, checked against the expected sum."""
    import torch
    comm = connect(spec)
    join(comm, spec["world"])
    index, world = spec["index"], spec["world"]
    ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = torch.full((100_003,), index + 1, dtype=dtype, device="cuda")
        comm.all_reduce(x, x)
        y = torch.empty_like(x)
        z = torch.full((100_003,), index + 1, dtype=dtype, device="cuda")
        comm.all_reduce(z, y)
        want = world * (world + 1) // 2
        ok &= bool((x == want).all().item()) and bool((y == want).all().item())
    emit(event="cuda", ok=ok)
    comm.close()


def scenario_optimize(spec: dict[str, Any]) -> None:
    """Joins, times an all-reduce, calls optimize_topology(), times it again on the new ring."""
    comm = connect(spec)
    emit(event="connected")
    join(comm, spec["world"])
    x = np.full(spec.get("count", 1 << 16), spec["index"] + 1, dtype=np.float32)

    def timed(label: str) -> None:
        best = float("inf")
        for _ in range(spec.get("rounds", 1)):
            y = x.copy()
            start = time.perf_counter()
            comm.all_reduce(y, y)
            best = min(best, time.perf_counter() - start)
        emit(event=label, seconds=best, value=float(y[0]), uniform=bool(np.all(y == y[0])), digest=digest(y))

    timed("before")
    for _ in range(spec.get("optimize_calls", 1)):
        comm.optimize_topology()
    emit(event="optimized", world=local_world(comm))
    timed("after")
    time.sleep(spec.get("linger", 0.5))
    comm.close()


# ------------------------------------------------------------------ early start (OP_TICKET)

def scenario_steps(spec: dict[str, Any]) -> None:
    """A list of all-reduces, each {tag, count, delay (s before the call), inplace}: every peer
    contributes index+1, so the exact sum tells who took part. A failure reports whether an
    in-place buffer came back as it was. Lingers `linger` seconds at the end."""
    comm = connect(spec)
    join(comm, spec["world"])
    emit(event="joined")
    index = spec["index"]
    for n, step in enumerate(spec["steps"]):
        time.sleep(step.get("delay", 0))
        x = np.full(step["count"], index + 1, dtype=np.float32)
        y = x if step.get("inplace", True) else np.zeros_like(x)
        try:
            t0 = time.perf_counter()
            info = comm.all_reduce(x, y, tag=step.get("tag", 0))
            seconds = time.perf_counter() - t0
            emit(event="step", n=n, ok=True, world=info.local_world_size, value=float(y[0]),
                 uniform=bool(np.all(y == y[0])), digest=digest(y), seconds=seconds)
        except PCCLError as e:
            emit(event="step", n=n, ok=False, result=e.result.name, message=str(e),
                 intact=bool(np.all(x == index + 1)))
    time.sleep(spec.get("linger", 0))
    comm.close()
    emit(event="done")


def scenario_early_cancel(spec: dict[str, Any]) -> None:
    """Tag 0 once (both peers then hold a ticket), then again: peer 0 starts at once and is
    interrupted (the test sends SIGINT) before peer 1 calls, `delay` seconds later. Then tag 0 a
    third time. Reports each outcome and whether the in-place buffer came back as it was."""
    comm = connect(spec)
    join(comm, 2)
    index, count = spec["index"], spec["count"]
    x = np.full(count, index + 1, dtype=np.float32)
    comm.all_reduce(x, x)
    emit(event="first", value=float(x[0]))
    x = np.full(count, index + 1, dtype=np.float32)
    if index == 0:
        emit(event="blocking")
        try:
            comm.all_reduce(x, x)
            emit(event="second", ok=True)
        except KeyboardInterrupt:
            emit(event="second", ok=False, interrupted=True, intact=bool(np.all(x == index + 1)))
        # The interrupted op holds its tag until the master settles it (peer 1 has not called yet).
        time.sleep(spec["delay"])
    else:
        time.sleep(spec["delay"])
        try:
            comm.all_reduce(x, x)
            emit(event="second", ok=True)
        except PCCLError as e:
            emit(event="second", ok=False, message=str(e), intact=bool(np.all(x == index + 1)))
    x = np.full(count, index + 1, dtype=np.float32)
    comm.all_reduce(x, x)
    emit(event="third", value=float(x[0]), uniform=bool(np.all(x == x[0])))
    comm.close()


def scenario_crossed(spec: dict[str, Any]) -> None:
    """Two async tags in opposite orders on the two peers, several rounds: peer 0 launches tag 1
    then tag 2 and waits for both; peer 1 runs tag 2 to the end, pauses, then tag 1. From the
    second round on, both start early from their tickets, so peer 0's early frames of tag 1 reach
    peer 1 while it still works on tag 2 over the same connections."""
    comm = connect(spec)
    join(comm, 2)
    index, count = spec["index"], spec["count"]
    for rnd in range(spec.get("rounds", 3)):
        a = np.full(count, index + 1, dtype=np.float32)
        b = np.full(count, 10 * (index + 1), dtype=np.float32)
        if index == 0:
            ha = comm.all_reduce_async(a, a, tag=1)
            hb = comm.all_reduce_async(b, b, tag=2)
            ok = [ha.wait()[0], hb.wait()[0]]
        else:
            hb = comm.all_reduce_async(b, b, tag=2)
            ok_b = hb.wait()[0]
            time.sleep(spec.get("pause", 0.5))
            ha = comm.all_reduce_async(a, a, tag=1)
            ok = [ha.wait()[0], ok_b]
        emit(event="round", n=rnd, ok=ok, a=float(a[0]), b=float(b[0]),
             exact=bool(np.all(a == 3) and np.all(b == 30)))
    comm.close()


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main() -> None:
    # Ctrl-C must reach this process as KeyboardInterrupt whatever signal state its parent handed
    # down (a blocked or ignored SIGINT is inherited across exec).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = json.loads(sys.argv[1])
    try:
        SCENARIOS[spec["scenario"]](spec)
    except Exception as e:  # report, then fail the process so the test sees it
        emit(event="error", error=repr(e))
        raise


if __name__ == "__main__":
    main()
