"""Ahead-of-time compilation of Triton kernels for an NVIDIA GPU on a machine without one.

The CPU suite runs the kernels under ``TRITON_INTERPRET=1``, which executes them as NumPy and
never lowers them; compiling them to a cubin (Triton's frontend, MLIR passes and ``ptxas``, no
driver needed) checks the path a GPU takes: typing, ``constexpr`` branches, ``tl.dot`` shapes,
and, read back from the cubin with ``cuobjdump -res-usage``, registers, stack (local memory:
register spills) and shared memory. Triton decides at import time whether its ``@jit`` functions
(``tl.sum`` among them) are interpreted, so the compilation runs in a fresh interpreter without
``TRITON_INTERPRET``; Triton's on-disk cache makes a repeated compilation cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


_SCRIPT = """
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

kernels, capability = json.loads(sys.argv[1])
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
usage = []
for module_name, name, signature, constexprs, options in kernels:
    full_signature = {arg: "constexpr" if arg in constexprs else kind for arg, kind in signature.items()}
    source = ASTSource(getattr(importlib.import_module(module_name), name), full_signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    assert compiled.asm["cubin"], name
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\\d+)", report))
    usage.append(dict(registers=int(fields["REG"]), stack=int(fields["STACK"]) + int(fields["LOCAL"]),
                      shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps))
print(json.dumps(usage))
"""


def compile_for_cuda(
    kernels: list[tuple[str, str, dict, dict] | tuple[str, str, dict, dict, dict]], capability: int = 90
) -> list[dict[str, int]]:
    """Compile each ``(module, kernel name, signature, constexprs[, options])`` for ``sm_<capability>``, in one
    subprocess; return per kernel ``registers`` (per thread), ``stack`` (bytes of local memory per thread: spills),
    ``shared`` (bytes) and ``num_warps``.

    Skips when Triton's NVIDIA backend is missing; fails with the compiler's message otherwise.
    """
    pytest.importorskip("triton.backends.nvidia.compiler")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    arguments = json.dumps([[(*kernel, {})[:5] for kernel in kernels], capability])
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, arguments], env=environment, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
