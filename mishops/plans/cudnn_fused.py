"""cuDNN runtime fusion: the conv, its bias and the Mish (once or twice) in ONE kernel.

cuDNN's graph API compiles ``conv_fprop`` followed by pointwise ops into a single kernel whose
epilogue applies them to the accumulator tile, so the conv output is written once and never read
back. The graph applies ``_mish`` ``ConvSpec.mish_count`` times. It finds engines only for an NHWC
output (graphs with an NCHW output get none), so this plan writes channels_last and is offered only
where PyTorch's conv would return channels_last as well (``cudnn_nchw`` covers the other case).
Timings are in the results files (``benchmarks/results/``) and the README.

The heuristics offer a dozen or more engine configs per graph at the reference shape and building
them all takes seconds; on the H100 one of them (eng7_k24=29) computed garbage and another (eng8)
was off by 4e-3 in a few elements. So the configs are candidates of the project's tuner like any
other choice (``mishops.tuning``): each is checked against the reference on inputs of the tuner's,
the correct ones are timed, and the winner's name goes to the tuning cache, so a new process builds
only that one. The heuristics rank their configs fastest-first, and each one checked costs a build at
the first call, so the tuner sees the first ``DEFAULT_CONFIGS`` of them (``MISHOPS_CUDNN_CONFIGS=N``
or ``all`` changes that; the whole list took minutes of first calls across a model's shapes). fp32 runs with TF32 like PyTorch's own conv; with TF32 off the
plan declines (its exact-fp32 engines are slower than the unfused block).

The same builder makes the graph of the conv alone (no bias, NHWC output) for the
``cudnn_epilogue`` plans, which apply the bias and the Mish while transposing to NCHW
(``conv_nhwc``); its configs are tuned the same way, checked against ``F.conv2d``, under
``cudnn_conv|...`` keys.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from mishops.tuning import TUNER, CannotTake, Problem, TuningSettingError
from mishops.plans import (ConvSpec, NoPlanError, Plan, availability, conv2d, get_plan, mismatch, operand_reasons,
                           reference, register_plan, synthetic_inputs)
from mishops.registry import Availability

log = logging.getLogger("mishops")

INSTALL_HINT = "pip install mishops[cudnn] (nvidia-cudnn-frontend<1.29)"
MIN_CUDNN = 90000
#: indices must fit cuDNN's 32-bit tensor descriptors.
MAX_ELEMENTS = 2**31 - 1

#: what tests read: ``builds`` counts engine configs compiled, ``tunes`` full searches.
stats = {"tunes": 0, "builds": 0, "rebuilds": 0}


def _cudnn():
    """The frontend, bound to the cuDNN library PyTorch has loaded (so torch loads it first)."""
    torch.backends.cudnn.version()
    import cudnn

    return cudnn


def _versions() -> str:
    cudnn = _cudnn()
    return f"fe{cudnn.__version__}-be{cudnn.backend_version()}"


def _output_shape(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    return n, k, (h + 2 * ph - dh * (r - 1) - 1) // sh + 1, (w + 2 * pw - dw * (s - 1) - 1) // sw + 1


def _mish(g, v, clamp, two, tag: str):
    """``v * tanh(softplus(v))`` as ``v * n / (n + 2)``, ``n = e (e + 2)``, ``e = exp(min(v, 20))``:
    one exp and one division; no overflow (at v >= 20 the ratio is exactly 1 in fp32); NaN stays
    NaN through ``v``, and -inf gives NaN like ``F.mish``."""
    e = g.exp(g.min(v, clamp, name=f"{tag}_clamp"), name=f"{tag}_exp")
    n = g.mul(e, g.add(e, two, name=f"{tag}_e_plus_2"), name=f"{tag}_n")
    t = g.div(n, g.add(n, two, name=f"{tag}_n_plus_2"), name=f"{tag}_tanh_softplus")
    return g.mul(v, t, name=f"{tag}_out")


def _build_graph(cudnn, handle, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, spec: ConvSpec,
                 epilogue: bool = True):
    """The block as a cuDNN graph, every tensor declared with the strides it really has;
    intermediates and arithmetic in fp32; without ``epilogue`` the conv alone, no bias (a graph
    that also has engines only for an NHWC output). Returns the graph and its named I/O tensors."""
    io = {torch.float32: cudnn.data_type.FLOAT, torch.bfloat16: cudnn.data_type.BFLOAT16,
          torch.float16: cudnn.data_type.HALF}[x.dtype]
    f32 = cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    ports = {
        "x": g.tensor(name="x", dim=list(x.shape), stride=list(x.stride()), data_type=io),
        "w": g.tensor(name="w", dim=list(weight.shape), stride=list(weight.stride()), data_type=io),
    }
    y = g.conv_fprop(image=ports["x"], weight=ports["w"], padding=list(spec.padding), stride=list(spec.stride),
                     dilation=list(spec.dilation), compute_data_type=f32, name="conv")
    if epilogue:
        ports["clamp"] = g.tensor(name="clamp_at", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        ports["two"] = g.tensor(name="two", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        if has_bias:
            k = weight.shape[0]
            ports["b"] = g.tensor(name="b", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=io)
            y = g.bias(input=y, bias=ports["b"], name="bias")
        for i in range(spec.mish_count):
            y = _mish(g, y, ports["clamp"], ports["two"], f"mish{i + 1}")
    n, k, p, q = _output_shape(x, weight, spec)
    y.set_output(True).set_data_type(io).set_dim([n, k, p, q]).set_stride([k * p * q, 1, k * q, k])
    ports["y"] = y
    g.validate()
    g.build_operation_graph()
    return g, ports


@dataclass
class _Engine:
    """A built graph and the engine config (its index in the graph's plan list) that runs it."""

    graph: Any
    ports: dict
    index: int
    workspace: int
    config: str


class NoCorrectConfig(NoPlanError, CannotTake):
    """cuDNN offers no engine config that computes this key correctly: the plan cannot take it (the
    tuner skips it for the key; a plan named by MISHOPS_PLAN fails with this)."""


@register_plan
class CudnnFusedPlan(Plan):
    name = "cudnn_fused"
    priority = 10
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    output_formats = frozenset({torch.channels_last})

    def __init__(self):
        self._lock = threading.RLock()
        self._engines: dict[tuple, _Engine] = {}
        self._handles: dict[int, Any] = {}
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def is_available(self) -> Availability:
        if importlib.util.find_spec("cudnn") is None:
            return Availability.no(f"nvidia-cudnn-frontend is not installed: {INSTALL_HINT}")
        if not torch.cuda.is_available():
            return Availability.no("no CUDA GPU visible to PyTorch")
        if torch.version.hip or not torch.backends.cudnn.is_available():
            return Availability.no("this PyTorch build has no cuDNN")
        try:
            cudnn = _cudnn()
        except Exception as exc:
            return Availability.no(f"nvidia-cudnn-frontend failed to load ({type(exc).__name__}: {exc}); "
                                   f"{INSTALL_HINT}")
        if cudnn.backend_version() < MIN_CUDNN:
            return Availability.no(f"cuDNN {cudnn.backend_version()} is too old (runtime fusion needs {MIN_CUDNN}+)")
        return Availability.yes()

    def not_supported_reasons(self, x, weight, bias, spec: ConvSpec) -> list[str]:
        return super().not_supported_reasons(x, weight, bias, spec) + self.fusion_reasons(x, weight, bias, spec)

    def fusion_reasons(self, x, weight, bias, spec: ConvSpec) -> list[str]:
        """Why cuDNN cannot fuse this block, whatever output layout is wanted."""
        reasons = operand_reasons(x, weight, bias, spec)
        if x.dim() != 4:
            return reasons
        if spec.padding_mode != "zeros" or isinstance(spec.padding, str):
            reasons.append(f"padding {spec.padding!r} with mode {spec.padding_mode!r} (needs numbers, zeros mode)")
        for what, t in (("input", x), ("weight", weight)):
            if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
                reasons.append(f"{what} is neither contiguous nor channels_last")
        if bias is not None and not bias.is_contiguous():
            reasons.append("bias is not contiguous")
        if not isinstance(spec.padding, str):
            n, k, p, q = _output_shape(x, weight, spec)
            if min(n, p, q) <= 0 or x.numel() == 0:
                reasons.append("empty input or output")
            if max(x.numel(), n * k * p * q) > MAX_ELEMENTS:
                reasons.append("a tensor has 2^31 elements or more")
        if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
            reasons.append("fp32 with TF32 off (torch.backends.cudnn.allow_tf32 = False): cuDNN's exact-fp32 "
                           "engines are slower than the unfused block")
        if not torch.backends.cudnn.enabled:
            reasons.append("cuDNN is disabled (torch.backends.cudnn.enabled = False)")
        if torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled():
            reasons.append("deterministic algorithms requested; fused engines are not vetted for it")
        return reasons

    def source_hash(self) -> str:
        return f"{super().source_hash()}-{_versions()}"

    def forward(self, x, weight, bias, spec: ConvSpec) -> torch.Tensor:
        return self._run(x, weight, bias, spec, epilogue=True)

    def conv_nhwc(self, x, weight, spec: ConvSpec) -> torch.Tensor:
        """The conv alone, without bias, written channels_last by cuDNN's graph of just the conv:
        for plans that apply the epilogue themselves. Its engine configs are searched, checked
        against ``F.conv2d`` and cached like the fused graph's, under their own key (one for any
        ``mish_count``: the graph has no Mish)."""
        return self._run(x, weight, None, dataclasses.replace(spec, mish_count=2), epilogue=False)

    def _run(self, x, weight, bias, spec: ConvSpec, epilogue: bool) -> torch.Tensor:
        with torch.cuda.device(x.device):
            engine = self._engine_for(x, weight, bias, spec, epilogue)
            out = torch.empty(_output_shape(x, weight, spec), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last)
            self._execute(engine, x, weight, bias, out)
            return out

    # --- running one config ----------------------------------------------------------------

    def _handle(self, device: torch.device):
        """One cuDNN handle per device, made with that device current."""
        handle = self._handles.get(device.index)
        if handle is None:
            handle = self._handles[device.index] = _cudnn().create_handle()
        return handle

    def _constants_for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._constants.get(device.index)
        if found is None:
            found = self._constants[device.index] = (
                torch.full((1, 1, 1, 1), 20.0, dtype=torch.float32, device=device),
                torch.full((1, 1, 1, 1), 2.0, dtype=torch.float32, device=device))
        return found

    def _execute(self, engine: _Engine, x, weight, bias, out) -> None:
        """Run ``engine`` on PyTorch's current stream, with a workspace from PyTorch's allocator."""
        cudnn = _cudnn()
        ports = engine.ports
        pack = {ports["x"]: x, ports["w"]: weight, ports["y"]: out}
        if "clamp" in ports:
            pack[ports["clamp"]], pack[ports["two"]] = self._constants_for(x.device)
        if "b" in ports:
            pack[ports["b"]] = bias.view(1, -1, 1, 1)
        workspace = torch.empty(engine.workspace, dtype=torch.uint8, device=x.device) if engine.workspace else None
        with self._lock:  # the handle carries one stream at a time
            handle = self._handle(x.device)
            cudnn.set_stream(handle, torch.cuda.current_stream(x.device).cuda_stream)
            engine.graph.execute_plan_at_index(pack, workspace, engine.index, handle=handle)

    # --- finding the config ----------------------------------------------------------------

    def _engine_for(self, x, weight, bias, spec: ConvSpec, epilogue: bool) -> _Engine:
        mkey = (x.device.index, x.dtype, x.shape, x.stride(), weight.shape, weight.stride(), bias is not None, spec,
                epilogue)
        engine = self._engines.get(mkey)
        if engine is not None:
            return engine
        with self._lock:
            engine = self._engines.get(mkey)
            if engine is None:
                engine = self._engines[mkey] = self._find(x, weight, bias, spec, epilogue)
            return engine

    def _disk_key(self, x, weight, bias, spec: ConvSpec, epilogue: bool = True) -> str:
        def t(v):
            return f"{tuple(v.shape)}{tuple(v.stride())}"

        graph = "cudnn_fused" if epilogue else "cudnn_conv"
        if epilogue and spec.mish_count != 2:  # the double-Mish graph keeps the keys it always had
            graph += f"|mish_count={spec.mish_count}"
        return (f"{graph}|{str(x.dtype).removeprefix('torch.')}|x{t(x)}|w{t(weight)}|bias={bias is not None}"
                f"|stride={spec.stride} padding={spec.padding} dilation={spec.dilation}|{self.source_hash()}")

    def _find(self, x, weight, bias, spec: ConvSpec, epilogue: bool) -> _Engine:
        """The tuner's choice among the graph's engine configs, built alone in a fresh graph: the
        configs the heuristics offer are candidates of a key of their own, checked against the
        reference on inputs of the tuner's and timed (only the winner is built in a process that
        finds the choice in the tuning cache)."""
        cudnn = _cudnn()
        handle = self._handle(x.device)
        what = "block" if epilogue else "conv"
        key = self._disk_key(x, weight, bias, spec, epilogue)
        offered = self._configs_offered(cudnn, handle, x, weight, bias, spec, epilogue)
        if not offered:
            raise NoCorrectConfig(f"cuDNN's heuristics offered no engine config for this {what}")
        candidates = [EngineConfig(name, rank, index, self) for rank, (name, index) in enumerate(offered.items())]
        choice = TUNER.choose(("cudnn config", key, x.device.index), lambda: Problem(
            f"cuDNN {what} config", key, x.device, candidates,
            lambda: _EngineTrial(self, cudnn, handle, x, weight, bias, spec, epilogue)))
        winner = choice.measurements.get(choice.winner)
        if winner is None or not winner.ok:
            reasons = "; ".join(f"{n}: {m.reason}" for n, m in choice.measurements.items())
            raise NoCorrectConfig(f"no engine config computed the {what} correctly ({reasons})")
        return self._build_alone(cudnn, handle, x, weight, bias, spec, epilogue, choice.winner)

    @staticmethod
    def _configs_offered(cudnn, handle, x, weight, bias, spec, epilogue: bool) -> dict[str, int]:
        """The heuristics' engine configs for this graph by name, in their order, each once with its
        index in the graph's list (at most :func:`config_cap` of them); listing builds none."""
        graph, _ = _build_graph(cudnn, handle, x, weight, bias is not None, spec, epilogue)
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        count = graph.get_execution_plan_count()
        cap = config_cap()
        count = count if cap is None else min(count, cap)
        offered: dict[str, int] = {}
        for i in range(count):
            offered.setdefault(graph.get_plan_name_at_index(i), i)
        return offered

    def _build_alone(self, cudnn, handle, x, weight, bias, spec, epilogue: bool, name: str) -> _Engine:
        """Config ``name`` built in a graph of its own: the trial's graph held every config it built."""
        graph, ports = _build_graph(cudnn, handle, x, weight, bias is not None, spec, epilogue)
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        names = [graph.get_plan_name_at_index(i) for i in range(graph.get_execution_plan_count())]
        index = names.index(name)
        graph.build_plan_at_index(index)
        stats["builds"] += 1
        stats["rebuilds"] += 1
        return _Engine(graph, ports, index, graph.get_workspace_size_plan_at_index(index), name)


#: how many of the heuristics' engine configs per graph the tuner checks and times by default.
DEFAULT_CONFIGS = 8


def config_cap() -> int | None:
    """``MISHOPS_CUDNN_CONFIGS``: how many configs per graph are candidates (``None``: all of them)."""
    raw = os.environ.get("MISHOPS_CUDNN_CONFIGS", "").strip().lower()
    if not raw:
        return DEFAULT_CONFIGS
    if raw == "all":
        return None
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    raise TuningSettingError(f"mishops: MISHOPS_CUDNN_CONFIGS={raw!r}: must be a positive whole number or 'all'")


@dataclass(frozen=True)
class EngineConfig:
    """One of a graph's engine configs, as the tuner sees a candidate: first offered, first preferred."""

    name: str
    priority: int
    index: int  # in the graph's list of the heuristics' configs
    plan: CudnnFusedPlan

    def source_hash(self) -> str:
        return self.plan.source_hash()


class _EngineTrial:
    """A search graph over synthetic inputs of the key's shapes; the reference in the graph's own
    layout (NHWC: the nchw plans transpose after), the block's for the fused graph, the conv's
    alone for the conv graph. Each config is built the first time it runs."""

    def __init__(self, plan: CudnnFusedPlan, cudnn, handle, x, weight, bias, spec, epilogue: bool):
        stats["tunes"] += 1
        self.plan = plan
        self.x, self.weight, self.bias = synthetic_inputs(x, weight, bias if epilogue else None)
        self.graph, self.ports = _build_graph(cudnn, handle, self.x, self.weight, self.bias is not None, spec, epilogue)
        self.graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        with torch.no_grad():
            expected = reference(self.x, self.weight, self.bias, spec) if epilogue else conv2d(self.x, self.weight, None, spec)
        self.expected = expected.contiguous(memory_format=torch.channels_last)
        self.out = torch.empty_like(self.expected)
        self.engines: dict[int, _Engine] = {}

    def run(self, config: EngineConfig) -> torch.Tensor:
        engine = self.engines.get(config.index)
        if engine is None:
            listed = self.graph.get_plan_name_at_index(config.index)
            if listed != config.name:
                raise CannotTake(f"the heuristics now list {listed} where {config.name} was")
            self.graph.build_plan_at_index(config.index)
            stats["builds"] += 1
            engine = self.engines[config.index] = _Engine(
                self.graph, self.ports, config.index, self.graph.get_workspace_size_plan_at_index(config.index),
                config.name)
        self.out.fill_(float("nan"))
        self.plan._execute(engine, self.x, self.weight, self.bias, self.out)
        return self.out

    def wrong(self, outcome: torch.Tensor) -> str:
        return mismatch(outcome, self.expected)


class OnCudnnGraphs(Plan):
    """A plan that runs one of ``cudnn_fused``'s graphs and then a pass of its own: it needs what
    that plan needs, takes what cuDNN can take, and its results change with that plan's code and
    cuDNN's version."""

    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    output_formats = frozenset({torch.contiguous_format})

    def is_available(self) -> Availability:
        fused = availability("cudnn_fused")
        return Availability.yes() if fused else Availability.no(f"needs the cudnn_fused plan: {fused.reason}")

    def not_supported_reasons(self, x, weight, bias, spec: ConvSpec) -> list[str]:
        reasons = super().not_supported_reasons(x, weight, bias, spec)
        return reasons + get_plan("cudnn_fused").fusion_reasons(x, weight, bias, spec)

    def source_hash(self) -> str:
        return f"{super().source_hash()}-{get_plan('cudnn_fused').source_hash()}"
