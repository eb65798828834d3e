"""Ahead-of-time compile check of every Triton kernel, with no GPU needed.

Compiles each kernel at every launch configuration and constexpr variant its launcher can use
(``benchmarks.kernel_specs``), for sm_80 and sm_90, with ``triton.compile`` and
``GPUTarget("cuda", cc, 32)``; reads registers and spills from ``ptxas -v`` and shared memory
from the compiled metadata. Writes ``benchmarks/results/compile_report.json``: a list of
``{kernel, arch, dtype, variant, config, n_regs, n_spills, shared_bytes, ptxas, ...}``.

Where ``nvdisasm`` is found (Triton bundles one), each record also has ``loops``: per loop of
the SASS (a backward branch), the instructions of one iteration, its MUFU (special-function:
exp2, reciprocal) and barrier instructions, and, for the row kernel, those per logit element
(an iteration covers BLOCK_M * BLOCK_V / (32 * num_warps) elements per thread). With a softcap
the row kernel is bound by instruction issue and MUFU throughput, not by memory, so these
static counts are the CPU-side measure of its cost.

ptxas is the one the installed Triton itself uses for that architecture (Triton's
``get_ptxas(arch)``: its bundled ``ptxas`` or, in newer Triton, ``ptxas-blackwell`` for sm_90 and
up; ``TRITON_PTXAS_PATH`` / ``TRITON_PTXAS_BLACKWELL_PATH`` override it), since Triton writes the
PTX ``.version`` of that tool's CUDA release. A ptxas failure reports ptxas's own message.

Exits non-zero on a compile error, or on spills in a default configuration. Run it as a
command (it unsets TRITON_INTERPRET before the kernels are imported).

    python -m benchmarks.aot_compile            # or: python benchmarks/aot_compile.py
    python -m benchmarks.aot_compile --arch 90 --kernel _ce_rows_kernel --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/aot_compile.py`
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compile_report.json"
ARCHS = (80, 90)


class PtxasError(RuntimeError):
    """ptxas rejected the PTX; the message is ptxas's own."""


def ptxas_for(arch: int) -> tuple[str, str | None]:
    """(path, CUDA release) of the ptxas the installed Triton uses to build cubins for sm_<arch>."""
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):  # Triton >= 3.4: knobs, per architecture
        tool = nvidia.get_ptxas(arch)
        return tool.path, tool.version
    path, version = nvidia._path_to_binary("ptxas")  # Triton 3.0 - 3.3
    return path, version


def ptxas_resources(ptx: str, arch: int, ptxas: str | None = None) -> dict:
    """Registers, spills and stack of ``ptx`` from ``ptxas -v`` (Triton's ptxas for ``arch``
    unless ``ptxas`` is given). Raises ``PtxasError`` with ptxas's message when it fails."""
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M).group(1)
    version = re.search(r"^\s*\.version\s+(\S+)", ptx, re.M)
    path, release = (ptxas, None) if ptxas else ptxas_for(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([path, "-v", f"-arch={target}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        message = " | ".join(line.strip() for line in text.splitlines() if line.strip()) or "(no output)"
        raise PtxasError(f"ptxas exited {proc.returncode}: {message} [{path}"
                         + (f", CUDA {release}" if release else "")
                         + f"; PTX .version {version.group(1) if version else '?'}, {target}]")
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    stores, loads = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
    return {"n_regs": int(regs.group(1)) if regs else None, "n_spills": stores + loads,
            "spill_store_bytes": stores, "spill_load_bytes": loads,
            "stack_bytes": int(stack.group(1)) if stack else 0, "ptx_target": target,
            "ptx_version": version.group(1) if version else None, "ptxas": path, "ptxas_cuda": release}


def nvdisasm_path() -> str | None:
    """Triton's bundled nvdisasm, else one on PATH, else None."""
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("nvdisasm")


_LABEL = re.compile(r"^\.(L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\(\.(L_x_\d+)\)")
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")


def sass_loops(sass: str, elements_per_thread: float | None = None) -> list[dict]:
    """The loops of disassembled SASS (``nvdisasm -c`` text): for each backward branch, the
    instructions from its target label to the branch, counted by opcode class."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    loops = []
    for i, line in enumerate(lines):
        branch = _BRANCH.search(line)
        if not branch or branch.group(1) not in labels or labels[branch.group(1)] >= i:
            continue
        ops = [m.group(1) + (m.group(2) or "") for m in map(_OPCODE.search, lines[labels[branch.group(1)]:i + 1]) if m]
        if len(ops) < 2:  # the `BRA self` that ends a kernel
            continue
        loop = {"instructions": len(ops), "mufu": sum(op.startswith("MUFU") for op in ops),
                "barriers": sum(op.startswith("BAR") for op in ops),
                "shuffles": sum(op.startswith("SHFL") for op in ops)}
        if elements_per_thread:
            loop["per_element"] = {k: round(v / elements_per_thread, 2) for k, v in loop.items()}
        loops.append(loop)
    return loops


def disassemble(cubin: bytes, nvdisasm: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    return proc.stdout


def compile_one(index: int, arch: int) -> dict:
    """Compile spec ``index`` for sm_``arch``; a record (with ``error`` on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.kernel_specs import all_specs

    spec = all_specs()[index]
    rec = {"kernel": spec.kernel, "arch": f"sm_{arch}", "dtype": spec.dtype, "variant": spec.variant,
           "config": spec.config, "default": spec.default}
    t0 = time.perf_counter()
    try:
        fn = spec.fn
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_by_16}
        src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
        rec["shared_bytes"] = int(compiled.metadata.shared)
        rec.update(ptxas_resources(compiled.asm["ptx"], arch))
        nvdisasm = nvdisasm_path()
        if nvdisasm:
            per_thread = None
            if "BLOCK_V" in spec.config:
                per_thread = spec.config.get("BLOCK_M", 1) * spec.config["BLOCK_V"] / (32 * spec.num_warps)
            rec["loops"] = sass_loops(disassemble(compiled.asm["cubin"], nvdisasm), per_thread)
    except Exception as exc:  # noqa: BLE001 - reported, and makes the run fail
        rec.update({"n_regs": None, "n_spills": None, "shared_bytes": None,
                    "error": f"{type(exc).__name__}: {exc}"[:2000]})
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    ap.add_argument("--kernel", action="append", help="only these kernel names (repeatable)")
    ap.add_argument("--dtype", action="append", help="only these dtypes: bf16, fp16, fp32 (repeatable)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    # Compiling needs real JIT functions, not the interpreter's: unset it before the kernels'
    # module is imported (here, not at import time, so that importing this module changes nothing).
    os.environ.pop("TRITON_INTERPRET", None)
    from benchmarks.kernel_specs import all_specs

    t0 = time.perf_counter()
    specs = all_specs()
    archs = args.arch or list(ARCHS)
    tasks = [(i, a) for i, s in enumerate(specs) for a in archs
             if (not args.kernel or s.kernel in args.kernel) and (not args.dtype or s.dtype in args.dtype)]
    if not tasks:
        print("aot_compile: nothing selected", file=sys.stderr)
        return 2
    for arch in archs:
        try:
            path, release = ptxas_for(arch)
            print(f"aot_compile: sm_{arch}: {path} (CUDA {release})")
        except Exception as exc:  # noqa: BLE001 - each compile will report it too
            print(f"aot_compile: sm_{arch}: no ptxas ({type(exc).__name__}: {exc})", file=sys.stderr)
    if args.jobs > 1 and len(tasks) > 1:
        with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            records = list(pool.map(compile_one, *zip(*tasks)))
    else:
        records = [compile_one(i, a) for i, a in tasks]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    errors = [r for r in records if "error" in r]
    spills = [r for r in records if r["default"] and r.get("n_spills")]
    for r in records:
        status = "ERROR" if "error" in r else ("SPILL" if r.get("n_spills") else "ok")
        print(f"{status:5} {r['arch']} {r['kernel']:32} {r['dtype']:4} {r['variant']:28} "
              f"regs={r.get('n_regs')} spills={r.get('n_spills')} smem={r.get('shared_bytes')} ({r['compile_s']}s)")
    for r in errors:
        print(f"compile error: {r['kernel']} {r['arch']} {r['dtype']} {r['variant']}: {r['error']}", file=sys.stderr)
    print(f"aot_compile: {len(records)} compiles, {len(errors)} errors, {len(spills)} default configs spilling, "
          f"{time.perf_counter() - t0:.1f}s; report: {args.out}")
    return 1 if errors or spills else 0


if __name__ == "__main__":
    sys.exit(main())
