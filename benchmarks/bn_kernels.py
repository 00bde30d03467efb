"""asv benchmarks over the shared case registry (fastbn.cases): one suite per kernel, one parameter.

The parameter ``case`` lists exactly the registry's cases for that kernel (``layout-shape-dtype``, e.g.
``NCHW-32x64x56x56-float32``), so every row that ``asv compare`` / ``asv publish`` shows is a real
measurement. (A ``layout x shape x dtype`` product would hold 40 combinations per kernel of which 20 are
outside the matrix -- float64 on most shapes, the dense (N, C) shape in 4-D layouts -- and asv shows
those as n/a.) Inputs are built and pre-touched in setup, and every runner is called once there, so no
JIT compile (or cache load) lands in a timing.

asv (asv_runner >= 0.3) re-runs ``setup`` before every timed sample of a class that has one, and then
times a single call per sample. The inputs of the last case are therefore kept between setups (building
a 98 MiB input took ~1 s per sample): a re-run setup only calls the kernel twice more, which also leaves
its data as warm as in the sample before.
"""
from fastbn.cases import bench_cases

_LAST: dict = {}  # {case key: (run_out, run_alloc)} of the last case set up in this process


def _by_param(kernel: str) -> dict:
    """``{"NCHW-32x64x56x56-float32": Case, ...}`` for one kernel, in the registry's order."""
    return {c.id.split("-", 1)[1]: c for c in bench_cases(kernels=(kernel,))}


class _KernelBench:
    cases: dict = {}
    param_names = ["case"]
    timeout = 600

    def setup(self, case: str) -> None:
        c = self.cases[case]
        if c not in _LAST:
            _LAST.clear()  # one case's inputs at a time (up to 3 x 98 MiB)
            inp = c.make_inputs()
            _LAST[c] = (c.runner(inp, use_out=True), c.runner(inp, use_out=False))
        self.run_out, self.run_alloc = _LAST[c]
        self.run_out()  # JIT warm-up (compile or cache load) and page faults, outside the timings
        self.run_alloc()

    def time_out(self, case: str) -> None:
        """Caller-owned output buffer (allocates nothing of the input's size)."""
        self.run_out()

    def time_alloc(self, case: str) -> None:
        """Allocating the output, as PyTorch does."""
        self.run_alloc()

    def peakmem_out(self, case: str) -> None:
        for _ in range(100):
            self.run_out()


class TrainForward(_KernelBench):
    cases = _by_param("train")
    params = [list(cases)]


class InferForward(_KernelBench):
    cases = _by_param("infer")
    params = [list(cases)]


class Backward(_KernelBench):
    cases = _by_param("backward")
    params = [list(cases)]


class KernelForKernel:
    """fastbn against PyTorch kernel for kernel, and against the physical bound, as asv ``track_``
    figures: each measured by ``fastbn.bench.bench_case`` (15 interleaved rounds of fastbn with ``out=``,
    PyTorch's faster of its ``.out`` and allocating kernels on the same memory, and the bound's copies)
    in one run, so the ratio is steadier than two separately timed ``time_`` results. Skipped (n/a)
    without torch for the ratio. One parameter: ``kernel-layout-shape-dtype``, exactly the registry's
    cases."""

    param_names = ["case"]
    params = [[c.id for c in bench_cases()]]
    timeout = 900
    unit = "x"

    def setup_cache(self) -> dict:
        from fastbn.bench import bench_case, have_torch

        with_torch = have_torch()
        out = {}
        for c in bench_cases():
            r = bench_case(c, repeat=15, with_torch=with_torch)
            out[c.id] = (r.kernel_speedup.value if r.kernel_speedup else None, r.efficiency)
        return out

    def track_speedup_vs_torch(self, results: dict, case: str) -> float:
        """PyTorch's kernel time / fastbn's (out=), median of per-round ratios: above 1 is faster."""
        speedup = results[case][0]
        if speedup is None:
            raise NotImplementedError("torch is not installed")
        return speedup

    def track_bound_efficiency(self, results: dict, case: str) -> float:
        """The physical bound's time / fastbn's (out=): 1.0 is the fastest way to move the bytes."""
        return results[case][1]
