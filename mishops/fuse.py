"""``mishops.fuse(model)``: every ``Conv2d -> [BatchNorm2d ->] Mish [-> Mish]`` of a model, as one block.

In the spirit of Hugging Face ``kernels``' ``kernelize`` and Liger's ``apply_liger_kernel_to_*``:
one call on an existing model. Each module's ``forward`` is traced with ``torch.fx`` (its
submodules left as calls), and in its graph every ``nn.Conv2d`` call followed by one or two Mish is
found. A Mish is an ``nn.Mish``, ``F.mish`` (``torch.nn.functional.mish``) or the written-out
``x * torch.tanh(F.softplus(x))`` (either operand order, ``torch.mul`` or the methods too); an
``nn.BatchNorm2d`` in eval mode between the conv and the Mish is folded into the conv
(``torch.nn.utils.fusion.fuse_conv_bn_eval``), and so is a ``BatchNorm2d`` subclass that applies
its own Mish (timm's ``BatchNormAct2d``: a BatchNorm with ``drop`` an identity and ``act`` a Mish).

Each match becomes a ``mishops.nn.ConvMish2d`` (``mish_count`` 1 or 2) at the conv's own path,
holding the conv's Parameters (or the folded ones), so ``state_dict`` keys of convs stay.
Where the rest of the match are modules called only there, they become ``nn.Identity`` and the
model keeps its classes; otherwise (functional or written-out Mish, a Mish module shared by
several calls) that module's forward is rewritten, and the module replaced by an
``fx.GraphModule`` of it (the report says which).

A module ``torch.fx`` cannot trace (data-dependent control flow, ...) is walked instead: its
children are fused one by one, and the report says so. Left alone, with the reason in the report:
a conv or BatchNorm output used elsewhere too, a BatchNorm in training mode (call ``model.eval()``
first) or without running statistics, a conv called at several places (shared weights), a
``Conv2d`` subclass with a forward of its own.

    model, report = mishops.fuse(model.eval(), report=True)
    print(report)
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mishops.nn import ConvMish2d, ConvMishMish2d, check_backend

log = logging.getLogger("mishops")

__all__ = ["FuseReport", "Fused", "LeftAlone", "fuse"]


@dataclass(frozen=True)
class Fused:
    """One block put in place: the conv's path and what it absorbed, in order (e.g. ``("bn", "Mish", "Mish")``)."""

    path: str
    absorbed: tuple[str, ...]
    mish_count: int

    def __str__(self) -> str:
        block = "ConvMish2d" if self.mish_count == 1 else "ConvMishMish2d"
        return f"{self.path or '<model>'}: conv -> {' -> '.join(self.absorbed)} => {block}"


@dataclass(frozen=True)
class LeftAlone:
    """A conv (or the module walked instead of traced) that was not fused, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<model>'}: {self.reason}"


@dataclass
class FuseReport:
    """What ``fuse`` did: ``fused`` blocks, convs ``left_alone`` (each with its reason), modules
    ``walked`` because ``torch.fx`` could not trace them (with the error), and modules whose
    forward was ``rewritten`` as an ``fx.GraphModule``."""

    fused: list[Fused] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    walked: list[LeftAlone] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"mishops.fuse: {len(self.fused)} block(s) fused, {len(self.left_alone)} left alone, "
                 f"{len(self.walked)} module(s) walked instead of traced"]
        lines += [f"  fused {f}" for f in self.fused]
        lines += [f"  left alone {f}" for f in self.left_alone]
        lines += [f"  walked {f}" for f in self.walked]
        lines += [f"  rewrote the forward of {p or '<model>'} as an fx.GraphModule" for p in self.rewritten]
        return "\n".join(lines)


# --- recognising the pieces ----------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Every submodule is a leaf: each module's own forward is matched, its children's separately."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _module(gm_root: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm_root.get_submodule(node.target)
    except AttributeError:
        return None


def _is_plain_conv(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, ConvMish2d) and _conv_problem(m) is None


def _conv_problem(m: nn.Conv2d) -> str | None:
    """Why this Conv2d cannot be replaced by a block with its Parameters (None when it can)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(m):
        return "its weight is parametrized (torch.nn.utils.parametrize): the block needs the Parameters themselves"
    if type(m).forward is not nn.Conv2d.forward:
        return f"{type(m).__name__} has a forward of its own (not a plain Conv2d)"
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None):
        return ("it has forward hooks (weight_norm, spectral_norm, quantization observers...), "
                "which the block would drop")
    if isinstance(m, nn.LazyConv2d) or isinstance(m.weight, nn.parameter.UninitializedParameter):
        return "its weight is not initialized yet (a lazy conv): run the model once first"
    return None


def _bn_kind(m: nn.Module | None) -> str | None:
    """"bn": a BatchNorm2d; "bn+mish": a BatchNorm2d subclass applying a Mish of its own (timm's
    ``BatchNormAct2d`` with ``act`` a Mish and ``drop`` an identity); else None."""
    if not isinstance(m, nn.BatchNorm2d):
        return None
    if type(m).forward is nn.BatchNorm2d.forward:
        return "bn"
    act, drop = getattr(m, "act", None), getattr(m, "drop", nn.Identity())
    if isinstance(drop, nn.Identity) and len(list(m.children())) <= 2:
        if isinstance(act, nn.Identity):  # timm's BatchNormAct2d with apply_act=False
            return "bn"
        if _is_mish_module(act):
            return "bn+mish"
    return "other"


def _single_input(node: fx.Node) -> fx.Node | None:
    """The tensor argument of a one-tensor call (extra arguments only as Mish's ``inplace``)."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if len(args) != 1 or kwargs or len(node.args) > 2 or (node.args and node.args[0] is not args[0]):
        return None
    return args[0]


def _is_softplus(node: fx.Node, x: fx.Node) -> bool:
    """``F.softplus(x)`` with its defaults (beta 1, threshold 20), as Mish uses it."""
    if node.op != "call_function" or node.target is not F.softplus or not node.args or node.args[0] is not x:
        return False
    beta = node.args[1] if len(node.args) > 1 else node.kwargs.get("beta", 1)
    threshold = node.args[2] if len(node.args) > 2 else node.kwargs.get("threshold", 20)
    return beta == 1 and threshold == 20


def _softplus_module(root: nn.Module, node: fx.Node, x: fx.Node) -> bool:
    m = _module(root, node)
    return isinstance(m, nn.Softplus) and m.beta == 1 and m.threshold == 20 and node.args == (x,)


def _written_out_mish(root: nn.Module, x: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``x * tanh(softplus(x))``: the mul node and the nodes it is made of, when ``x`` feeds only them."""
    users = list(x.users)
    if len(users) != 2:
        return None
    for sp in users:
        if not (_is_softplus(sp, x) or _softplus_module(root, sp, x)) or len(sp.users) != 1:
            continue
        (th,) = sp.users
        is_tanh = (th.op == "call_function" and th.target in (torch.tanh, F.tanh) and th.args == (sp,)) or \
                  (th.op == "call_method" and th.target == "tanh" and th.args == (sp,)) or \
                  (isinstance(_module(root, th), nn.Tanh) and th.args == (sp,))
        if not is_tanh or len(th.users) != 1:
            continue
        (mul,) = th.users
        is_mul = (mul.op == "call_function" and mul.target in (operator.mul, torch.mul)) or \
                 (mul.op == "call_method" and mul.target == "mul")
        if is_mul and not mul.kwargs and set(mul.args) == {x, th} and len(mul.args) == 2 and mul in users:
            return mul, [sp, th, mul]
    return None


def _mish_after(root: nn.Module, x: fx.Node) -> tuple[fx.Node, list[fx.Node], str] | None:
    """The Mish applied to ``x`` (its last node, every node it is made of, its name), if x's users are exactly it."""
    written = _written_out_mish(root, x)
    if written is not None:
        return written[0], written[1], "x*tanh(softplus(x))"
    if len(x.users) != 1:
        return None
    (user,) = x.users
    if user.op == "call_module" and _single_input(user) is x:
        m = _module(root, user)
        if isinstance(m, nn.Mish):
            return user, [user], "Mish"
        if _is_mish_module(m):
            return user, [user], type(m).__name__
    if user.op == "call_function" and user.target is F.mish and _single_input(user) is x:
        return user, [user], "F.mish"
    if user.op == "call_method" and user.target == "mish" and _single_input(user) is x:
        return user, [user], "mish"
    return None


_MISH_TYPES: dict[type, bool] = {}


def _is_mish_module(m: nn.Module | None) -> bool:
    """A module of the model's own that computes Mish: no parameters, buffers or children, and a
    forward that traces to ``F.mish(x)`` or the written-out form (the ``class Mish(nn.Module)`` of
    many CSPDarknet/YOLOv4 codebases)."""
    if m is None or isinstance(m, nn.Mish):
        return isinstance(m, nn.Mish)
    if next(m.children(), None) is not None or next(m.parameters(), None) is not None or \
            next(m.buffers(), None) is not None:
        return False
    kind = type(m)
    if kind not in _MISH_TYPES:
        try:
            graph = _Tracer().trace(m)
            inputs = [n for n in graph.nodes if n.op == "placeholder"]
            (output,) = [n for n in graph.nodes if n.op == "output"]
            found = _mish_after(m, inputs[0]) if len(inputs) == 1 else None
            body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
            _MISH_TYPES[kind] = bool(found) and output.args == (found[0],) and set(body) == set(found[1])
        except Exception:
            _MISH_TYPES[kind] = False
    return _MISH_TYPES[kind]


def _starts_a_mish(root: nn.Module, x: fx.Node) -> str | None:
    """The name of a Mish among x's users, when x also has other users (a conv output used elsewhere)."""
    for user in x.users:
        m = _module(root, user)
        if _is_mish_module(m) or (user.op == "call_function" and user.target is F.mish) or \
                _is_softplus(user, x) or _softplus_module(root, user, x):
            return "Mish"
        if _bn_kind(m) is not None:
            return "BatchNorm2d"
    return None


# --- fusing one module's graph -------------------------------------------------------------------


@dataclass
class _Match:
    conv: fx.Node
    bn: fx.Node | None
    nodes: list[fx.Node]      # every node after the conv that the block absorbs
    last: fx.Node
    absorbed: list[str]
    mish_count: int
    bn_applies_mish: bool


def _match(root: nn.Module, conv_node: fx.Node, calls: dict[str, int], path: str,
           report: FuseReport) -> _Match | None:
    where = _join(path, conv_node.target)
    if calls[conv_node.target] > 1:
        if _starts_a_mish(root, conv_node) or _mish_after(root, conv_node):
            report.left_alone.append(LeftAlone(where, f"the conv is called at {calls[conv_node.target]} places "
                                                      "(shared weights)"))
        return None
    x, nodes, absorbed, bn_node, bn_applies_mish = conv_node, [], [], None, False
    if len(x.users) == 1:
        (user,) = x.users
        bn = _module(root, user)
        kind = _bn_kind(bn)
        if kind is not None:
            if kind == "other":
                if _mish_after(root, user) or _is_mish_module(getattr(bn, "act", None)):
                    report.left_alone.append(LeftAlone(where, f"followed by {type(bn).__name__}, a BatchNorm2d "
                                                              "subclass with a forward of its own"))
                return None
            if calls[user.target] > 1 or _single_input(user) is not x:
                report.left_alone.append(LeftAlone(where, f"its BatchNorm2d {_join(path, user.target)} is called "
                                                          "at several places"))
                return None
            if bn.training:
                report.left_alone.append(LeftAlone(where, f"BatchNorm2d {_join(path, user.target)} is in training mode "
                                                          "(call model.eval() before fuse to fold it)"))
                return None
            if bn.running_mean is None or bn.running_var is None:
                report.left_alone.append(LeftAlone(where, f"BatchNorm2d {_join(path, user.target)} has no running "
                                                          "statistics (track_running_stats=False)"))
                return None
            bn_node, x = user, user
            nodes.append(user)
            absorbed.append("bn")
            if kind == "bn+mish":
                bn_applies_mish = True
                absorbed.append("Mish (in the BatchNorm)")
    count = 1 if bn_applies_mish else 0
    while count < 2:
        found = _mish_after(root, x)
        if found is None:
            break
        last, mish_nodes, name = found
        if any(n.op == "call_module" and calls[n.target] > 1 for n in mish_nodes):
            name += " (shared module)"
        nodes += mish_nodes
        absorbed.append(name)
        x = last
        count += 1
    if count == 0:
        other = _starts_a_mish(root, x)
        if other is not None and x.users:
            what = "conv" if x is conv_node else "BatchNorm2d"
            users = ", ".join(str(u) for u in x.users)
            report.left_alone.append(LeftAlone(where, f"the {what} output is used elsewhere too ({users}): "
                                                      "fusing would lose it"))
        return None
    return _Match(conv_node, bn_node, nodes, x, absorbed, count, bn_applies_mish)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _fuse_graph(module: nn.Module, graph: fx.Graph, path: str, backend: str, report: FuseReport) -> tuple[bool, bool]:
    """Fuse the matches of ``module``'s graph. Returns (changed, the graph itself must replace forward)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    changed = needs_graph = False
    erased: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node.op != "call_module" or node in erased:
            continue
        conv = _module(module, node)
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, ConvMish2d):
            continue
        problem = _conv_problem(conv)
        if problem is not None:
            followed_by_bn = len(node.users) == 1 and _bn_kind(_module(module, next(iter(node.users))))
            if _mish_after(module, node) or followed_by_bn:
                report.left_alone.append(LeftAlone(_join(path, node.target), problem))
            continue
        found = _match(module, node, calls, path, report)
        if found is None:
            continue
        if found.bn is not None:
            bn = _module(module, found.bn)
            was = conv.training
            conv.train(False)
            try:
                folded = fuse_conv_bn_eval(conv, bn)
            finally:
                conv.train(was)
            folded.train(was)
            source = folded
        else:
            source = conv
        block = (ConvMishMish2d if found.mish_count == 2 else ConvMish2d).from_conv(source, backend=backend)
        module.set_submodule(node.target, block)
        found.last.replace_all_uses_with(node)
        removable = all(n.op == "call_module" and calls[n.target] == 1 for n in found.nodes)
        for n in reversed(found.nodes):
            if removable:
                module.set_submodule(n.target, nn.Identity())
            graph.erase_node(n)
            erased.add(n)
        needs_graph = needs_graph or not removable
        changed = True
        report.fused.append(Fused(_join(path, node.target), tuple(found.absorbed), found.mish_count))
    return changed, needs_graph


def _fuse_module(module: nn.Module, path: str, backend: str, report: FuseReport, seen: set[int]) -> nn.Module:
    """``module`` with its matches fused (the same object, or a GraphModule of it), its children done too."""
    if id(module) in seen or isinstance(module, ConvMish2d) or not list(module.children()):
        return module
    seen.add(id(module))
    result = module
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        report.walked.append(LeftAlone(path, f"torch.fx could not trace {type(module).__name__}.forward "
                                             f"({type(exc).__name__}: {first}); its children were fused one by one"))
        graph = None
    if graph is not None:
        changed, needs_graph = _fuse_graph(module, graph, path, backend, report)
        if changed and needs_graph:
            graph.lint()
            result = fx.GraphModule(module, graph, class_name=type(module).__name__)
            result.train(module.training)
            report.rewritten.append(path)
    for name, child in list(result.named_children()):
        new = _fuse_module(child, _join(path, name), backend, report, seen)
        if new is not child:
            setattr(result, name, new)
    return result


def fuse(model: nn.Module, *, report: bool = False, backend: str = "auto"):
    """Put a mishops block in place of every ``Conv2d -> [BatchNorm2d ->] Mish [-> Mish]`` of ``model``.

    ``model`` is changed in place and returned (a ``torch.fx.GraphModule`` instead where its own
    forward had to be rewritten: a functional or written-out Mish in it); with ``report=True``,
    ``(model, FuseReport)``. Call ``model.eval()`` first to fold BatchNorms: one in training mode
    is left alone, since it normalises with each batch's statistics. ``backend`` is the fused
    blocks' (``"auto"``: the fastest correct plan per input).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mishops.fuse expects an nn.Module, not {type(model).__name__}")
    backend = check_backend(backend)
    found = FuseReport()
    if _is_plain_conv(model):
        found.left_alone.append(LeftAlone("", "the model is a bare Conv2d: no Mish follows it inside the model"))
        fused = model
    else:
        fused = _fuse_module(model, "", backend, found, set())
    log.info("%s", found)
    return (fused, found) if report else fused
