"""Fold inference-form ONNX BatchNormalization nodes into neighbouring Conv/ConvTranspose/Gemm/MatMul.

Optional extra ``fastbn[onnx]``; this is the only fastbn module that imports ``onnx``.

``fold_model(model) -> (model, report)`` folds, in the main graph:

- BN *after* Conv, ConvTranspose (any ``group``), Gemm (any alpha/beta/transA/transB) or MatMul whose
  weight is a constant 2-D matrix and whose output is 2-D (MatMul becomes Gemm to carry the new bias);
- BN *before* Gemm (transA=0) or a 2-D MatMul, and before a Conv that pads nothing (exact only then).

A BN is folded only when it is in inference form (no training outputs, ``training_mode`` 0), all its
and the layer's parameters are constants (initializers that are not graph inputs, ``Constant`` nodes,
or ``Identity`` of those), and the tensor between the two nodes has exactly one consumer and is not a
graph output. Everything else is left untouched and listed in the report with the reason. The folded
model keeps its inputs, outputs, tensor names at the graph boundary, and opset, and passes
``onnx.checker``. Subgraphs (If/Loop/Scan bodies) are not folded.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

try:
    import onnx
    from onnx import numpy_helper
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastbn.onnx needs the optional extra: pip install 'fastbn[onnx]'") from exc

from fastbn.fold import bn_to_affine, fold_conv, fold_conv_before, fold_dense, fold_dense_before

__all__ = ["fold_model", "load_model", "FoldReport", "FoldEntry"]

_FLOATS = (np.float16, np.float32, np.float64)
_AFTER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_BEFORE_OPS = ("Gemm", "MatMul", "Conv")
_TWO_GB = 2**31


@dataclass(frozen=True)
class FoldEntry:
    """One BatchNormalization node: its name, the neighbour considered (name and op) and why.

    ``bn`` and ``neighbour`` are node names (``<OpType -> first output>`` for an unnamed node);
    ``neighbour`` and ``neighbour_op`` are None when no neighbour was considered. For a folded BN the
    neighbour is the layer it went into, with its op after folding (a MatMul becomes a Gemm).

    Example
    -------
    >>> from fastbn.onnx import FoldEntry
    >>> e = FoldEntry("bn1", "conv1", "Conv", "folded into the preceding Conv")
    >>> e.bn, e.neighbour_op, e.reason
    ('bn1', 'Conv', 'folded into the preceding Conv')
    """
    bn: str
    neighbour: str | None
    neighbour_op: str | None
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_model` did: ``folded`` and ``skipped`` entries (lists of :class:`FoldEntry`)
    plus free-form ``notes`` (list of str); ``str(report)`` lists them.

    Example
    -------
    A MatMul + BatchNormalization (folded) and a Relu + BatchNormalization (skipped: nothing to fold into):

    >>> import onnx.parser, fastbn.onnx
    >>> model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    ... net (float[N, 2] x) => (float[N, 2] y, float[N, 2] z)
    ... <float[2, 2] w = {1, 2, 3, 4}, float[2] s = {2, 3}, float[2] b = {0.5, -1}, float[2] m = {1, 2},
    ...  float[2] v = {4, 9}>
    ... { [fc] h = MatMul(x, w)
    ...   [bn1] y = BatchNormalization(h, s, b, m, v)
    ...   [relu] r = Relu(x)
    ...   [bn2] z = BatchNormalization(r, s, b, m, v) }''')
    >>> folded, report = fastbn.onnx.fold_model(model)
    >>> print(report)                                                   # doctest: +ELLIPSIS
    folded 1 of 2 BatchNormalization node(s)
      folded  bn1 -> Gemm fc: folded into the preceding Gemm
      skipped bn2 (Relu relu): preceding node is Relu 'relu', not Conv/ConvTranspose/Gemm/MatMul; ...
    >>> report.folded[0]
    FoldEntry(bn='bn1', neighbour='fc', neighbour_op='Gemm', reason='folded into the preceding Gemm')
    >>> [e.bn for e in report.skipped], report.notes
    (['bn2'], [])
    """
    folded: list[FoldEntry] = field(default_factory=list)
    skipped: list[FoldEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.folded) + len(self.skipped)
        lines = [f"folded {len(self.folded)} of {total} BatchNormalization node(s)"]
        for e in self.folded:
            lines.append(f"  folded  {e.bn} -> {e.neighbour_op} {e.neighbour}: {e.reason}")
        for e in self.skipped:
            nb = f" ({e.neighbour_op} {e.neighbour})" if e.neighbour else ""
            lines.append(f"  skipped {e.bn}{nb}: {e.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


class _Skip(Exception):
    """A reason not to fold; the message goes into the report."""


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_float_attr(node: Any, name: str, value: float) -> None:
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _label(node: Any) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _subgraph_refs(graph: Any) -> tuple[set[str], int]:
    """Names read inside subgraphs (implicit inputs count as consumers) and the BNs found there."""
    refs: set[str] = set()
    n_bn = 0

    def walk(g: Any, top: bool) -> None:
        nonlocal n_bn
        for node in g.node:
            if not top:
                refs.update(node.input)
                n_bn += node.op_type == "BatchNormalization"
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
                    list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
                for sub in subs:
                    refs.update(o.name for o in sub.output)  # a body may output an outer tensor as is
                    walk(sub, False)
    walk(graph, True)
    return refs, n_bn


def load_model(model: Any) -> Any:
    """Load and validate an ONNX model from a ModelProto (copied), a path or bytes.

    Raises FileNotFoundError for a missing path, ValueError (one-line message) for input that is not a
    valid ONNX model, TypeError for anything else.

    >>> import fastbn.onnx
    >>> m = fastbn.onnx.load_model("model.onnx")   # doctest: +SKIP
    """
    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)  # never mutate the caller's model
        what = "model"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        what = "bytes"
        try:
            m = onnx.load_from_string(bytes(model))
        except Exception as e:
            raise ValueError(f"input bytes are not an ONNX model: {_first_line(e)}") from None
    elif isinstance(model, (str, os.PathLike)):
        what = os.fspath(model)
        if not os.path.isfile(what):
            raise FileNotFoundError(f"no such ONNX file: {what}")
        try:
            m = onnx.load(what)
        except Exception as e:
            raise ValueError(f"{what} is not a readable ONNX model: {_first_line(e)}") from None
    else:
        raise TypeError(f"model must be an onnx.ModelProto, a path or bytes, got {type(model).__name__}")
    # Protobuf parses many non-ONNX byte strings without complaint, so insist on a graph.
    if not m.HasField("graph") or not m.opset_import:
        raise ValueError(f"{what} is not an ONNX model (no graph or opset)")
    if m.ByteSize() < _TWO_GB:
        try:
            onnx.checker.check_model(m)
        except onnx.checker.ValidationError as e:
            raise ValueError(f"{what} is not a valid ONNX model: {_first_line(e)}") from None
    return m


class _Folder:
    """Mutable view of the main graph with producer/consumer maps kept up to date while folding."""

    def __init__(self, m: Any) -> None:
        self.m = m
        g = m.graph
        self.opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.nodes = []
        for n in g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            self.nodes.append(c)
        self.removed: set[int] = set()
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self.sub_refs, self.sub_bn = _subgraph_refs(g)
        self.values: dict[str, np.ndarray] = {}   # constant name -> array (cache + folded results)
        self.new_inits: list[str] = []
        self.dirty: set[str] = set()
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        self.uses: Counter[str] = Counter()
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for name in n.input:
                if name:
                    self.consumers.setdefault(name, []).append(i)
                    self.uses[name] += 1
        for name in self.sub_refs | self.graph_outputs:
            self.uses[name] += 1
        self.initially_used = {k for k, v in self.uses.items() if v > 0}
        self.names = (set(self.inits) | self.graph_inputs | self.graph_outputs | set(self.producer)
                      | set(self.consumers) | {v.name for v in g.value_info} | self.sub_refs)
        self._ranks: dict[str, int] | None = None

    # ---------------------------------------------------------------------------------------- queries
    def const(self, name: str, what: str) -> np.ndarray:
        """The value of a constant tensor, or _Skip saying why it is not one."""
        if name in self.values:
            return self.values[name]
        if name in self.inits:
            if name in self.graph_inputs:
                raise _Skip(f"{what} '{name}' is an initializer that is also a graph input "
                            "(it can be overridden at run time)")
            arr = numpy_helper.to_array(self.inits[name])
        elif name in self.producer and self.nodes[self.producer[name]].domain in ("", "ai.onnx") \
                and self.nodes[self.producer[name]].op_type in ("Constant", "Identity"):
            node = self.nodes[self.producer[name]]
            if node.op_type == "Identity":
                arr = self.const(node.input[0], what)
            else:
                a = node.attribute[0] if len(node.attribute) == 1 else None
                if a is None or a.name not in ("value", "value_float", "value_floats"):
                    raise _Skip(f"{what} '{name}' comes from a Constant node of an unsupported kind")
                v = onnx.helper.get_attribute_value(a)
                arr = numpy_helper.to_array(v) if a.name == "value" else np.asarray(v, np.float32)
        else:
            raise _Skip(f"{what} '{name}' is computed at run time, not a constant initializer")
        self.values[name] = arr
        return arr

    def n_consumers(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (name in self.sub_refs)

    def rank(self, name: str) -> int | None:
        if self._ranks is None:
            self._ranks = {}
            try:  # shape inference may fail on custom ops or huge models: then ranks are unknown
                inferred = onnx.shape_inference.infer_shapes(self.m)
                g = inferred.graph
                for vi in list(g.value_info) + list(g.input) + list(g.output):
                    tt = vi.type.tensor_type
                    if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                        self._ranks[vi.name] = len(tt.shape.dim)
            except Exception:
                pass
        return self._ranks.get(name)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    # ---------------------------------------------------------------------------------------- edits
    def _set_input(self, idx: int, slot: int, name: str) -> None:
        node = self.nodes[idx]
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        if old:
            self.uses[old] -= 1
            self.consumers[old].remove(idx)
        node.input[slot] = name
        self.uses[name] += 1
        self.consumers.setdefault(name, []).append(idx)

    def set_param(self, idx: int, slot: int, arr: np.ndarray, base: str) -> None:
        """Store a folded parameter: in place when this slot is its only user, else as a new tensor."""
        node = self.nodes[idx]
        old = node.input[slot] if slot < len(node.input) else ""
        own = old and (old in self.new_inits or (old in self.inits and old not in self.graph_inputs))
        if own and self.uses[old] == 1:
            self.values[old] = arr
            if old in self.inits:
                self.dirty.add(old)
            return
        name = self.fresh(base)
        self.values[name] = arr
        self.new_inits.append(name)
        self._set_input(idx, slot, name)

    def remove(self, idx: int) -> None:
        node = self.nodes[idx]
        for name in node.input:
            if name:
                self.uses[name] -= 1
                self.consumers[name].remove(idx)
        for o in node.output:
            self.producer.pop(o, None)
        self.removed.add(idx)

    # ------------------------------------------------------------------------------------ finishing
    def finish(self) -> Any:
        g = self.m.graph
        keep = [i for i in range(len(self.nodes)) if i not in self.removed]
        # Drop Constant/Identity nodes that only fed parameters we replaced (now unused).
        changed = True
        while changed:
            changed = False
            for i in list(keep):
                n = self.nodes[i]
                if n.domain in ("", "ai.onnx") and n.op_type in ("Constant", "Identity") and \
                        all(self.uses[o] == 0 and o in self.initially_used for o in n.output):
                    self.remove(i)
                    keep.remove(i)
                    changed = True
        kept_nodes = [self.nodes[i] for i in keep]
        inits = []
        for t in g.initializer:
            if t.name in self.dirty:
                t = numpy_helper.from_array(self.values[t.name], t.name)
            # Keep what is still used, graph inputs, and what was unused before we started.
            if self.uses[t.name] > 0 or t.name in self.graph_inputs or t.name not in self.initially_used:
                inits.append(t)
        inits += [numpy_helper.from_array(self.values[n], n) for n in self.new_inits if self.uses[n] > 0]
        live = {n for node in kept_nodes for n in list(node.input) + list(node.output)}
        live |= self.graph_inputs | self.graph_outputs
        value_info = [v for v in g.value_info if v.name in live]
        del g.node[:]
        g.node.extend(kept_nodes)
        del g.initializer[:]
        g.initializer.extend(inits)
        del g.value_info[:]
        g.value_info.extend(value_info)
        return self.m


def _bn_params(f: _Folder, bn: Any) -> tuple[list[np.ndarray], float]:
    if bn.domain not in ("", "ai.onnx"):
        raise _Skip(f"BatchNormalization in domain '{bn.domain}'")
    if _attr(bn, "training_mode", 0):
        raise _Skip("training form (training_mode=1): it normalizes with batch statistics")
    if len([o for o in bn.output if o]) > 1:
        raise _Skip("training form: it has running mean/variance outputs")
    if _attr(bn, "is_test", 1) == 0:
        raise _Skip("training form (is_test=0)")
    if _attr(bn, "spatial", 1) == 0:
        raise _Skip("spatial=0 (per-element statistics) is not supported")
    if len(bn.input) != 5 or not all(bn.input):
        raise _Skip("BatchNormalization without all of scale, B, mean, var")
    names = ("scale", "B (shift)", "mean", "var")
    params = [f.const(n, f"BN {w}") for n, w in zip(bn.input[1:], names)]
    for p, w in zip(params, names):
        if p.ndim != 1 or p.shape != params[0].shape:
            raise _Skip(f"BN {w} has shape {p.shape}; expected 1-D like scale {params[0].shape}")
        if p.dtype.type not in _FLOATS:
            raise _Skip(f"BN {w} has unsupported dtype {p.dtype}")
    return [p.astype(np.float64) for p in params], float(_attr(bn, "epsilon", 1e-5))


def _weight(f: _Folder, node: Any, slot: int, what: str, ndim: tuple[int, int]) -> np.ndarray:
    if len(node.input) <= slot or not node.input[slot]:
        raise _Skip(f"{node.op_type} has no {what}")
    w = f.const(node.input[slot], f"{node.op_type} {what}")
    if w.dtype.type not in _FLOATS:
        raise _Skip(f"{node.op_type} {what} has unsupported dtype {w.dtype}")
    if not ndim[0] <= w.ndim <= ndim[1]:
        raise _Skip(f"{node.op_type} {what} has shape {w.shape}")
    return w


def _optional(f: _Folder, node: Any, slot: int, what: str) -> np.ndarray | None:
    if len(node.input) <= slot or not node.input[slot]:
        return None
    return f.const(node.input[slot], f"{node.op_type} {what}").astype(np.float64)


def _check_gemm_opset(f: _Folder) -> None:
    if f.opset < 7:  # Gemm's broadcasting of C needs the `broadcast` attribute before opset 7
        raise _Skip(f"opset {f.opset} < 7 is not supported for Gemm/MatMul folding")


def _plan_after(f: _Folder, bn_idx: int, params: list[np.ndarray], eps: float) -> Callable[[], None]:
    bn = f.nodes[bn_idx]
    x = bn.input[0]
    p_idx = f.producer[x]
    p = f.nodes[p_idx]
    if x in f.graph_outputs:
        raise _Skip(f"its input '{x}' is also a graph output")
    if f.n_consumers(x) != 1:
        raise _Skip(f"{p.op_type} output '{x}' has {f.n_consumers(x)} consumers; folding would change "
                    "the others")
    gamma, beta, mean, var = params
    try:
        if p.op_type in ("Conv", "ConvTranspose"):
            w = _weight(f, p, 1, "weight", (3, 32))
            group = int(_attr(p, "group", 1))
            b = _optional(f, p, 2, "bias")
            w2, b2 = fold_conv(w.astype(np.float64), b, gamma, beta, mean, var, eps, groups=group,
                               transposed=p.op_type == "ConvTranspose")
            new = [(1, w2.astype(w.dtype), f"{p.input[1]}_bnfolded"),
                   (2, b2.astype(w.dtype), f"{p.name or p.output[0]}_bias_bnfolded")]
            to_gemm = set_beta = False
        else:
            _check_gemm_opset(f)
            w = _weight(f, p, 1, "weight B", (2, 2))
            if p.op_type == "MatMul":
                r = f.rank(x)
                if r != 2:
                    raise _Skip(f"MatMul output rank is {r if r is not None else 'unknown'}; BN's channel "
                                "axis 1 is MatMul's output-feature axis only for 2-D outputs")
                beta_g, trans_b, cmat = 1.0, 0, None
            else:  # alpha stays on the Gemm node: s * (alpha A B) == alpha A (B s)
                beta_g = float(_attr(p, "beta", 1.0))
                trans_b, cmat = int(_attr(p, "transB", 0)), _optional(f, p, 2, "C")
            # transB=1 stores B as (N, K) = PyTorch (out, in); transB=0 as (K, N) = Keras (in, out).
            layout = "torch" if trans_b else "keras"
            w2, _ = fold_dense(w.astype(np.float64), None, gamma, beta, mean, var, eps, layout=layout)
            s, t = bn_to_affine(gamma, beta, mean, var, eps)
            # s * (alpha A B + beta C) + t == alpha A (B s) + (beta C s + t)
            c2 = t if cmat is None else beta_g * cmat * s + t
            new = [(1, w2.astype(w.dtype), f"{p.input[1]}_bnfolded"),
                   (2, c2.astype(w.dtype), f"{p.name or p.output[0]}_bias_bnfolded")]
            to_gemm, set_beta = p.op_type == "MatMul", True
    except ValueError as e:  # shape mismatches etc. from fastbn.fold
        raise _Skip(str(e)) from None
    if w2.shape != w.shape:
        raise _Skip(f"folded weight shape {w2.shape} != {w.shape}")

    def apply() -> None:
        for slot, arr, base in new:
            f.set_param(p_idx, slot, arr, base)
        if to_gemm:
            p.op_type = "Gemm"  # MatMul has no bias input; Gemm(A, B, C) with defaults is A @ B + C
        if set_beta:
            _set_float_attr(p, "beta", 1.0)
        # The layer now produces the BN's output name, so graph outputs and consumers keep their names.
        y = bn.output[0]
        f.remove(bn_idx)
        p.output[0] = y
        f.producer.pop(x, None)
        f.producer[y] = p_idx
    return apply


def _plan_before(f: _Folder, bn_idx: int, params: list[np.ndarray], eps: float) -> Callable[[], None]:
    bn = f.nodes[bn_idx]
    x, y = bn.input[0], bn.output[0]
    if y in f.graph_outputs:
        raise _Skip(f"its output '{y}' is a graph output")
    if f.n_consumers(y) != 1:
        raise _Skip(f"its output '{y}' has {f.n_consumers(y)} consumers")
    c_idx = f.consumers[y][0]
    c = f.nodes[c_idx]
    if list(c.input).count(y) != 1 or c.input[0] != y:
        raise _Skip(f"BN output is not (only) the data input of {c.op_type}")
    gamma, beta, mean, var = params
    try:
        if c.op_type == "Conv":
            w = _weight(f, c, 1, "weight", (3, 32))
            auto_pad = _attr(c, "auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                padding: Any = "same"
            elif auto_pad == "VALID":
                padding = "valid"
            else:
                padding = list(_attr(c, "pads", [0] * 2 * (w.ndim - 2)))
            b = _optional(f, c, 2, "bias")
            w2, b2 = fold_conv_before(w.astype(np.float64), b, gamma, beta, mean, var, eps,
                                      padding=padding, groups=int(_attr(c, "group", 1)))
            to_gemm = set_beta = False
        else:
            _check_gemm_opset(f)
            w = _weight(f, c, 1, "weight B", (2, 2))
            if c.op_type == "MatMul":
                r = f.rank(y)
                if r != 2:
                    raise _Skip(f"MatMul input rank is {r if r is not None else 'unknown'}; BN's channel "
                                "axis 1 is MatMul's input-feature axis only for 2-D inputs")
                alpha, beta_g, trans_b, cmat = 1.0, 1.0, 0, None
            else:
                if _attr(c, "transA", 0):
                    raise _Skip("Gemm has transA=1: BN's channel axis is not Gemm's input-feature axis")
                alpha, beta_g = float(_attr(c, "alpha", 1.0)), float(_attr(c, "beta", 1.0))
                trans_b, cmat = int(_attr(c, "transB", 0)), _optional(f, c, 2, "C")
            layout = "torch" if trans_b else "keras"
            w2, wt = fold_dense_before(w.astype(np.float64), None, gamma, beta, mean, var, eps,
                                       layout=layout)
            # alpha (A s + t) B + beta C == alpha A (s B) + (alpha t B + beta C)
            b2 = alpha * wt if cmat is None else alpha * wt + beta_g * cmat
            to_gemm, set_beta = c.op_type == "MatMul", True
    except ValueError as e:
        raise _Skip(str(e)) from None
    new = [(1, w2.astype(w.dtype), f"{c.input[1]}_bnfolded"),
           (2, b2.astype(w.dtype), f"{c.name or c.output[0]}_bias_bnfolded")]

    def apply() -> None:
        for slot, arr, base in new:
            f.set_param(c_idx, slot, arr, base)
        if to_gemm:
            c.op_type = "Gemm"
        if set_beta:
            _set_float_attr(c, "beta", 1.0)
        f.remove(bn_idx)
        f._set_input(c_idx, 0, x)
    return apply


def fold_model(model: Any, *, progress: Callable[[int, int, str], None] | None = None
               ) -> tuple[Any, FoldReport]:
    """Fold every foldable BatchNormalization of an ONNX model; return ``(new_model, report)``.

    ``model``: an ``onnx.ModelProto`` (not modified), a file path or serialized bytes. ``progress``, if
    given, is called as ``progress(i, n, bn_name)`` before the i-th (1-based) of n BN nodes. Raises
    ValueError for input that is not a valid ONNX model and FileNotFoundError for a missing path.

    >>> import fastbn.onnx
    >>> folded, report = fastbn.onnx.fold_model("model.onnx")   # doctest: +SKIP
    >>> print(report)                                             # doctest: +SKIP
    folded 3 of 4 BatchNormalization node(s)
      folded  bn1 -> Conv conv1: folded into the preceding Conv
      ...
    """
    m = load_model(model)
    f = _Folder(m)
    report = FoldReport()
    bns = [i for i, n in enumerate(f.nodes) if n.op_type == "BatchNormalization"]
    for k, bn_idx in enumerate(bns, 1):
        bn = f.nodes[bn_idx]
        label = _label(bn)
        if progress is not None:
            progress(k, len(bns), label)
        try:
            params, eps = _bn_params(f, bn)
        except _Skip as e:
            report.skipped.append(FoldEntry(label, None, None, str(e)))
            continue
        p_idx = f.producer.get(bn.input[0])
        prev = f.nodes[p_idx] if p_idx is not None else None
        cons = f.consumers.get(bn.output[0], [])
        nxt = f.nodes[cons[0]] if len(cons) == 1 else None
        reasons = []
        neighbour: Any = None  # the most relevant neighbour for the report: first layer we tried
        for where, node, ops, plan in (("preceding", prev, _AFTER_OPS, _plan_after),
                                       ("following", nxt, _BEFORE_OPS, _plan_before)):
            if node is None:
                reasons.append(f"no preceding layer (input '{bn.input[0]}' is not computed by a node)"
                               if where == "preceding" else
                               f"no single following node (output '{bn.output[0]}' has "
                               f"{f.n_consumers(bn.output[0])} consumers"
                               f"{', and is a graph output' if bn.output[0] in f.graph_outputs else ''})")
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
                reasons.append(f"{where} node is {node.op_type} '{_label(node)}', not {'/'.join(ops)}")
                continue
            if neighbour is None:
                neighbour = node
            try:
                apply = plan(f, bn_idx, params, eps)
            except _Skip as e:
                reasons.append(f"{where} {node.op_type} '{_label(node)}': {e}")
                continue
            apply()
            report.folded.append(FoldEntry(label, _label(node), node.op_type,
                                           f"folded into the {where} {node.op_type}"))
            break
        else:
            neighbour = neighbour if neighbour is not None else (prev if prev is not None else nxt)
            report.skipped.append(FoldEntry(label, _label(neighbour) if neighbour is not None else None,
                                            neighbour.op_type if neighbour is not None else None,
                                            "; ".join(reasons)))
    if f.sub_bn:
        report.notes.append(f"{f.sub_bn} BatchNormalization node(s) inside subgraphs were left alone")
    out = f.finish()
    if out.ByteSize() < _TWO_GB:
        onnx.checker.check_model(out)
    else:
        report.notes.append("model > 2 GB: run onnx.checker.check_model on the saved file")
    return out, report
