"""Counter-based randomness, host side: the stream of each (purpose, generation, layer) and seed checks.

A value depends only on (seed, stream, element index) — never on device, launch shape, rank or how many
values were drawn before — so masks and resets agree on CPU and GPU, on every DDP rank and after a resume.
Stream = splitmix64(splitmix64(splitmix64(purpose) ^ generation) ^ layer); the seed is Philox's key.
The device half (Philox draws, uniform / normal transforms, the device splitmix64) is :mod:`.rng`, Triton
code; this module imports no Triton, so the C++ and reference paths use it where Triton is absent.
"""
from __future__ import annotations

PURPOSE_MASK = 1
PURPOSE_RESET = 2
PURPOSE_INIT = 3
_M64 = (1 << 64) - 1


def splitmix64_host(x: int) -> int:
    """SplitMix64 finaliser of an unsigned 64-bit int (the device :func:`.rng.splitmix64` on the host)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_prefix(purpose: int, generation: int) -> int:
    """The (purpose, generation) part of every layer's stream: ``stream = splitmix64(prefix ^ layer)``."""
    return splitmix64_host(splitmix64_host(purpose) ^ (generation & _M64))


def stream_id(purpose: int, generation: int, layer: int) -> int:
    """64-bit stream of one (purpose, generation, layer); the user seed is Philox's key."""
    return splitmix64_host(stream_prefix(purpose, generation) ^ (layer & _M64))


def as_int64(u: int) -> int:
    """Reinterpret an unsigned 64-bit value as signed, the form kernels and int64 tensors take."""
    u &= _M64
    return u - (1 << 64) if u >= 1 << 63 else u


def check_seed(seed: object) -> int:
    """Validate a user seed (an int in [0, 2^64)) and return it."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed <= _M64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed
