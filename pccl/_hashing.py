"""The shared-state hash: XXH3-128 over fixed-size chunks, so a GPU can compute it in parallel.

Definition (what every peer computes for an entry's bytes, wherever they live):

- up to ``HASH_CHUNK_BYTES``: XXH3-128 (seed 0, default secret) of the bytes, canonical form;
- beyond: the bytes are cut into chunks of ``HASH_CHUNK_BYTES`` (the last one may be shorter), and
  the hash is XXH3-128 of the concatenated canonical digests of the chunks.

Host memory is hashed with the ``xxhash`` package (maintained, ~28 GB/s per core). XXH3 over one
long buffer is sequential (each 1 KiB block scrambles the state of the one before), which a GPU
cannot spread over its cores; over chunks it can. ``digest_tensors`` computes the same digests for
torch tensors with plain torch integer ops, so a CUDA tensor is hashed where it lives, without a
host copy and without a compiler at run time. It runs on CPU tensors too, which is how the tests pin
it to the ``xxhash`` package bit for bit on machines without a GPU.

XXH3's long-input path, for a chunk of full size (a multiple of 1 KiB): 8 lanes of 64-bit
accumulators; each 64-byte stripe adds, per lane i, the input word i to lane i^1 and the product of
the low and high halves of (input word i XOR a secret word) to lane i; after every 16-stripe block
but the last the accumulators are scrambled; the last stripe of the input is keyed from an
unaligned spot of the secret; two merges of the accumulators give the two 64-bit halves. The
additions within a block commute, so the sums of every block of every chunk are computed at once,
and only the scrambles between blocks run in sequence (``HASH_CHUNK_BYTES / 1024`` small steps
over all chunks of all tensors together).
"""

from __future__ import annotations

from typing import Any, Sequence

import xxhash

HASH_CHUNK_BYTES = 256 * 1024   # a multiple of the 1 KiB XXH3 block; sets the GPU's sequential steps
DIGEST_BYTES = 16
# Bytes of chunks whose block sums one step of digest_tensors computes at once: bounds the
# temporaries (two int64 arrays of this size) on the device.
_SLAB_BYTES = 64 * 1024 * 1024

_MASK64 = (1 << 64) - 1
_STRIPE_BYTES = 64
_BLOCK_BYTES = 1024
_STRIPES_PER_BLOCK = 16
_LANES = 8

# XXH3's published constants (xxhash_spec.md): the primes and the default 192-byte secret.
_PRIME32_1 = 0x9E3779B1
_PRIME32_2 = 0x85EBCA77
_PRIME32_3 = 0xC2B2AE3D
_PRIME64_1 = 0x9E3779B185EBCA87
_PRIME64_2 = 0xC2B2AE3D27D4EB4F
_PRIME64_3 = 0x165667B19E3779F9
_PRIME64_4 = 0x85EBCA77C2B2AE63
_PRIME64_5 = 0x27D4EB2F165667C5
_AVALANCHE_MULTIPLIER = 0x165667919E3779F9
_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
assert len(_SECRET) == 192


def digest_host(data: Any) -> bytes:
    """The hash of a bytes-like object in host memory (``memoryview``, numpy array, bytes)."""
    view = memoryview(data).cast("B")
    if view.nbytes <= HASH_CHUNK_BYTES:
        return xxhash.xxh3_128_digest(view)
    chunk_digests = b"".join(xxhash.xxh3_128_digest(view[start:start + HASH_CHUNK_BYTES])
                             for start in range(0, view.nbytes, HASH_CHUNK_BYTES))
    return xxhash.xxh3_128_digest(chunk_digests)


def digest_tensors(tensors: Sequence[Any]) -> list[bytes]:
    """The hash of each contiguous torch tensor's bytes, computed on the tensor's own device.

    Full chunks are hashed on the device; what is left over (the short last chunk, or a whole
    tensor of one chunk or less: at most ``HASH_CHUNK_BYTES`` per tensor) is copied to the host in
    one transfer and hashed there, as are the chunk digests' final combination.
    """
    import torch
    byte_views = []
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("digest_tensors needs contiguous tensors")
        b = t.detach().reshape(-1).view(torch.uint8)
        byte_views.append(b)
    full_counts = [b.numel() // HASH_CHUNK_BYTES if b.numel() > HASH_CHUNK_BYTES else 0 for b in byte_views]
    chunk_digests = _full_chunk_digests(
        [b[:n * HASH_CHUNK_BYTES] for b, n in zip(byte_views, full_counts) if n], torch)
    tails = [b[n * HASH_CHUNK_BYTES:] for b, n in zip(byte_views, full_counts)]
    host_tails = _to_host(tails, torch)

    out: list[bytes] = []
    taken = 0
    for b, n, tail in zip(byte_views, full_counts, host_tails):
        if n == 0:
            out.append(xxhash.xxh3_128_digest(tail))
            continue
        mine = chunk_digests[taken * DIGEST_BYTES:(taken + n) * DIGEST_BYTES]
        taken += n
        if len(tail):
            mine += xxhash.xxh3_128_digest(tail)
        out.append(xxhash.xxh3_128_digest(mine))
    return out


def _to_host(parts: list[Any], torch: Any) -> list[memoryview]:
    """Copies device byte tensors to host memory in one transfer; CPU tensors are viewed as they are."""
    if not parts or all(p.device.type == "cpu" for p in parts):
        return [memoryview(p.numpy()) for p in parts]
    joined = torch.cat(parts).cpu().numpy()
    views, at = [], 0
    for p in parts:
        views.append(memoryview(joined[at:at + p.numel()]))
        at += p.numel()
    return views


def _s64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _secret_words(offset: int, count: int) -> list[int]:
    """``count`` little-endian 64-bit words of the secret from byte ``offset`` (any alignment)."""
    return [_s64(int.from_bytes(_SECRET[offset + 8 * i:offset + 8 * i + 8], "little")) for i in range(count)]


def _shr(x: Any, bits: int) -> Any:
    """Logical right shift of int64 tensors holding unsigned 64-bit values (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mul128_fold64(a: Any, b: Any) -> Any:
    """The low and high halves of the 128-bit product a*b, XORed, from 32-bit partial products."""
    low32 = 0xFFFFFFFF
    a_lo, a_hi, b_lo, b_hi = a & low32, _shr(a, 32), b & low32, _shr(b, 32)
    lo_lo, hi_lo, lo_hi, hi_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
    cross = _shr(lo_lo, 32) + (hi_lo & low32) + lo_hi   # cannot overflow 64 bits
    upper = _shr(hi_lo, 32) + _shr(cross, 32) + hi_hi
    lower = (cross << 32) | (lo_lo & low32)
    return lower ^ upper


def _avalanche(h: Any) -> Any:
    h = h ^ _shr(h, 37)
    h = h * _s64(_AVALANCHE_MULTIPLIER)
    return h ^ _shr(h, 32)


def _full_chunk_digests(parts: list[Any], torch: Any) -> bytes:
    """Canonical XXH3-128 digests of every full chunk of every part (uint8 tensors of whole chunks)."""
    if not parts:
        return b""
    device = parts[0].device
    blocks = HASH_CHUNK_BYTES // _BLOCK_BYTES
    as_tensor = lambda words: torch.tensor(words, dtype=torch.int64, device=device)  # noqa: E731
    # Stripe s of a block is keyed with the secret from byte 8*s; the input's last stripe (the
    # 16th of the last block) from byte 192 - 64 - 7.
    keys = as_tensor([_secret_words(8 * s, _LANES) for s in range(_STRIPES_PER_BLOCK)])
    last_stripe_key = as_tensor(_secret_words(len(_SECRET) - _STRIPE_BYTES - 7, _LANES))
    swap_lanes = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6], device=device)

    block_sums = []   # per part: [chunks, blocks, lanes], what each block adds to the accumulators
    for part in parts:
        if part.storage_offset() % 8 or part.data_ptr() % 8:
            part = part.clone()   # int64 views need 8-byte alignment
        words = part.view(torch.int64).view(-1, blocks, _STRIPES_PER_BLOCK, _LANES)
        rows = max(1, _SLAB_BYTES // HASH_CHUNK_BYTES)
        for r0 in range(0, words.shape[0], rows):
            data = words[r0:r0 + rows]
            keyed = data ^ keys
            keyed[:, -1, -1] = data[:, -1, -1] ^ last_stripe_key
            high = _shr(keyed, 32)
            keyed &= 0xFFFFFFFF
            keyed *= high
            sums = keyed.sum(dim=2)
            del keyed, high
            sums += data.sum(dim=2)[..., swap_lanes]
            block_sums.append(sums)
    sums = torch.cat(block_sums) if len(block_sums) > 1 else block_sums[0]

    acc = as_tensor([_PRIME32_3, _s64(_PRIME64_1), _s64(_PRIME64_2), _PRIME64_3, _s64(_PRIME64_4),
                     _PRIME32_2, _PRIME64_5, _PRIME32_1]).expand(sums.shape[0], _LANES).clone()
    scramble_key = as_tensor(_secret_words(len(_SECRET) - _STRIPE_BYTES, _LANES))
    for b in range(blocks - 1):
        acc += sums[:, b]
        acc ^= _shr(acc, 47)
        acc ^= scramble_key
        acc *= _PRIME32_1
    acc += sums[:, blocks - 1]

    def merge(secret_offset: int, start: int) -> Any:
        key = as_tensor(_secret_words(secret_offset, _LANES))
        folded = _mul128_fold64(acc[:, 0::2] ^ key[0::2], acc[:, 1::2] ^ key[1::2])
        return _avalanche(folded.sum(dim=1) + _s64(start))

    length = HASH_CHUNK_BYTES
    low = merge(11, length * _PRIME64_1)
    high = merge(len(_SECRET) - _STRIPE_BYTES - 11, ~(length * _PRIME64_2))
    # Canonical form: the high half, then the low half, each big-endian.
    halves = torch.stack([high, low], dim=1).cpu().numpy()
    return halves.astype(">i8").tobytes()
