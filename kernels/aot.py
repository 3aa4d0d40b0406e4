"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90 — no GPU needed.

The interpreter is lenient: a kernel can pass there and fail to compile. ``python -m ke_fast.kernels.aot``
compiles each kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32), options=options)``
and reads registers / spills / stack frame from the ``ptxas -v`` log of that very compile: the cubin
a GPU would run, built with Triton's own ptxas binary and flags, which differ by release and
architecture (``--regAllocOptLevel=2`` from 3.7 on; ``ptxas`` for sm_80 but ``ptxas-blackwell`` for
sm_90 in 3.9) and change the spills. Prints one JSON object per kernel (``"ptxas": "triton"``; or
``"wheel"`` where a Triton release prints no log and the wheel's ptxas-blackwell is run on the PTX
instead) and exits 1 if any kernel spills or fails to compile. ``--quick`` compiles the variants of
:data:`QUICK` only (what ``make test`` checks); ``make aot`` compiles every variant.
Must run with ``TRITON_INTERPRET`` unset (jit functions are then real JITFunctions).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import augment_triton, bitmask, masked, reinit, sparse_conv

CAPABILITIES = (80, 90)
# ``--quick`` (the test suite's share): per kernel the variant with the most registers at stake — the widest
# tile, bf16 (conversions) or fp32 (IEEE accumulation) where that is the heavier — for both architectures;
# ``make aot`` compiles all.
QUICK = ("reinit[bf16,normal]", "masked[bf16->fp32]", "masked_multi[fp32->bf16]", "sparse_conv[bf16,128x128]",
         "sparse_depthwise[bf16]", "sparse_skinny[fp32,16 rows]", "wels_bits", "augment[fp32,train]")
_FLOATS = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def specs() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, compile options) of every kernel variant the launchers can produce."""
    out = []
    for dt, ptr in _FLOATS.items():
        for normal in (False, True):
            out.append((f"reinit[{dt}{',normal' if normal else ''}]", reinit._reinit_kernel,
                        {"w_base": ptr, "m_base": "*i32", "meta": "*i64", "tile_tensor": "*i32", "seed": "i64",
                         "stream_prefix": "i64", "BQ": "constexpr", "HAS_NORMAL": "constexpr"},
                        {"BQ": reinit.tile_groups(), "HAS_NORMAL": normal},
                        {"num_warps": reinit.GPU_NUM_WARPS}))
    for src, sptr in _FLOATS.items():
        for dst, dptr in _FLOATS.items():
            out.append((f"masked[{src}->{dst}]", masked._masked_kernel,
                        {"out_ptr": dptr, "x_ptr": sptr, "m_ptr": "*i32", "numel": "i64", "BLOCK": "constexpr"},
                        {"BLOCK": masked.GPU_BLOCK}, {"num_warps": masked.GPU_NUM_WARPS}))
            out.append((f"masked_multi[{src}->{dst}]", masked._masked_multi_kernel,
                        {"out_ptr": dptr, "w_base": sptr, "m_base": "*i32", "meta": "*i64", "tile_tensor": "*i32",
                         "BLOCK": "constexpr"},
                        {"BLOCK": masked.GPU_BLOCK}, {"num_warps": masked.GPU_NUM_WARPS}))
    conv_sig = {"out_ptr": None, "x_ptr": None, "bits_ptr": "*i32", "vals_ptr": None, "offs_ptr": "*i64",
                "bias_ptr": None, **{a: "i32" for a in ("M", "N", "K", "T", "NCHUNK", "H", "W", "C", "OH", "OW", "KW",
                                                        "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")},
                "HAS_BIAS": "constexpr", "IEEE": "constexpr", "UPCAST": "constexpr", "BLOCK_M": "constexpr",
                "BLOCK_N": "constexpr"}
    for dt, ptr in _FLOATS.items():
        for cfg in sparse_conv.gpu_configs(fp32=dt == "fp32"):
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            sig = {k: (ptr if v is None else v) for k, v in conv_sig.items()}
            out.append((f"sparse_conv[{dt},{bm}x{bn}]", sparse_conv._sparse_conv_kernel, sig,
                        {"HAS_BIAS": True, "IEEE": dt == "fp32", "UPCAST": False, "BLOCK_M": bm, "BLOCK_N": bn},
                        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
        dw_sig = {k: v for k, v in sig.items() if k not in ("C", "IEEE", "UPCAST")}
        out.append((f"sparse_depthwise[{dt}]", sparse_conv._sparse_depthwise_kernel, dw_sig,
                    {"HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 64}, {"num_warps": 4}))
    skinny_sig = {"out_ptr": None, "part_ptr": "*fp32", "count_ptr": "*i32", "x_ptr": None, "bits_ptr": "*i32",
                  "vals_ptr": None, "offs_ptr": "*i64", "bias_ptr": None,
                  **{a: "i32" for a in ("M", "N", "K", "T", "NCHUNK", "SPLIT_WORDS", "SPLIT_K", "H", "W", "C", "OH",
                                        "OW", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")},
                  **{a: "constexpr" for a in ("HAS_BIAS", "ONE_ROW", "IEEE", "UPCAST", "BLOCK_M", "BLOCK_N")}}
    for dt, ptr in _FLOATS.items():
        for one_row in (True, False):
            sig = {k: (ptr if v is None else v) for k, v in skinny_sig.items()}
            out.append((f"sparse_skinny[{dt},{'1 row' if one_row else f'{sparse_conv.SKINNY_MAX_ROWS} rows'}]",
                        sparse_conv._skinny_kernel, sig,
                        {"HAS_BIAS": True, "ONE_ROW": one_row, "IEEE": dt == "fp32", "UPCAST": False,
                         "BLOCK_M": 1 if one_row else sparse_conv.SKINNY_MAX_ROWS,
                         "BLOCK_N": sparse_conv.SKINNY_BLOCK_N}, {"num_warps": sparse_conv.SKINNY_WARPS}))
    out.append(("wels_bits", bitmask._wels_bits_kernel,
                {"out_ptr": "*i32", "numel": "i64", "seed": "i64", "stream": "i64", "threshold": "i32",
                 "BW": "constexpr"}, {"BW": bitmask.WELS_WORDS_PER_PROGRAM}, {}))
    out += augment_triton.aot_specs()
    return out


def _ptxas() -> str:
    # the wheel's newest ptxas reads the PTX Triton emits for every architecture
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell")


def _parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores + loads and stack frame of every function in a ``ptxas -v`` log."""
    num = lambda pat: sum(int(x) for x in re.findall(pat, log))  # noqa: E731
    return dict(registers=num(r"Used (\d+) registers"), spill_bytes=num(r"(\d+) bytes spill stores")
                + num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"))


def _ptxas_report(ptx: str, cap: int) -> dict:
    """The wheel's ptxas-blackwell run on the PTX with default flags (fallback when Triton prints no log)."""
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        err = subprocess.run([_ptxas(), f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return _parse_ptxas_log(err)


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_all(quick: bool = False) -> list[dict]:
    """Compile every spec (``quick``: those named in :data:`QUICK`) for every capability; one result dict each.

    Triton prints its ptxas log (TRITON_DUMP_PTXAS_LOG) only when ptxas really runs, so every
    kernel is compiled afresh in an empty cache directory."""
    results = []
    with tempfile.TemporaryDirectory() as cache, _environ(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1"):
        for name, kernel, signature, constexprs, options in specs():
            if quick and name not in QUICK:
                continue
            for cap in CAPABILITIES:
                row = {"kernel": name, "sm": cap, "num_warps": options.get("num_warps", 4)}
                try:
                    log = io.StringIO()
                    with contextlib.redirect_stdout(log):
                        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                                  target=GPUTarget("cuda", cap, 32), options=options)
                    if "Used" in log.getvalue():
                        row.update(_parse_ptxas_log(log.getvalue()), ptxas="triton")
                    else:
                        row.update(_ptxas_report(compiled.asm["ptx"], cap), ptxas="wheel")
                    row.update(shared=int(compiled.metadata.shared))
                    row["ok"] = row["spill_bytes"] == 0
                except Exception as exc:  # report every failure, not just the first
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ke_fast.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"compile only the {len(QUICK)} variants of QUICK (the test suite's share)")
    args = parser.parse_args(argv)
    results = compile_all(quick=args.quick)
    for row in results:
        print(json.dumps(row))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
