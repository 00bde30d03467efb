"""The compiler pipeline of fastbn's dispatchers: Numba's, plus literal flags made constants.

A kernel variant freezes its flags (``RELU``, ``STREAM``, ...) as constants and passes them on to its
tasks and row helpers, which Numba compiles for those values: the argument is typed
``Literal[bool](False)``. But Numba prunes dead branches only on constants and ``is None`` tests, not on
a literal argument's value: under ``if stream:`` the streaming-store loops of a plain kernel's row
writers were still typed, inlined and lowered to LLVM IR (LLVM then dropped them). Checked on
``rows.act_run``: its typed IR held both store loops for ``stream=False``.

:class:`LiteralFlagsAsConstants` runs first in the untyped pipeline and turns ``flag = arg(i)`` into
``flag = const(value)`` for every argument typed as a boolean literal. Numba's own dead-branch pass
(after IR inlining too) then removes the dead branches, those of the helpers inlined at the IR level
included, before type inference. The compiled signature is the same (the argument keeps its literal
type; a constant passed on is the same literal), and the branches removed are ones LLVM removed anyway.
Checked on the float32 training forward, backward and inference kernels (channels-first and -last): the
same vector instructions; the scalar glue around them lost a few tests of flags (``cmpb``/``setne``) and
four calls in inference. 780 outputs over every layout, float32/float64, 1 and 2 threads: the same bits.

The first float32 training forward, backward and inference (``examples/jit_profile.py``, alternating cold
runs against the commit before): medians 10.2 -> 7.8 s of CPU (6 pairs) and 8.5 -> 7.4 s (4 pairs).
"""
from __future__ import annotations

from numba.core import ir, types
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_machinery import FunctionPass, register_pass
from numba.core.ir_utils import build_definitions
from numba.core.untyped_passes import IRProcessing


@register_pass(mutates_CFG=False, analysis_only=False)
class LiteralFlagsAsConstants(FunctionPass):
    """``flag = arg(i)`` -> ``flag = const(v)`` where the i-th argument is typed ``Literal[bool](v)``."""

    _name = "fastbn_literal_flags_as_constants"

    def __init__(self):
        FunctionPass.__init__(self)

    def run_pass(self, state):
        args = state.args or ()
        changed = False
        for block in state.func_ir.blocks.values():
            for stmt in block.body:
                if isinstance(stmt, ir.Assign) and isinstance(stmt.value, ir.Arg) \
                        and stmt.value.index < len(args) and isinstance(args[stmt.value.index], types.BooleanLiteral):
                    stmt.value = ir.Const(args[stmt.value.index].literal_value, stmt.value.loc)
                    changed = True
        if changed:
            state.func_ir._definitions = build_definitions(state.func_ir.blocks)
        return changed


class Compiler(CompilerBase):
    """Numba's nopython pipeline with :class:`LiteralFlagsAsConstants` after the IR is built (the way of
    extending it that Numba's developer guide shows under "Customizing the compiler")."""

    def define_pipelines(self):
        pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
        pm.add_pass_after(LiteralFlagsAsConstants, IRProcessing)
        pm.finalize()
        return [pm]
