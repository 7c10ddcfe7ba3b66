"""Ahead-of-time compilation of Triton kernels for an NVIDIA GPU on a machine without one.

The CPU suite runs the kernels under ``TRITON_INTERPRET=1``, which executes them as NumPy and
never lowers them; compiling them to a cubin (Triton's frontend, MLIR passes and ``ptxas``, no
driver needed) checks the path a GPU takes: typing, ``constexpr`` branches, ``tl.dot`` shapes.
Triton decides at import time whether its ``@jit`` functions (``tl.sum`` among them) are
interpreted, so the compilation runs in a fresh interpreter without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

kernels, capability = json.loads(sys.argv[1])
for module_name, name, signature, constexprs in kernels:
    full_signature = {arg: "constexpr" if arg in constexprs else kind for arg, kind in signature.items()}
    source = ASTSource(getattr(importlib.import_module(module_name), name), full_signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    assert compiled.asm["cubin"], name
"""


def compile_for_cuda(kernels: list[tuple[str, str, dict, dict]], capability: int = 90) -> None:
    """Compile each ``(module, kernel name, signature, constexprs)`` for ``sm_<capability>``, in one subprocess.

    Skips when Triton's NVIDIA backend is missing; fails with the compiler's message otherwise.
    """
    pytest.importorskip("triton.backends.nvidia.compiler")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    arguments = json.dumps([kernels, capability])
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, arguments], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
