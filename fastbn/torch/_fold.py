"""Fold eval-mode batch norm into the preceding Conv/ConvTranspose/Linear of a PyTorch model.

The contract: the folded model's ``forward`` gives the original's output (to rounding). A pair is folded
only where that is shown:

1. **Traced** (the model's forward traces with ``torch.fx``; BN-like modules and torch's layers stay
   calls): a BN call whose input is a layer call's output with no other user is folded *in the traced
   graph*: the graph calls a new folded layer kept under ``model._fastbn_folded`` and the BN call is
   removed (its tail, e.g. a fused activation, kept). The model keeps its class, attributes and
   methods and every original submodule, unchanged, so code that reaches inside it (``features[:1]``,
   ``forward_features``, iterating a Sequential) still gets the original layers; only ``forward`` is
   replaced by the folded graph.
2. **Verified** (the forward does not trace, and ``example_inputs`` were given): the forward is run on
   them, recording which layer output each BN consumes; those pairs are folded in place in the copy (the
   layer replaced by the folded one, the BN by its tail) and kept only if the output on the example
   inputs is unchanged.
3. Otherwise nothing is folded. Every BN gets an entry in the report saying what was done and why.

Linear + BatchNorm1d (and any BN that accepts several input ranks) is folded only when the BN's input is
known to be (N, C): from the example inputs' shapes, or from the traced graph (a Flatten or a 2-D view
before the Linear). On (N, C, L) BatchNorm1d normalizes the Linear's *length* axis, not its features.

Folded weights are computed in float64 with :mod:`fastbn.fold` and cast back to the layer's dtype.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree

from fastbn.fold import fold_conv, fold_dense
from fastbn.torch._bnlike import BatchNormInfo, GraphCode, NotBatchNorm, bn_dims, describe, frozen_stats

__all__ = ["fold_model", "FoldReport", "FoldEntry"]

# exact types: subclasses may override forward (QAT modules, parametrized layers)
_LAYERS: dict[type, tuple[int, bool]] = {  # type -> (spatial dims, transposed); Linear: 0
    nn.Linear: (0, False),
    nn.Conv1d: (1, False), nn.Conv2d: (2, False), nn.Conv3d: (3, False),
    nn.ConvTranspose1d: (1, True), nn.ConvTranspose2d: (2, True), nn.ConvTranspose3d: (3, True),
}
# modules and functions that keep their input's rank (for the static rank proof of Linear + BN1d)
_SAME_RANK_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU,
                      nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Identity, nn.Linear)
_VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative to the output's largest magnitude
_CONTAINER = "_fastbn_folded"


@dataclass(frozen=True)
class FoldEntry:
    """One BN call (or module): its path in the model, the layer considered (path, class) and why.

    ``bn`` and ``layer`` are module paths as ``named_modules()`` gives them (``"1"`` in a Sequential,
    ``"layer1.0.bn1"`` in a ResNet); ``layer`` and ``layer_type`` are None when no layer was considered.

    Example
    -------
    >>> from fastbn.torch import FoldEntry
    >>> e = FoldEntry("layer1.0.bn1", "layer1.0.conv1", "Conv2d", "folded in the traced forward")
    >>> e.bn, e.layer_type
    ('layer1.0.bn1', 'Conv2d')
    """
    bn: str
    layer: str | None
    layer_type: str | None
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_model` did. ``method``: "traced" (torch.fx), "verified" (on example inputs) or
    "none"; ``folded`` and ``skipped`` entries (lists of :class:`FoldEntry`); free-form ``notes`` (list of
    str). ``str(report)`` lists them.

    Example
    -------
    >>> from torch import nn
    >>> from fastbn.torch import fold_model
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
    >>> folded, report = fold_model(net, return_report=True)
    >>> print(report)
    folded 1 of 2 batch norm(s) (traced)
      folded  1 -> Conv2d 0: folded in the traced forward
      skipped 3 (ReLU 2): its input comes from a ReLU, not from a Conv/ConvTranspose/Linear
    >>> report.method, report.folded[0]
    ('traced', FoldEntry(bn='1', layer='0', layer_type='Conv2d', reason='folded in the traced forward'))
    """
    method: str = "none"
    folded: list[FoldEntry] = field(default_factory=list)
    skipped: list[FoldEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.folded) + len(self.skipped)
        lines = [f"folded {len(self.folded)} of {total} batch norm(s) ({self.method})"]
        for e in self.folded:
            lines.append(f"  folded  {e.bn} -> {e.layer_type} {e.layer}: {e.reason}")
        for e in self.skipped:
            nb = f" ({e.layer_type} {e.layer})" if e.layer else ""
            lines.append(f"  skipped {e.bn}{nb}: {e.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


class _Skip(Exception):
    pass


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _is_bn_like(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) or frozen_stats(m) is not None
            or hasattr(m, "_fastbn_tail"))


def _np64(t: torch.Tensor | None) -> Any:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _bn_params(bn: nn.Module, kind: str) -> tuple:
    if kind == "frozen":
        w, b, rm, rv, eps = frozen_stats(bn)
        return _np64(w), _np64(b), _np64(rm), _np64(rv), eps
    return _np64(bn.weight), _np64(bn.bias), _np64(bn.running_mean), _np64(bn.running_var), float(bn.eps)


def _folded(layer: nn.Module, bn: nn.Module, kind: str) -> nn.Module:
    """A new layer equal to ``bn(layer(x))`` in eval mode (the BN part only, not its tail)."""
    g, b, rm, rv, eps = _bn_params(bn, kind)
    args = (_np64(layer.weight), _np64(layer.bias), g, b, rm, rv, eps)
    dims, transposed = _LAYERS[type(layer)]
    if dims == 0:
        w, bias = fold_dense(*args)
    else:
        w, bias = fold_conv(*args, groups=layer.groups, transposed=transposed)
    new = copy.deepcopy(layer)
    ref = layer.weight
    # Assigning a Parameter also registers a bias on layers created with bias=False.
    new.weight = nn.Parameter(torch.from_numpy(w).to(dtype=ref.dtype, device=ref.device),
                              requires_grad=ref.requires_grad)
    new.bias = nn.Parameter(torch.from_numpy(bias).to(dtype=ref.dtype, device=ref.device),
                            requires_grad=ref.requires_grad)
    return new


def _check_pair(layer: Any, bn: nn.Module, ndim: int | None) -> BatchNormInfo:
    """What the BN is, if ``bn(layer(x))`` can be folded; raises _Skip with the reason.

    ``ndim``: the rank of the layer's output (the BN's input) where known.
    """
    lname = type(layer).__name__
    if type(layer) not in _LAYERS:
        raise _Skip(f"its input comes from a {lname}, not from a Conv/ConvTranspose/Linear")
    try:
        info = describe(bn)
    except NotBatchNorm as e:
        raise _Skip(f"{type(bn).__name__} is not foldable: {e}") from None
    if info.kind == "bn" and (bn.running_mean is None or bn.running_var is None):
        raise _Skip("no running statistics (track_running_stats=False): it normalizes with batch "
                    "statistics even in eval mode")
    if _has_hooks(layer) or _has_hooks(bn):
        raise _Skip("the layer or the BN has hooks, which would see different tensors after folding")
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        raise _Skip("the layer is lazy and not initialized yet (run it once first)")
    dims, _ = _LAYERS[type(layer)]
    C = layer.out_features if dims == 0 else layer.out_channels
    nf = frozen_stats(bn)[0].shape[0] if info.kind == "frozen" else bn.num_features
    if nf != C:
        raise _Skip(f"the BN has {nf} features, the layer {C} outputs")
    bd = 2 if info.kind == "frozen" else bn_dims(bn)
    if bd is not None and bd != max(dims, 1):
        raise _Skip(f"a {bd}-d BN after a layer with {dims} spatial dims")
    need = 2 if dims == 0 else dims + 2  # the BN normalizes axis 1: Linear's features only on (N, C)
    if ndim is not None and ndim != need:
        raise _Skip(f"the BN's input has {ndim} dims, so it does not normalize the {lname}'s output "
                    "channels" if dims == 0 else f"the BN's input has {ndim} dims (an unbatched input?)")
    if ndim is None and (bd is None or bd == 1):
        # BatchNorm1d (and SyncBatchNorm) accept several ranks; on (N, C, L) after a Linear it normalizes
        # the length axis. BN2d/3d refuse every rank but their own, so the pair computes as folded.
        raise _Skip(f"the rank of the BN's input is not known (a {type(bn).__name__} after a {lname} "
                    "normalizes axis 1 whatever it holds): pass example_inputs= to fold_model")
    return info


def _flatten_out(v: Any) -> list:
    return _pytree.tree_flatten(v)[0]


def _same_output(ref: Any, got: Any) -> str | None:
    """None when ``got`` matches ``ref`` (tensors to _VERIFY_RTOL of their magnitude); else why not."""
    a, b = _flatten_out(ref), _flatten_out(got)
    if len(a) != len(b):
        return f"the output structure changed ({len(a)} vs {len(b)} leaves)"
    for i, (r, g) in enumerate(zip(a, b)):
        if isinstance(r, torch.Tensor):
            if not isinstance(g, torch.Tensor) or g.shape != r.shape:
                return f"output {i}: shape {tuple(r.shape)} became {getattr(g, 'shape', type(g).__name__)}"
            if r.numel() == 0 or not r.is_floating_point():
                if not torch.equal(r, g):
                    return f"output {i} changed"
                continue
            rd, gd = r.detach().double(), g.detach().double()
            scale = float(rd.abs().max())
            err = float((gd - rd).abs().max())
            tol = _VERIFY_RTOL.get(r.dtype, 1e-2) * max(scale, 1e-30)
            if not err <= tol:
                return f"output {i}: max abs difference {err:.3g} > {tol:.3g}"
        elif r is not g and r != g:
            return f"output {i} changed"
    return None


# ----------------------------------------------------------------------------------------------- fx path

class _Tracer(torch.fx.Tracer):
    """torch.fx tracer keeping BN-like modules as calls and noting traced-through modules with hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.hooked: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_bn_like(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if not self.is_leaf_module(m, self.path_of_module(m)) and (m._forward_hooks or m._forward_pre_hooks):
            self.hooked.append(self.path_of_module(m))
        return super().call_module(m, forward, args, kwargs)


def _trace(model: nn.Module) -> torch.fx.Graph:
    tracer = _Tracer()
    graph = tracer.trace(model)
    if tracer.hooked:
        raise RuntimeError(f"module(s) {tracer.hooked} have forward hooks, which a torch.fx trace would "
                           "drop")
    return graph


def _static_ndim(node: Any, modules: dict) -> int | None:
    """The rank of ``node``'s value where the graph alone shows it, else None."""
    for _ in range(64):
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        if meta is not None and hasattr(meta, "shape"):
            return len(meta.shape)
        if not isinstance(node, torch.fx.Node) or not node.args:
            return None
        a = node.args
        if node.op == "call_module":
            m = modules.get(node.target)
            if isinstance(m, nn.Flatten):
                return 2 if m.start_dim == 1 and m.end_dim == -1 else None
            if isinstance(m, _SAME_RANK_MODULES):
                node = a[0]
                continue
            return None
        if node.op == "call_function" and node.target is torch.flatten or \
                node.op == "call_method" and node.target == "flatten":
            start = a[1] if len(a) > 1 else node.kwargs.get("start_dim", 0)
            end = a[2] if len(a) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if start == 1 and end == -1 else (1 if start == 0 and end == -1 else None)
        if node.op == "call_method" and node.target in ("view", "reshape"):
            sizes = a[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            return len(sizes) if sizes else None
        if node.op == "call_function" and node.target in (torch.relu, nn.functional.relu,
                                                           nn.functional.dropout, torch.sigmoid,
                                                           torch.tanh, nn.functional.silu,
                                                           nn.functional.gelu):
            node = a[0]
            continue
        return None
    return None


def _slot(container: nn.Module, path: str) -> str:
    base = re.sub(r"\W", "_", path) or "layer"
    name, k = base, 1
    while name in container._modules:
        k += 1
        name = f"{base}_{k}"
    return name


def _inline_tail(graph: torch.fx.Graph, tail_graph: torch.fx.Graph, bn_node: Any, value: Any,
                 prefix: str) -> Any:
    """Copy the tail's nodes after ``bn_node`` (targets prefixed with the BN's path); returns its output."""
    env: dict = {}
    result = value
    with graph.inserting_before(bn_node):
        for n in tail_graph.nodes:
            if n.op == "placeholder":
                env[n] = value
            elif n.op == "output":
                result = n.args[0]
                result = env[result] if isinstance(result, torch.fx.Node) else result
            else:
                new = graph.node_copy(n, lambda v: env[v])
                if new.op in ("call_module", "get_attr"):
                    new.target = f"{prefix}.{new.target}"
                env[n] = new
    return result


class _FoldedForward:
    """The model's forward after folding: the traced graph, run on the model (picklable, deep-copyable)."""

    def __init__(self, owner: nn.Module, code: GraphCode):
        self.owner = owner
        self.code = code

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.owner.training:
            raise RuntimeError(f"this {type(self.owner).__name__} was folded by fastbn.torch.fold_model for "
                               "inference: its forward runs in eval mode only (call .eval(), or train the "
                               "original model and fold it again)")
        return self.code(self.owner, *args, **kwargs)


def _fold_traced(model: nn.Module, graph: torch.fx.Graph, args: tuple | None, report: FoldReport) -> int:
    modules = dict(model.named_modules())
    if args is not None:
        ShapeProp(torch.fx.GraphModule(model, graph)).propagate(*args)
    container = nn.Module()
    called = set()
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _is_bn_like(modules.get(node.target)):
            continue
        bn = modules[node.target]
        called.add(node.target)
        prev = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        layer = modules.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" \
            else None
        lpath = prev.target if layer is not None else None
        ltype = type(layer).__name__ if layer is not None else None
        try:
            if layer is None:
                what = "not a module's output" if prev is not None else "several arguments"
                raise _Skip(f"its input is {what} (folding needs a Conv/ConvTranspose/Linear right before)")
            ndim = _static_ndim(node.args[0], modules)
            info = _check_pair(layer, bn, ndim)
            if len(prev.users) != 1:
                others = [u.name for u in prev.users if u is not node]
                raise _Skip(f"the {ltype}'s output is also used by {others} in the forward")
        except _Skip as e:
            report.skipped.append(FoldEntry(node.target, lpath, ltype, str(e)))
            continue
        slot = _slot(container, lpath)
        container.add_module(slot, _folded(layer, bn, info.kind))
        prev.target = f"{_CONTAINER}.{slot}"
        tail = info.tail
        out = prev if tail is None else _inline_tail(graph, tail.graph, node, prev, node.target)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
        kept = "" if tail is None else f"; its tail ({', '.join(str(t) for _, t in tail.ops)}) kept"
        report.folded.append(FoldEntry(node.target, lpath, ltype, f"folded in the traced forward{kept}"))
    for path, m in modules.items():
        if _is_bn_like(m) and path not in called and not any(path.startswith(p + ".") for p in called):
            report.skipped.append(FoldEntry(path, None, None, "not called by the model's forward"))
    if count:
        model.add_module(_CONTAINER, container)
        graph.owning_module = model  # lint resolves the targets on the model itself
        graph.lint()
        model.forward = _FoldedForward(model, GraphCode(graph))
    return count


# ---------------------------------------------------------------------------------------- verified path

class _TailModule(nn.Module):
    """In place of a folded BN subclass: runs only its tail (e.g. the activation), on the BN module."""

    def __init__(self, bn: nn.Module, tail: Any):
        super().__init__()
        self.bn = bn
        self.tail = tail

    def forward(self, y: torch.Tensor) -> Any:
        return self.tail(self.bn, y)


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _run(model: nn.Module, args: tuple) -> Any:
    return model(*args)


def _fold_verified(model: nn.Module, args: tuple, report: FoldReport) -> int:
    modules = dict(model.named_modules())
    calls: list = []  # (path, input, output): tensors kept alive so identity comparisons hold
    handles = []

    def hook(path: str):
        def record(mod, inputs, output):
            calls.append((path, inputs[0] if len(inputs) == 1 else None, output))
        return record

    for path, m in modules.items():
        if path and (type(m) in _LAYERS or _is_bn_like(m)):
            handles.append(m.register_forward_hook(hook(path)))
    try:
        ref = _run(model, args)
    finally:
        for h in handles:
            h.remove()
    n_calls: dict = {}
    for path, _, _ in calls:
        n_calls[path] = n_calls.get(path, 0) + 1
    producer = {id(out): (path, out) for path, _, out in calls if type(modules[path]) in _LAYERS}
    plans = []
    seen = set()
    for path, inp, _ in calls:
        bn = modules[path]
        if not _is_bn_like(bn) or path in seen:
            continue
        seen.add(path)
        src = producer.get(id(inp)) if isinstance(inp, torch.Tensor) else None
        lpath = src[0] if src is not None and src[1] is inp else None
        layer = modules.get(lpath) if lpath else None
        ltype = type(layer).__name__ if layer is not None else None
        try:
            if layer is None:
                raise _Skip("its input is not the output of a Conv/ConvTranspose/Linear on the example")
            if n_calls[path] != 1 or n_calls[lpath] != 1:
                raise _Skip("the layer or the BN is called more than once (folding in place would change "
                            "the other calls)")
            info = _check_pair(layer, bn, inp.ndim)
        except _Skip as e:
            report.skipped.append(FoldEntry(path, lpath, ltype, str(e)))
            continue
        plans.append((path, lpath, ltype, info))
    for path, m in modules.items():
        if _is_bn_like(m) and path not in seen and not any(path.startswith(p + ".") for p in seen):
            report.skipped.append(FoldEntry(path, None, None, "not called by the forward on the example"))

    def apply(plan) -> list:
        path, lpath, _, info = plan
        bn, layer = model.get_submodule(path), model.get_submodule(lpath)
        _set_submodule(model, lpath, _folded(layer, bn, info.kind))
        _set_submodule(model, path, nn.Identity() if info.tail is None else _TailModule(bn, info.tail))
        return [(lpath, layer), (path, bn)]

    def undo(saved: list) -> None:
        for p, m in saved:
            _set_submodule(model, p, m)

    def check() -> str | None:
        return _same_output(ref, _run(model, args))

    saved = [s for plan in plans for s in apply(plan)]
    why = check() if plans else None
    kept = plans
    if why is not None:  # find the pairs that change the output, one at a time
        undo(list(reversed(saved)))
        kept = []
        for plan in plans:
            s = apply(plan)
            bad = check()
            if bad is None:
                kept.append(plan)
            else:
                undo(list(reversed(s)))
                report.skipped.append(FoldEntry(plan[0], plan[1], plan[2],
                                                f"folding it in place changes the output on the example "
                                                f"inputs ({bad}): the layer's output or the BN is used "
                                                "elsewhere"))
    for path, lpath, ltype, _ in kept:
        report.folded.append(FoldEntry(path, lpath, ltype, "folded in place; verified on the example inputs"))
    return len(kept)


# ------------------------------------------------------------------------------------------- public API

def _as_args(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple of the forward's positional arguments or "
                    f"None, got {type(example_inputs).__name__}")


def fold_model(module: nn.Module, example_inputs: Any = None, *,
               return_report: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Return an eval-mode copy of ``module`` whose forward has batch norms folded into preceding layers.

    Folds batch norm that directly follows ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d`` (any groups,
    stride, dilation) or ``Linear`` (exact torch classes) in eval mode: torch's ``BatchNorm1d/2d/3d`` and
    ``SyncBatchNorm`` with running statistics, fastbn's drop-ins, BN subclasses whose forward is batch
    norm followed by something (timm's ``BatchNormAct2d``: the BN is folded, its drop path and
    activation are kept), and frozen BN (torchvision's ``FrozenBatchNorm2d``). The output of ``forward``
    does not change (to rounding): pairs are folded only where the model's own forward, traced with
    ``torch.fx``, shows the layer's output goes to the BN alone; if the forward does not trace, pairs
    found by running ``example_inputs`` are folded in place and kept only if the output on them is
    unchanged; otherwise nothing is folded. See :class:`FoldReport` for what was done and why.

    The result keeps ``module``'s class, attributes, methods and submodules (the original layers and
    BNs stay, for code that reaches inside the model); when traced, only ``forward`` is replaced (it
    calls folded copies kept in ``result._fastbn_folded``, which adds those parameters to
    ``state_dict``) and runs in eval mode only. ``module`` itself is not modified.

    Parameters
    ----------
    module : torch.nn.Module, any floating dtype and device (folding is computed in float64 on the CPU
        and cast back).
    example_inputs : optional tensor or tuple of the forward's positional arguments. With it, the traced
        graph knows every tensor's shape (needed for ``Linear`` + ``BatchNorm1d``, which folds only when
        the BN's input is (N, C)), the folded model is checked against the original on it, and models
        that do not trace can still be folded (verified on it).
    return_report : also return the :class:`FoldReport`.

    Returns
    -------
    The folded module (``(module, report)`` with ``return_report=True``).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from fastbn.torch import fold_model
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded, report = fold_model(net, return_report=True)
    >>> print(report)
    folded 1 of 1 batch norm(s) (traced)
      folded  1 -> Conv2d 0: folded in the traced forward
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(folded(x), net(x), atol=1e-5), type(folded).__name__
    (True, 'Sequential')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    args = _as_args(example_inputs)
    model = copy.deepcopy(module).eval()
    report = FoldReport()
    with torch.no_grad():
        if not any(_is_bn_like(m) for m in model.modules()):
            report.notes.append("no batch norm in the model")
        else:
            ref = None
            if args is not None:
                try:
                    ref = _run(model, args)
                except Exception as e:
                    raise ValueError(f"example_inputs: the model's forward fails on them ({type(e).__name__}: "
                                     f"{e})") from e
            try:
                graph = _trace(model)
            except Exception as e:  # noqa: BLE001 - data-dependent control flow, hooks, ...
                graph = None
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                report.notes.append(f"the forward does not trace with torch.fx ({why})")
            if graph is not None:
                report.method = "traced"
                if _fold_traced(model, graph, args, report) and ref is not None:
                    bad = _same_output(ref, _run(model, args))
                    if bad is not None:  # a forward fx could not capture faithfully: fold nothing
                        model = copy.deepcopy(module).eval()
                        report.notes.append(f"the folded forward differs on the example inputs ({bad}); "
                                            "nothing folded")
                        report.skipped[:0] = [FoldEntry(e.bn, e.layer, e.layer_type, "not verified")
                                              for e in report.folded]
                        report.folded.clear()
            elif args is not None:
                report.method = "verified"
                _fold_verified(model, args, report)
            else:
                for path, m in model.named_modules():
                    if _is_bn_like(m):
                        report.skipped.append(FoldEntry(path, None, None, "the forward does not trace: pass "
                                                        "example_inputs= to fold pairs verified on them"))
    return (model, report) if return_report else model
