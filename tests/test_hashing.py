"""The shared-state hash: its chunked definition, and the torch kernel that computes it on any device."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from pccl._hashing import HASH_CHUNK_BYTES, digest_host, digest_tensors

C = HASH_CHUNK_BYTES
SIZES = [0, 1, 15, 16, 17, 128, 129, 240, 241, 1023, 1024, 1025, C - 1, C, C + 1, C + 64, 2 * C, 3 * C + 17,
         5 * C - 63]


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_definition_is_xxh3_128_up_to_a_chunk_and_a_hash_of_chunk_digests_beyond():
    for n in (0, 1, 1000, C):
        data = random_bytes(n, n)
        assert digest_host(data) == xxhash.xxh3_128_digest(data.tobytes())
    data = random_bytes(2 * C + 5, 1)
    chunks = [data[:C], data[C:2 * C], data[2 * C:]]
    expected = xxhash.xxh3_128_digest(b"".join(xxhash.xxh3_128_digest(c.tobytes()) for c in chunks))
    assert digest_host(data) == expected


def test_one_flipped_bit_anywhere_changes_the_hash():
    data = random_bytes(3 * C + 100, 2)
    base = digest_host(data)
    for position in (0, C - 1, C, 2 * C + 517, len(data) - 1):
        flipped = data.copy()
        flipped[position] ^= 0x10
        assert digest_host(flipped) != base, position


torch = pytest.importorskip("torch", reason="torch is an optional extra; CI installs it")


def test_torch_kernel_matches_the_host_hash_bit_for_bit():
    tensors = [torch.from_numpy(random_bytes(n, 10 + i)) for i, n in enumerate(SIZES)]
    assert digest_tensors(tensors) == [digest_host(t.numpy()) for t in tensors]


def test_torch_kernel_on_every_dtype_and_an_unaligned_view():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(C // 2 + 7)
    cases = [torch.from_numpy(values.astype(np.float32)), torch.from_numpy(values).to(torch.bfloat16),
             torch.from_numpy(values.astype(np.float16)), torch.from_numpy((values * 1e6).astype(np.int64)),
             torch.from_numpy(random_bytes(3 * C + 11, 4))[3:]]   # starts 3 bytes into its storage
    got = digest_tensors(cases)
    for tensor, digest in zip(cases, got):
        host = tensor.view(torch.uint8).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert digest == digest_host(host)


def test_torch_kernel_rejects_non_contiguous_tensors():
    with pytest.raises(ValueError, match="contiguous"):
        digest_tensors([torch.zeros(8, 8)[:, 0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU hash runs where a GPU is present")
def test_cuda_tensors_hash_on_the_gpu_to_the_host_value():
    tensors = [torch.from_numpy(random_bytes(n, 30 + i)) for i, n in enumerate(SIZES)]
    on_gpu = digest_tensors([t.cuda() for t in tensors])
    assert on_gpu == [digest_host(t.numpy()) for t in tensors]
    big = torch.randn(64 << 20, device="cuda")   # 256 MiB, many slabs
    assert digest_tensors([big]) == [digest_host(big.cpu().numpy())]
    # The same shape again replays the captured graph: new content must still give its own hash.
    big.add_(1.0)
    assert digest_tensors([big]) == [digest_host(big.cpu().numpy())]
    assert digest_tensors([t.cuda() for t in tensors]) == [digest_host(t.numpy()) for t in tensors]
