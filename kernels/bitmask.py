"""Bit masks: the WELS draw straight into bits, as a Triton kernel (:func:`wels_bits_`).

The format (int32 words, bit ``b`` of word ``w`` is element ``32*w + b``, 1 = fit) and every host-side helper
(pack / unpack, popcount, the KELS rule, the WELS argument check) live in :mod:`.format`, which imports no
Triton; they are re-exported here under their old names.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import launch_guard
from .format import (_check_words, check_split_rate, check_wels_args, density, kels_mask_bits,  # noqa: F401
                     layer_stream, num_words, pack_mask, popcount, unpack_mask, word_popcounts)
from .rng import philox_group, select4

WELS_WORDS_PER_PROGRAM = 64


@triton.jit(do_not_specialize=["seed", "stream"])
def _wels_bits_kernel(out_ptr, numel: tl.int64, seed: tl.int64, stream: tl.int64, threshold, BW: tl.constexpr):
    """out[w] = sum_b [ (r_{32w+b} >> 8) < threshold ] << b for words w of this program.

    out_ptr: int32 words; numel: elements; seed/stream: Philox key and stream; threshold: integer in
    [0, 2^24]. numel, seed and stream are typed int64 whatever their value (a numel below 2^31 would
    arrive as int32, and ``numel + 31`` would wrap for numel in [2^31 - 31, 2^31 - 1], storing nothing);
    seed and stream change with every layer and are not specialised. Each element recomputes its group's
    Philox (4x redundant): masks are drawn once per run, so simplicity wins over speed here."""
    numel = numel.to(tl.int64)  # the interpreter passes small ints as int32 whatever the annotation
    pid = tl.program_id(0).to(tl.int64)
    w = pid * BW + tl.arange(0, BW)[:, None]
    b = tl.arange(0, 32)[None, :]
    e = w * 32 + b
    r0, r1, r2, r3 = philox_group(seed, e >> 2, stream)
    r = select4(e & 3, r0, r1, r2, r3)
    fit = ((r >> 8).to(tl.int64) < threshold) & (e < numel)
    word = tl.sum(fit.to(tl.int64) << b.to(tl.int64), axis=1)
    nwords = (numel + 31) // 32
    wr = pid * BW + tl.arange(0, BW)
    tl.store(out_ptr + wr, word.to(tl.int32), mask=wr < nwords)


def wels_bits_(out: torch.Tensor, numel: int, seed: int, stream: int, threshold: int) -> None:
    """Triton: write the WELS mask words of a ``numel``-element weight into ``out`` (int32, ``ceil(numel/32)``).

    ``seed`` and ``stream`` are int64 reinterpretations of the unsigned 64-bit values (:func:`.rng.as_int64`);
    ``threshold`` is :func:`.reference.wels_threshold` of the split rate."""
    if out.numel():
        bw = WELS_WORDS_PER_PROGRAM
        with launch_guard(out):
            _wels_bits_kernel[(triton.cdiv(out.numel(), bw),)](out, numel, seed, stream, threshold, BW=bw)
