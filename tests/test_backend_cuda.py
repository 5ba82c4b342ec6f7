"""The inline CUDA C++ backend: its build machinery (CPU, run everywhere) and its kernels (GPU).

CPU tests compile ``csrc/mish2.cu`` with the real nvcc and read ptxas' report, drive a real
``cpp_extension.load`` build through a fake failing nvcc, kill a builder that holds the build lock,
and check what the build directory's name depends on. GPU tests compare every element with float64
``F.mish(F.mish(x))`` / float64 autograd, NaN and infinity positions exactly, outputs poisoned
beforehand so an element the kernel skips cannot pass.

Tolerances. fp32 forward: |out - ref| <= 1e-6 max(1, |ref|). Each Mish costs the accurate expf
(2 ulp), one rcp.approx (1 ulp), and a few roundings (0.5 ulp each); t = n / (n + 2) is formed as
1 - 2r where it is near 1, so the error does not pile up there: about 5 ulp (6e-7) relative over
the double Mish, and below |ref| = 1 an absolute 1e-6 is far under any formula mistake (>= 1e-3).
fp32 backward: |out - ref| <= 2e-6 max(|grad_out|, |ref|): the derivative is O(1) times grad_out
and chains two slopes and a product, about twice the forward's roundings. fp16/bf16: correctly
rounded from an fp32 value within 2e-6 of exact (half an ulp + 2e-6 |ref|), or within 2x eager's
max error in the same dtype on the same input (eager rounds the intermediate Mish too, so it is the
looser one); plus 1e-35 absolute, because their fast exp flushes e^v to zero below v = -87.3,
where |mish(v)| < 1.1e-36 yet bf16 could still hold it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mishops
from mishops import cache, registry
from mishops.backends import cuda
from mishops.backends.cuda import CudaBackend, CudaBuildError
from mishops.layout import flat
from mishops.registry import KERNEL_DTYPES
from tests.reference import SPECIAL_VALUES, mish2_f64, mish2_grad_f64, special_input

REPO = Path(__file__).resolve().parent.parent
KERNEL = REPO / "csrc" / "mish2.cu"
EPILOGUE_KERNEL = REPO / "csrc" / "epilogue_nchw.cu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_FORWARD_REL, FP32_BACKWARD_REL = 1e-6, 2e-6
FTZ_FLOOR = 1e-35


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    candidates += [Path(p) for p in (shutil.which("nvcc"),) if p] + [Path("/usr/local/cuda/bin/nvcc")]
    return next((str(p) for p in candidates if p.is_file()), None)


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
HAS_NINJA = shutil.which("ninja") is not None or (Path(sys.executable).parent / "ninja").is_file()
needs_ninja = pytest.mark.skipif(not HAS_NINJA, reason="ninja not found (pip install ninja)")


def test_registered_with_declared_capabilities():
    backend = registry.get("cuda")
    assert isinstance(backend, CudaBackend)
    assert backend.devices == frozenset({"cuda"}) and backend.dtypes == KERNEL_DTYPES and backend.priority == 10
    assert {Path(p).name for p in backend.source_files} == {"mish2.cu", "grad_bias.cu", "epilogue_nchw.cu",
                                                            "mish2_binding.cpp", "mish.cuh", "mish_math.cuh"}
    assert all(Path(p).is_file() for p in backend.source_files)


# --- availability --------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_without_a_gpu_says_why():
    reason = registry.availability("cuda").reason
    assert not registry.availability("cuda")
    if torch.version.cuda is None:
        assert "built without CUDA" in reason and torch.__version__ in reason
    else:
        assert reason == "no CUDA GPU visible to torch"


def test_import_and_availability_never_raise_without_a_toolchain(tmp_path):
    """A bare interpreter with no CUDA_HOME and an empty PATH: import works, nothing builds."""
    code = textwrap.dedent("""
        import json
        import mishops
        from mishops import dispatch, registry
        from mishops.backends import cuda
        available = registry.availability("cuda")
        print(json.dumps([available.ok, available.reason, cuda.stats.get("builds", 0)]))
    """)
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(REPO), "CUDA_HOME": str(tmp_path / "no-cuda"),
           "MISHOPS_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ok, reason, builds = json.loads(done.stdout)
    assert not ok and reason and builds == 0
    assert not (tmp_path / "cache" / "build").exists()


def test_missing_nvcc_names_cuda_home(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    for home in (None, str(tmp_path)):  # unset, and set to a directory without bin/nvcc
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", home)
        problem = cuda.toolchain_problem()
        assert problem.startswith("nvcc not found") and "CUDA_HOME" in problem


def test_missing_ninja_says_how_to_install_it(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert cuda.toolchain_problem() == "ninja not found: pip install ninja (torch.utils.cpp_extension builds with it)"


# --- the kernel source, compiled for real ---------------------------------------------------------


def _compile_for_sm90(source: Path, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """``source`` compiled as the build compiles it (torch's headers and nvcc defines), for sm_90:
    ptxas' report (every kernel's entry asserted spill-free) and the PTX of each kernel by name."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    torch_include = Path(cpp_extension.include_paths()[0])
    # A CPU-only torch wheel ships c10's CUDA headers without their generated config header.
    missing_config = not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists()
    command = [NVCC, "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", "-keep", "--keep-dir", str(tmp_path),
               "-c", str(source), "-o", str(tmp_path / "k.o"), *includes, *cpp_extension.COMMON_NVCC_FLAGS,
               *cuda.EXTRA_CUDA_CFLAGS, "--compiler-options", "-fPIC",
               *(["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"] if missing_config else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    print(f"nvcc took {time.perf_counter() - started:.1f} s")

    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", output)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", output)
    assert len(spills) == len(entries)
    report = [line for line in output.splitlines() if re.search(r"entry function|spill", line)]
    assert all(stores == "0" and loads == "0" for stores, loads in spills), "\n".join(report)
    ours = [line for line in output.splitlines()
            if re.search(r"(mish2|mish|epilogue_nchw)\.cuh?\b", line) and re.search(r"warning|error", line)]
    assert not ours, "\n".join(ours)
    ptx = (tmp_path / source.with_suffix(".ptx").name).read_text()
    kernels = dict(re.findall(r"\.entry (\w+)\((.*?)\n}", ptx, re.S))
    assert len(kernels) == len(entries)
    return output, kernels


@needs_nvcc
def test_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The real file with torch's headers and torch's nvcc defines: every kernel instantiated
    (3 dtypes x 2 access widths x forward/backward), none spilling, the wide ones moving 16 bytes
    per access, no IEEE division anywhere. Takes 10-20 s on 2 cores."""
    _, kernels = _compile_for_sm90(KERNEL, tmp_path)
    assert len(kernels) == 12
    wide = {name: body for name, body in kernels.items() if re.search(r"fLi4E|Li8E", name)}
    assert len(wide) == 6
    for name, body in wide.items():
        assert "ld.global.nc.v4" in body and "st.global.v4" in body, name
    for name, body in kernels.items():
        assert not re.search(r"\bdiv\.(rn|full)", body), name
        assert "rcp.approx.ftz.f32" in body and "ex2.approx.ftz.f32" in body, name
        # special-function instructions (csrc/mish_math.cuh): per element one exp (fp32: the
        # inner Mish's; the outer's runs on the FMA pipe) or two (16-bit), and a quarter of a
        # reciprocal per Mish in 16-byte packs. A loop step is 4 packs and the one-element tail.
        width = 4 if "fLi4E" in name else 8 if "Li8E" in name else 1
        packs = 4
        elements = packs * width + 1
        assert body.count("ex2.approx.ftz.f32") == (1 if "IfLi" in name else 2) * elements, name
        assert body.count("rcp.approx.ftz.f32") == 2 * (packs * width // 4 if width > 1 else packs) + 2, name


@needs_nvcc
def test_grad_bias_kernel_compiles_for_sm90_without_spills(tmp_path):
    """``csrc/grad_bias.cu``: 2 walks x 2 access widths x 3 dtypes x 1 or 2 Mish, none spilling,
    the wide ones moving 16 bytes per access, sharing reciprocals as mish2.cu does (planes take 4
    packs a thread; rows 4 in fp32, 2 in fp16, 1 in bf16)."""
    _, kernels = _compile_for_sm90(REPO / "csrc" / "grad_bias.cu", tmp_path)
    assert len(kernels) == 24, list(kernels)
    for name, body in kernels.items():
        assert not re.search(r"\bdiv\.(rn|full)", body), name
        if re.search(r"fLi4E|Li8E", name):
            assert "ld.global.nc.v4" in body and "st.global.v4" in body, name
            width = 4 if "fLi4E" in name else 8
            packs = 4 if "IfLi" in name or "planes" in name else 2 if "halfLi" in name else 1
            mish = 2 if re.search(r"Li[48]ELi2E", name) else 1
            assert body.count("rcp.approx.ftz.f32") == mish * packs * width // 4, name


@needs_nvcc
def test_epilogue_kernel_compiles_for_sm90_without_spills(tmp_path):
    """``csrc/epilogue_nchw.cu``: 3 dtypes x 2 read widths x with/without bias x one or two Mish, none
    spilling, the wide ones reading 16 bytes per access, the same Mish (no IEEE division) as mish2.cu."""
    _, kernels = _compile_for_sm90(EPILOGUE_KERNEL, tmp_path)
    assert len(kernels) == 24, list(kernels)
    assert sum("Li1EEEvPKT_" in name for name in kernels) == 12  # the single-Mish instances
    wide = {name: body for name, body in kernels.items() if re.search(r"fLi4E|Li8E", name)}
    assert len(wide) == 12
    for name, body in wide.items():
        assert "ld.global.nc.v4" in body, name
    for name, body in kernels.items():
        assert not re.search(r"\bdiv\.(rn|full)", body), name
        assert "rcp.approx.ftz.f32" in body, name


@needs_nvcc
def test_first_error_line_of_real_nvcc_output(tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* p) {\n  p[0] = undefined_name;\n}\n")
    done = subprocess.run([NVCC, "-arch=sm_90", "-c", str(broken), "-o", str(tmp_path / "b.o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    line = cuda.first_error_line(done.stdout + done.stderr)
    assert line.startswith(f"{broken}(2): error") and "undefined_name" in line


@needs_nvcc
def test_first_error_line_for_an_architecture_the_toolkit_does_not_know(tmp_path):
    """A GPU newer than the installed nvcc: the reason must be nvcc's own words, not a generic failure."""
    ok = tmp_path / "ok.cu"
    ok.write_text("__global__ void k(float* p) { p[0] = 1.f; }\n")
    done = subprocess.run([NVCC, "-gencode=arch=compute_999,code=sm_999", "-c", str(ok), "-o", str(tmp_path / "o.o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    line = cuda.first_error_line(done.stdout + done.stderr)
    assert line is not None and "nvcc fatal" in line and "999" in line, done.stderr


def test_first_error_line_skips_what_ninja_adds():
    log = textwrap.dedent("""\
        Error building extension 'm': [1/3] c++ -c b.cpp -o b.o
        [2/3] nvcc -c k.cu -o k.o -Xcudafe --diag_error=20
        FAILED: k.cuda.o
        nvcc -c k.cu -o k.o -Xcudafe --diag_error=20
        k.cu(7): error: expected a ";"
        k.cu(9): error: later
        ninja: build stopped: subcommand failed.
    """)
    assert cuda.first_error_line(log) == 'k.cu(7): error: expected a ";"'
    assert cuda.first_error_line("nvcc fatal   : Unsupported gpu architecture 'compute_1'").startswith("nvcc fatal")
    assert cuda.first_error_line("[1/2] c++ -c x.cpp\nall good\n") is None
    linker = ("/usr/bin/ld: cannot find -lc10_cuda: No such file or directory\n"
              "collect2: error: ld returned 1 exit status\n")
    assert cuda.first_error_line(linker).startswith("/usr/bin/ld: cannot find -lc10_cuda")


# --- building ------------------------------------------------------------------------------------


def use_fake_cuda_home(monkeypatch, tmp_path: Path) -> None:
    """Builds against a fake toolkit (below), in a build directory of this test's own: what the fake
    builds leave behind must not sit beside the real builds the other tests share."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(fake_cuda_home(tmp_path / "cuda")))
    monkeypatch.setenv("MISHOPS_BUILD_DIR", str(tmp_path / "build"))


def fake_cuda_home(root: Path) -> Path:
    """A CUDA "toolkit" whose nvcc knows its version and fails every compile."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent("""\
        #!/bin/sh
        case "$*" in *--version*) echo "Cuda compilation tools, release 99.9, V99.9.1"; exit 0;; esac
        echo "fake.cu(1): error: bad flag"
        echo "fake.cu(2): error: a later error"
        exit 1
    """))
    nvcc.chmod(0o755)
    return root


@needs_ninja
def test_failed_build_raises_the_compilers_first_error(monkeypatch, tmp_path):
    """A real cpp_extension.load and ninja run, with only nvcc replaced; no GPU needed."""

    use_fake_cuda_home(monkeypatch, tmp_path)
    monkeypatch.setenv("MAX_JOBS", "1")  # ninja stops at the first failure instead of finishing the C++ side
    with pytest.raises(CudaBuildError) as caught:
        cuda.build_extension("90")
    message = str(caught.value)
    assert message.splitlines()[0] == "fake.cu(1): error: bad flag"
    assert "fake.cu(2): error: a later error" in message  # the log follows the first line
    assert cuda.stats["builds"] == 1
    build_dir = cuda.build_directory(cuda.build_facts("90"))
    assert not (build_dir / cuda.DONE_MARKER).exists()
    monkeypatch.setenv("MISHOPS_BUILD_LOCK_TIMEOUT_S", "1")
    with cuda.build_lock(build_dir):  # released despite the exception
        pass


@pytest.mark.parametrize("module_name", [cuda.MODULE_NAME, f"{cuda.MODULE_NAME}_v1"])
def test_finished_build_is_imported_without_compiling_or_locking(monkeypatch, tmp_path, module_name):
    """What a second process finds: the marker and the library it names (``load`` names it
    ``..._v1`` when one process built twice). A stand-in library proves the import path, while
    another process holds the build lock."""

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in library")
    use_fake_cuda_home(monkeypatch, tmp_path)
    build_dir = cuda.build_directory(cuda.build_facts("90"))
    build_dir.mkdir(parents=True)
    source = tmp_path / "stand_in.c"
    source.write_text(textwrap.dedent(f"""\
        #include <Python.h>
        static struct PyModuleDef def = {{PyModuleDef_HEAD_INIT, "{module_name}", NULL, -1, NULL}};
        PyMODINIT_FUNC PyInit_{module_name}(void) {{
          PyObject* m = PyModule_Create(&def);
          PyModule_AddStringConstant(m, "origin", "stand-in");
          return m;
        }}
    """))
    subprocess.run([cc, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(source),
                    "-o", str(build_dir / f"{module_name}.so")], check=True, timeout=120)
    (build_dir / cuda.DONE_MARKER).write_text(json.dumps({"library": f"{module_name}.so"}))
    holder = hold_build_lock(build_dir)
    try:
        module = cuda.build_extension("90")
    finally:
        holder.kill()
        holder.wait()
    assert module.origin == "stand-in" and module.__name__ == module_name
    assert cuda.stats.get("builds", 0) == 0


def test_a_damaged_finished_build_says_how_to_recover(monkeypatch, tmp_path):

    use_fake_cuda_home(monkeypatch, tmp_path)
    build_dir = cuda.build_directory(cuda.build_facts("90"))
    build_dir.mkdir(parents=True)
    (build_dir / cuda.DONE_MARKER).write_text(json.dumps({"library": f"{cuda.MODULE_NAME}.so"}))  # no library
    with pytest.raises(CudaBuildError) as caught:
        cuda.build_extension("90")
    assert str(caught.value).startswith(f"cannot load the finished CUDA backend build in {build_dir}")


def test_ninja_beside_an_unactivated_python_is_found(monkeypatch, tmp_path):

    use_fake_cuda_home(monkeypatch, tmp_path)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "ninja").write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert cuda.toolchain_problem() is None
    assert os.environ["PATH"].split(os.pathsep)[0] == str(venv_bin)


# --- the build lock ------------------------------------------------------------------------------


def hold_build_lock(build_dir: Path) -> subprocess.Popen:
    """A process that takes our build lock, leaves torch's 'lock' file as a build in progress
    does, and sleeps; returns once it holds both."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mishops.backends import cuda
        build_dir = Path({str(build_dir)!r})
        with cuda.build_lock(build_dir):
            (build_dir / "lock").touch()  # torch's FileBaton, as a build killed mid-way leaves it
            print("holding", flush=True)
            time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_killed_builder_blocks_nobody(tmp_path):
    from torch.utils.file_baton import FileBaton

    build_dir = tmp_path / "build" / "tag"
    holder = hold_build_lock(build_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (build_dir / "lock").exists()  # what would make cpp_extension.load wait forever

    started = time.perf_counter()
    with cuda.build_lock(build_dir):
        assert not (build_dir / "lock").exists()
        baton = FileBaton(str(build_dir / "lock"))
        assert baton.try_acquire()  # torch's own lock is free again for load()
        baton.release()
    assert time.perf_counter() - started < 5


def test_a_live_builder_makes_others_wait_then_time_out_clearly(monkeypatch, tmp_path):
    build_dir = tmp_path / "build" / "tag"
    holder = hold_build_lock(build_dir)
    try:
        monkeypatch.setenv("MISHOPS_BUILD_LOCK_TIMEOUT_S", "0.5")
        started = time.perf_counter()
        with pytest.raises(CudaBuildError) as caught:
            with cuda.build_lock(build_dir):
                pass
        assert 0.4 < time.perf_counter() - started < 5
        lock_path = str(build_dir.with_name("tag.lock"))
        assert lock_path in str(caught.value) and "MISHOPS_BUILD_LOCK_TIMEOUT_S" in str(caught.value)
        assert (build_dir / "lock").exists()  # a live builder's torch lock is left alone
    finally:
        holder.kill()
        holder.wait()


# --- where builds live ---------------------------------------------------------------------------


def test_build_directory_depends_on_everything_a_binary_does(monkeypatch, tmp_path):

    use_fake_cuda_home(monkeypatch, tmp_path)
    facts = cuda.build_facts("90")
    assert facts["nvcc"] == "99.9.1" and facts["arch"] == "sm_90"
    assert facts["torch"] == torch.__version__ and facts["torch_cuda"] == str(torch.version.cuda)
    assert facts["cxx11_abi"] == str(int(torch._C._GLIBCXX_USE_CXX11_ABI))
    assert facts["python"] == sys.implementation.cache_tag
    assert cuda.build_directory(facts).parent == cache.build_root()
    assert cuda.build_tag(cuda.build_facts("90")) == cuda.build_tag(facts)  # stable

    tags = {cuda.build_tag(facts)}
    for key in facts:  # every fact, changed alone, moves the build elsewhere
        tags.add(cuda.build_tag({**facts, key: facts[key] + "x"}))
    assert len(tags) == len(facts) + 1

    # and build_facts reads them where they live: the GPU arch, torch's version, the C++ ABI
    assert cuda.build_tag(cuda.build_facts("80")) not in tags
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "9.9.9")
        assert cuda.build_tag(cuda.build_facts("90")) not in tags
    with monkeypatch.context() as patch:
        patch.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI)
        assert cuda.build_tag(cuda.build_facts("90")) not in tags


# --- GPU -----------------------------------------------------------------------------------------


@pytest.fixture
def backend():
    available = registry.availability("cuda")
    if not available and ("nvcc" in available.reason or "ninja" in available.reason):
        pytest.skip(f"cuda backend unavailable: {available.reason}")
    assert available, available.reason
    return registry.get("cuda")


eager = registry.get("eager")


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(info.smallest_normal))))


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """NaN exactly where the reference has NaN, the same infinities; returns the finite mask."""
    out = out.double()
    for name, what in (("NaN", torch.isnan), ("inf", torch.isinf)):
        differ = what(out) != what(ref)
        assert not differ.any(), f"{name} mismatch at {differ.nonzero()[:8].tolist()}"
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()])
    return ref.isfinite()


def assert_matches(out, ref, dtype, scale, eager_out=None):
    """The module docstring's bounds; ``scale`` is the fp32 error's natural size per element."""
    assert out.dtype == dtype and out.shape == ref.shape
    finite = assert_same_nonfinite(out, ref)
    err = (out.double() - ref).abs()[finite]
    ref = ref[finite]
    if dtype == torch.float32:
        bound = scale[finite] if isinstance(scale, torch.Tensor) else torch.full_like(ref, scale)
    else:
        bound = (0.5 * ulp(ref, dtype) + 2e-6 * ref.abs()).clamp_min(FTZ_FLOOR)
        if eager_out is not None and err.numel():
            eager_err = (eager_out.double()[finite] - ref).abs()
            eager_err = eager_err[eager_err.isfinite()]
            if eager_err.numel():
                bound = bound.clamp_min(2 * float(eager_err.max()))
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} elements off: worst |error| {float(err.max()):.3g} "
                           f"(x{float((err / bound).max()):.3g} the bound)")


def check_forward(out, x):
    ref = mish2_f64(x)
    scale = FP32_FORWARD_REL * ref.abs().clamp_min(1)
    assert_matches(out, ref, x.dtype, scale, eager.forward(x))


def check_backward(out, x, grad_out):
    ref = mish2_grad_f64(x, grad_out)
    scale = FP32_BACKWARD_REL * torch.maximum(grad_out.double().abs(), ref.abs())
    assert_matches(out, ref, x.dtype, scale, eager.backward(x, grad_out))


ODD = (9, 41, 341)


def make_case(case: str, dtype, device="cuda", seed=0) -> torch.Tensor:
    """Fresh normal * 4 values with every special value planted, in the layout ``case`` names."""
    if case == "misaligned":  # storage offset of one element: not 16-byte aligned
        return special_input((1 + 9 * 41 * 341,), dtype, device, seed=seed)[1:]
    if case == "offset_aligned":  # storage offset of 16 bytes: the vector path on a view
        itemsize = torch.empty((), dtype=dtype).element_size()
        return special_input((16 // itemsize + 9 * 41 * 341,), dtype, device, seed=seed)[16 // itemsize:]
    if case == "channels_last":
        return special_input((3, 5, 7, 9), dtype, device, seed=seed).contiguous(memory_format=torch.channels_last)
    if case == "permuted":
        return special_input((5, 3, 67), dtype, device, seed=seed).permute(2, 0, 1)
    shape = {"odd": ODD, "one": (1,), "empty": (2, 0, 3), "0-d": ()}[case]
    return special_input(shape, dtype, device, seed=seed)


CASES = ["odd", "one", "empty", "0-d", "channels_last", "permuted", "misaligned", "offset_aligned"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64(backend, dtype, case):
    x = make_case(case, dtype)
    out = backend.forward(x)
    assert out.stride() == x.stride() and out.device == x.device and out._base is None
    check_forward(out, x)
    poisoned = torch.empty_like(x).fill_(float("nan"))  # an element the kernel skips stays NaN
    cuda.checked(cuda.extension_for(x.device).mish2_forward(flat(x), flat(poisoned)))
    check_forward(poisoned, x)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + ["misaligned_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_float64_autograd(backend, dtype, case):
    x = make_case("odd" if case == "misaligned_grad" else case, dtype)
    grad_out = make_case("misaligned" if case == "misaligned_grad" else case, dtype, seed=1).view(x.shape)
    grad_out.nan_to_num_(nan=1.0, posinf=1.0, neginf=-1.0)  # in place, keeping the view: the specials go in x
    assert grad_out.stride() == x.stride()
    out = backend.backward(x, grad_out)
    assert out.stride() == x.stride() and out._base is None
    check_backward(out, x, grad_out)
    poisoned = torch.empty_like(x).fill_(float("nan"))
    cuda.checked(cuda.extension_for(x.device).mish2_backward(flat(x), flat(grad_out), flat(poisoned)))
    check_backward(poisoned, x, grad_out)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["vector", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_as_autograd_has_them(backend, dtype, path):
    """Each special value through the 16-byte path (then an odd tail) or, on a view one element
    off alignment, the one-element path; NaN exactly where eager in the same dtype has it (at
    +-inf and NaN, forward and backward)."""
    values = SPECIAL_VALUES + [-87.5, 87.0, -1.1924, 8.7, 3e4]
    values = values * 7 + values[:6]
    if path == "scalar":
        x = torch.tensor([0.0] + values, device="cuda").to(dtype)[1:]
        grad_out = torch.linspace(-2, 2, x.numel() + 1, device="cuda").to(dtype)[1:]
    else:
        x = torch.tensor(values, device="cuda").to(dtype)
        grad_out = torch.linspace(-2, 2, x.numel(), device="cuda").to(dtype)
    check_forward(backend.forward(x), x)
    check_backward(backend.backward(x, grad_out), x, grad_out)
    assert_same_nonfinite(backend.forward(x), eager.forward(x).double())
    assert_same_nonfinite(backend.backward(x, grad_out), eager.backward(x, grad_out).double())


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_at_most_twice_eagers_error_on_conv_like_data(backend, dtype, op):
    """The reference block's own data: a Conv2d's output, 1M elements."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 128, 3, device="cuda")
    with torch.no_grad():
        x = conv(torch.rand(2, 64, 66, 66, device="cuda")).to(dtype)
    grad_out = torch.randn_like(x)
    if op == "forward":
        ref, ours, theirs = mish2_f64(x), backend.forward(x), eager.forward(x)
    else:
        ref = mish2_grad_f64(x, grad_out)
        ours, theirs = backend.backward(x, grad_out), eager.backward(x, grad_out)
    ours_err = float((ours.double() - ref).abs().max())
    eager_err = float((theirs.double() - ref).abs().max())
    assert ours_err <= 2 * eager_err, f"{ours_err:.3g} vs eager's {eager_err:.3g}"


def check_in_chunks(out, x, grad_out=None):
    """Every element, 2^26 at a time, so the float64 reference fits beside huge tensors."""
    xs, outs = flat(x), flat(out)
    grads = flat(grad_out) if grad_out is not None else None
    step = 1 << 26
    for start in range(0, xs.numel(), step):
        part = slice(start, start + step)
        if grads is None:
            ref = mish2_f64(xs[part])
            scale = FP32_FORWARD_REL * ref.abs().clamp_min(1)
            eager_out = eager.forward(xs[part])
        else:
            ref = mish2_grad_f64(xs[part], grads[part])
            scale = FP32_BACKWARD_REL * torch.maximum(grads[part].double().abs(), ref.abs())
            eager_out = eager.backward(xs[part], grads[part])
        assert_matches(outs[part], ref, x.dtype, scale, eager_out)


def require_free_gib(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


@pytest.mark.gpu
@pytest.mark.slow
def test_reference_shape_fp32(backend):
    """64 x 128 x 254 x 254: the conv output of the reference problem, 528M elements."""
    require_free_gib(12)
    x = torch.randn(64, 128, 254, 254, device="cuda") * 4
    flat(x)[-len(SPECIAL_VALUES):] = torch.tensor(SPECIAL_VALUES, device="cuda")
    out = backend.forward(x)
    check_in_chunks(out, x)
    del out
    grad_out = torch.randn_like(x)
    check_in_chunks(backend.backward(x, grad_out), x, grad_out)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_more_than_2_to_the_31_elements(backend, dtype):
    """Offsets past 2^31 (an int32 index would wrap), an odd length for the scalar tail."""
    require_free_gib(22)
    n = 2**31 + 9
    x = torch.randn(n, device="cuda", dtype=dtype) * 4
    x[-len(SPECIAL_VALUES):] = torch.tensor(SPECIAL_VALUES, device="cuda").to(dtype)
    out = torch.full_like(x, float("nan"))
    cuda.checked(cuda.extension_for(x.device).mish2_forward(x, out))
    check_in_chunks(out, x)
    grad_out = torch.randn_like(x)
    out.fill_(float("nan"))
    cuda.checked(cuda.extension_for(x.device).mish2_backward(x, grad_out, out))
    check_in_chunks(out, x, grad_out)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_runs_on_torchs_current_stream(backend, op):
    """The input is written on a side stream behind ~50 ms of queued work; a kernel launched on
    any other stream would read the zeros that are there before."""
    source = special_input((1 << 20) + 3, torch.float32, "cuda")
    grad_out = torch.randn_like(source)
    x = torch.zeros_like(source)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(source)
        out = backend.forward(x) if op == "forward" else backend.backward(x, grad_out)
    torch.cuda.current_stream().wait_stream(side)
    if op == "forward":
        check_forward(out, source)
    else:
        check_backward(out, source, grad_out)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_last_device_index_while_device_0_is_current(backend, op):
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x = make_case("odd", torch.float32, device)
    grad_out = torch.randn_like(x)
    with torch.cuda.device(0):
        out = backend.forward(x) if op == "forward" else backend.backward(x, grad_out)
    assert out.device == device
    if op == "forward":
        check_forward(out, x)
    else:
        check_backward(out, x, grad_out)


BAD_ARGUMENTS = """
import torch
from mishops.backends import cuda
ext = cuda.extension_for(torch.device("cuda", 0))
x = torch.randn(10, device="cuda")
cases = [
    ("flat 1-D contiguous view", lambda: ext.mish2_forward(x.view(2, 5), torch.empty(2, 5, device="cuda"))),
    ("flat 1-D contiguous view", lambda: ext.mish2_forward(x[::2], torch.empty(5, device="cuda"))),
    ("must be a CUDA tensor", lambda: ext.mish2_forward(x.cpu(), x.cpu())),
    ("float32, float16 or bfloat16", lambda: ext.mish2_forward(x.double(), x.double())),
    ("out must match x", lambda: ext.mish2_forward(x, torch.empty(9, device="cuda"))),
    ("grad_out must match x", lambda: ext.mish2_backward(x, x.half(), torch.empty_like(x))),
]
for expected, call in cases:
    message = call()
    assert expected in message, (expected, message)
    try:
        cuda.checked(message, x)
    except RuntimeError as exc:
        assert str(exc).startswith(message) and "sizes (10,)" in str(exc)
        print("raised:", expected)
    else:
        raise AssertionError(f"no error for {expected!r}")
assert ext.mish2_forward(x, torch.empty_like(x)) == ""
"""


@pytest.mark.gpu
def test_bad_arguments_get_clear_errors(backend):
    """In a subprocess: a bad argument gives a clear message (raised by ``cuda.checked``) and never
    takes the process down."""
    out = subprocess.run([sys.executable, "-c", BAD_ARGUMENTS], capture_output=True, text=True)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.count("raised:") == 6


@pytest.mark.gpu
def test_mish2_with_autograd_through_the_cuda_backend(backend):
    """The custom op path: gradients match, and the output is a plain tensor, so in-place ops on
    it work under autograd (a view of a flat buffer would be refused there)."""
    x = make_case("channels_last", torch.float32).requires_grad_()
    grad_out = torch.randn_like(x)
    y = mishops.mish2(x, backend="cuda")
    y.backward(grad_out)
    check_forward(y.detach(), x.detach())
    check_backward(x.grad, x.detach(), grad_out)
    again = mishops.mish2(x, backend="cuda")
    again.add_(1)  # would raise if the output were a view created inside the custom op


@pytest.mark.gpu
def test_a_second_process_loads_the_build_without_compiling(backend, tmp_path):
    module = cuda.extension_for(torch.device("cuda", 0))
    build_dir = Path(module.__file__).parent
    assert (build_dir / cuda.DONE_MARKER).exists()
    code = textwrap.dedent("""
        import json, torch
        import torch.nn.functional as F
        from mishops import dispatch, registry
        from mishops.backends import cuda
        backend = registry.get("cuda")
        x = torch.randn(4099, device="cuda") * 4
        y = backend.forward(x)
        g = backend.backward(x, torch.ones_like(x))
        xd = x.double().requires_grad_()
        F.mish(F.mish(xd)).sum().backward()
        print(json.dumps({"builds": cuda.stats.get("builds", 0),
                          "forward_err": float((y.double() - F.mish(F.mish(x.double()))).abs().max()),
                          "backward_err": float((g.double() - xd.grad).abs().max())}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), MISHOPS_CACHE_DIR=str(tmp_path / "cache"),
               MISHOPS_BUILD_DIR=str(build_dir.parent))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["builds"] == 0
    assert report["forward_err"] < 1e-4 and report["backward_err"] < 1e-4
    assert time.perf_counter() - started < 60


COLD_BUILD = """
import json, torch
from mishops import dispatch
from mishops.backends import cuda
x = torch.randn(1000, device="cuda")
y = torch.empty_like(x)
cuda.checked(cuda.extension_for(x.device).mish2_forward(x, y))
torch.cuda.synchronize()
print(json.dumps({"builds": cuda.stats.get("builds", 0), "finite": bool(y.isfinite().all())}))
"""


def _cold_build_process(cache_dir):
    env = {**os.environ, "MISHOPS_CACHE_DIR": str(cache_dir), "MISHOPS_BUILD_DIR": str(cache_dir / "build")}
    return subprocess.Popen([sys.executable, "-c", COLD_BUILD], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.gpu
@pytest.mark.slow
def test_a_killed_cold_build_never_blocks_the_next_one(tmp_path):
    """SIGKILL a process in the middle of its build (leaving torch's build lock behind, the known
    hang), then a new process must build and run within its time, not wait forever."""
    victim = _cold_build_process(tmp_path)
    time.sleep(8)  # inside the compile: a cold build takes 20-60 s
    victim.kill()
    victim.wait()
    survivor = _cold_build_process(tmp_path)
    out, err = survivor.communicate(timeout=400)
    assert survivor.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"builds": 1, "finite": True}


@pytest.mark.gpu
@pytest.mark.slow
def test_two_cold_processes_share_one_build(tmp_path):
    procs = [_cold_build_process(tmp_path) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["builds"] for r in results) == [0, 1]
    assert all(r["finite"] for r in results)


# --- the block's fused activation + bias gradient (csrc/grad_bias.cu) -----------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mish_count", [2, 1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "misaligned"])
@pytest.mark.parametrize("shape", ["odd", "aligned", "wide_rows", "pixel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_bias_matches_float64(backend, dtype, shape, layout, mish_count):
    """Both walks (NCHW planes, channels_last rows), 16-byte packs and single elements (odd plane
    lengths, a view one element off alignment), one and two Mish."""
    from tests.test_backend_triton import GRAD_BIAS_SHAPES, check_grad_bias, grad_bias_inputs

    dims = GRAD_BIAS_SHAPES[shape]
    if layout == "misaligned":
        n = 1
        for d in dims:
            n *= d
        z_flat, g_flat = grad_bias_inputs((n + 1, 1, 1, 1), dtype, "nchw", "cuda")
        z, g = z_flat.view(-1)[1:].view(dims), g_flat.view(-1)[1:].view(dims)
    else:
        z, g = grad_bias_inputs(dims, dtype, layout, "cuda")
    found = cuda.grad_bias(z, g, mish_count)
    if found is None:  # only channels_last rows of > 256 single elements have no kernel
        assert shape == "wide_rows" and dims[1] % (16 // z.element_size()) != 0
        return
    check_grad_bias(found, z, g, mish_count)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grad_bias_reference_shape(backend, layout):
    """The reference block's conv output, 528M fp32 elements: the bias sums over 4.1M positions."""
    require_free_gib(40)
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    z = (torch.randn(64, 128, 254, 254, device="cuda") * 3).contiguous(memory_format=fmt)
    g = torch.randn_like(z)
    found = cuda.grad_bias(z, g, 2)
    dz, dbias = found
    ref_bias = torch.zeros(128, dtype=torch.float64, device="cuda")
    ref_abs = torch.zeros(128, dtype=torch.float64, device="cuda")
    for i in range(0, 64, 8):  # float64 in slices, to fit
        part = slice(i, i + 8)
        zd = z[part].double().requires_grad_(True)
        (ref,) = torch.autograd.grad(F.mish(F.mish(zd)), zd, g[part].double())
        assert float((dz[part].double() - ref).abs().max()) <= 2e-6 * float(ref.abs().max() + 1)
        ref_bias += ref.sum(dim=(0, 2, 3))
        ref_abs += ref.abs().sum(dim=(0, 2, 3))
        del zd, ref
    assert bool(((dbias.double() - ref_bias).abs() <= 1e-6 * ref_abs + 1e-3).all())
