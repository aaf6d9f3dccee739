"""Where a compile's heavy work runs: in this process, or spread over a Ray cluster, with the same bits out.

Two kinds of work are spread; everything else stays in the driver process: graph rewriting, CMC's low-rank SVDs,
MAS's learning and its own activation captures, ``sink_scales``' captures, ``--verify`` runs and the quality gate.

1. Calibration: the samples are split into contiguous shards, one Ray task each; every task runs the current
   model in onnxruntime over its shard and returns its statistics, which :func:`mqc.calibration.merge_shards`
   joins in sample order to exactly what one pass over all samples gives (how: ``mqc.calibration``'s docstring).
2. Independent per-layer work a pass hands to :meth:`LocalExecutor.map` (GPTQ of one group: the readers of each
   input value, given its Hessian): one task per item, results in the order of the items. In this process the
   items run on a pool of threads, one per CPU (numpy and BLAS release the GIL in the heavy steps), as many at
   once as the jobs' declared memory fits in the executor's budget.

In this process calibration goes through the compile's calibration service (one onnxruntime session per graph
revision, ``mqc.calibration_service``); a shard's task builds its own session on the worker.

The model goes to the cluster once per graph revision (a content digest of it decides): its weights as numpy
arrays in Ray's object store (shared by the tasks of a node, not copied per task) and the graph without weights as
one protobuf (so the 2 GB protobuf limit does not apply). Limits for large models: every node's object store must
hold the weights, and a worker's onnxruntime session may keep its own copy of them (plan RAM for up to weights x
(1 + workers per node)); the driver still holds the whole model, as in a single-process compile.

Results equal the single-process compile bit for bit when both run the same code and libraries (the workers are
checked to run the driver's versions of mqc, numpy, onnx, onnx-ir and onnxruntime) on the same kind of CPU (BLAS
picks its kernels by CPU). Each worker runs onnxruntime on one thread (its MatMuls give the same bits on any thread
count) but BLAS on the driver's thread count: BLAS splits a Gram product xᵀx by its threads, and at real widths
(576 and 1536 over 200 tokens) one thread and two gave other bits (measured with OpenBLAS 0.3.31, the numpy
wheel's), so workers on one BLAS thread under a two-thread driver wrote other Hessians.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence, Sized
from importlib import metadata
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

from mqc.calibration import Calibrator, TapStats, merge_shards
from mqc.errors import ClusterError, InputModelError
from mqc.threads import available_cpus, map_in_threads

#: Environment variable naming the Ray cluster to compile on (``mqc compile --ray``).
ADDRESS_ENV = "MQC_RAY_ADDRESS"
#: ``--ray local``: start a Ray cluster on this machine for the compile.
LOCAL = "local"
#: Thread pools each Ray worker sizes: onnxruntime's to one thread, BLAS's to the driver's count (module docstring).
ORT_THREADS_VAR = "MQC_ORT_THREADS"
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Libraries whose versions decide the bits of a result (scipy: the LAPACK of wide Hessians): the workers must run the
#: driver's.
RESULT_LIBRARIES = ("mqc", "numpy", "scipy", "onnx-ir", "onnx", "onnxruntime")

Result = TypeVar("Result")
Feed = dict[str, np.ndarray]


class LocalExecutor:
    """Runs everything in this process: the default, and the reference the Ray executor matches."""

    def __init__(self, threads: int | None = None, memory_budget: int | None = None) -> None:
        """``threads``: the pool :meth:`map` runs jobs on (default: the CPUs this process may use); ``memory_budget``:
        bytes the jobs running at once may declare together (a compile context sets its Gram budget, a quarter of
        the available memory, where none was given)."""
        self.threads = threads or available_cpus()
        self.memory_budget = memory_budget

    def calibrate(self, calibrator: Calibrator, feeds: Iterable[Feed],
                  progress: Callable[[], None] | None = None) -> dict[str, TapStats]:
        """``calibrator``'s statistics over ``feeds`` (``progress`` is called once per sample)."""
        return calibrator.run(feeds, progress=progress)

    def map(self, function: Callable[..., Result], jobs: Sequence[tuple],
            job_bytes: Sequence[int] | None = None) -> list[Result]:
        """``function(*job)`` for every job, results in job order; ``function`` must be importable by name (a worker
        runs it) and a pure function of its arguments, so running jobs side by side gives the same results.
        ``job_bytes``: the peak memory of each job, which bounds how many run at once."""
        at_once = self.threads
        if job_bytes:  # without a budget, jobs that declare their memory run one at a time
            at_once = min(at_once, max(1, (self.memory_budget or 0) // max(max(job_bytes), 1)))
        return map_in_threads(lambda job: function(*job), jobs, at_once, "mqc-map")

    def close(self) -> None:
        """Release what the executor holds (nothing here)."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayExecutor(LocalExecutor):
    """Calibration shards and per-layer jobs as Ray tasks, one CPU each (module docstring)."""

    def __init__(self, address: str, workers: int | None = None) -> None:
        """``address``: a Ray address (``ray://host:10001``, ``host:6379``, ``auto``) or ``local`` to start a cluster
        of ``workers`` CPUs here; ``workers`` also caps the shards of a calibration (default: the cluster's CPUs)."""
        try:
            import ray
        except ImportError as exc:
            raise ClusterError("--ray needs Ray: pip install 'mqc[distributed]'") from exc
        if workers is not None and workers < 1:
            raise ClusterError(f"--ray-workers must be at least 1, got {workers}")
        super().__init__(threads=1)
        self._ray = ray
        runtime_env = {"env_vars": {ORT_THREADS_VAR: "1", **dict.fromkeys(BLAS_THREAD_VARS, str(blas_threads()))}}
        try:
            if address == LOCAL:  # a new cluster even where RAY_ADDRESS names another
                ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=False, runtime_env=runtime_env)
            else:
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {exc} (a cluster with token "
                               "authentication, the default of `ray start` since Ray 2.59, also needs "
                               "RAY_AUTH_MODE=token and its token in this environment)") from exc
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._model_digest: str | None = None
        self._model_ref: Any = None
        try:
            self._check_versions()
        except BaseException:
            ray.shutdown()
            raise

    def _check_versions(self) -> None:
        expected = library_versions()
        found = self._ray.get(self._ray.remote(num_cpus=1)(library_versions).remote())
        if found != expected:
            differ = {lib: (expected.get(lib), found.get(lib)) for lib in expected if expected.get(lib) != found.get(lib)}
            raise ClusterError(f"the Ray workers run other library versions than this process (driver, worker): "
                               f"{differ}; install the same ones on the cluster")

    def calibrate(self, calibrator: Calibrator, feeds: Iterable[Feed],
                  progress: Callable[[], None] | None = None) -> dict[str, TapStats]:
        ray = self._ray
        samples = feeds if isinstance(feeds, Sized) else list(feeds)
        ends = set(shard_bounds(len(samples), self.workers)[1:])
        model = self._model(calibrator.model)
        settings = CalibratorSettings.of(calibrator)
        task = ray.remote(num_cpus=1)(calibrate_shard)
        pending, shard = {}, []
        for index, feed in enumerate(samples):  # each shard goes to the object store as it fills: one in memory here
            shard.append(feed)
            if index + 1 in ends:
                pending[task.remote(model, settings, shard, index + 1 - len(shard))] = len(shard)
                shard = []
        order = list(pending)
        while pending:  # advance the progress bar shard by shard as they finish
            done, _ = ray.wait(list(pending), num_returns=1)
            for _ in range(pending.pop(done[0])):
                if progress is not None:
                    progress()
        return merge_shards(ray.get(order))

    def map(self, function: Callable[..., Result], jobs: Sequence[tuple],
            job_bytes: Sequence[int] | None = None) -> list[Result]:
        task = self._ray.remote(num_cpus=1)(function)
        return self._ray.get([task.remote(*job) for job in jobs])

    def _model(self, model: ir.Model) -> Any:
        """The object-store reference of ``model``'s packed form, put again only when the model changed."""
        packed = PackedModel.of(model)
        digest = packed.digest()
        if digest != self._model_digest:
            self._model_ref = None  # let the store drop the previous revision first
            self._model_ref = self._ray.put(packed)
            self._model_digest = digest
        return self._model_ref

    def close(self) -> None:
        self._model_ref = None
        self._ray.shutdown()


def executor_for(address: str | None, workers: int | None = None) -> LocalExecutor:
    """The executor for ``--ray ADDRESS`` (or ``$MQC_RAY_ADDRESS`` when ``address`` is None): Ray when set."""
    address = address or os.environ.get(ADDRESS_ENV) or None
    if address is None:
        if workers is not None:
            raise ClusterError("--ray-workers needs --ray ADDRESS (or MQC_RAY_ADDRESS)")
        return LocalExecutor()
    return RayExecutor(address, workers)


def blas_threads() -> int:
    """The thread count of numpy's OpenBLAS in this process (loaded with numpy's core), read from the library
    itself (the environment variables only set it at load); 1 where the library does not say (another BLAS)."""
    import ctypes

    with open("/proc/self/maps", encoding="utf-8") as maps:
        paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "openblas" in line.lower()}
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads"):
            getter = getattr(library, symbol, None)
            if getter is not None:
                getter.restype = ctypes.c_int
                return max(1, int(getter()))
    return 1


def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries that decide a result's bits (:data:`RESULT_LIBRARIES`)."""
    versions: dict[str, str | None] = {}
    for lib in RESULT_LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def shard_bounds(total: int, count: int) -> list[int]:
    """Where ``total`` samples split into at most ``count`` contiguous shards of near-equal size: 0, ..., total."""
    return sorted({int(b) for b in np.linspace(0, total, min(count, total) + 1).round()})


class CalibratorSettings:
    """What a worker needs to rebuild a :class:`Calibrator` around its copy of the model."""

    def __init__(self, taps: list[str], default_modality: int, gram_taps: list[str], providers: list[str],
                 sample_rows: int) -> None:
        self.taps, self.default_modality, self.gram_taps = taps, default_modality, gram_taps
        self.providers, self.sample_rows = providers, sample_rows

    @classmethod
    def of(cls, calibrator: Calibrator) -> CalibratorSettings:
        return cls(list(calibrator.taps), calibrator.default_modality, sorted(calibrator.gram_taps),
                   list(calibrator.providers), calibrator.sample_rows)

    def calibrator(self, model: ir.Model) -> Calibrator:
        """The calibrator of a worker's task: one CPU, so its taps are updated one after the other."""
        return Calibrator(model, self.taps, self.default_modality, self.gram_taps, self.providers, self.sample_rows,
                          threads=1)


def calibrate_shard(packed: PackedModel, settings: CalibratorSettings, feeds: list[Feed],
                    first_sample: int) -> dict[str, TapStats]:
    """A Ray task: the statistics of one shard of the samples, to be merged in sample order."""
    return settings.calibrator(packed.model()).run(feeds, first_sample=first_sample)


class PackedModel:
    """A model as the graph's protobuf without its initializers' data, plus those data as numpy arrays.

    Arrays pickle out of band into Ray's object store, so tasks on one node share one copy of the weights, and the
    graph protobuf stays small whatever the model's size.
    """

    _PLACEHOLDER = "mqc-packed"

    def __init__(self, graph: bytes, weights: dict[str, tuple[np.ndarray, int]]) -> None:
        self.graph = graph
        self.weights = weights

    @classmethod
    def of(cls, model: ir.Model) -> PackedModel:
        from mqc.session import _external_tensors

        weights: dict[str, tuple[np.ndarray, int]] = {}
        swapped: list[tuple[ir.Value, Any]] = []
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            weights[value.name] = (np.ascontiguousarray(tensor.numpy()), int(tensor.dtype))
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(cls._PLACEHOLDER, offset=0, length=tensor.nbytes,
                                                  dtype=tensor.dtype, shape=tensor.shape, name=value.name)
        try:
            if any(t.location != cls._PLACEHOLDER for t in _external_tensors(model)):
                raise InputModelError("a subgraph initializer is stored as external data: Ray calibration "
                                      "ships only the main graph's initializers")
            graph = ir.serde.serialize_model(model).SerializeToString()
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
        return cls(graph, weights)

    def digest(self) -> str:
        """A content hash: equal digests, equal models."""
        digest = hashlib.blake2b(self.graph, digest_size=16)
        for name, (array, dtype) in self.weights.items():
            digest.update(f"{name}:{dtype}:{array.dtype}:{array.shape}".encode())
            digest.update(array.reshape(-1).view(np.uint8).data)
        return digest.hexdigest()

    def model(self) -> ir.Model:
        """The model again, its initializers in memory (sharing the arrays)."""
        import onnx

        model = ir.serde.deserialize_model(onnx.load_from_string(self.graph))
        for name, value in model.graph.initializers.items():
            if name in self.weights:
                array, dtype = self.weights[name]
                value.const_value = ir.Tensor(array, dtype=ir.DataType(dtype), name=name)
        return model
