"""Which path each op call takes: torchmatgrad's hand-written kernel, or the vendor route through
ATen (``mm``/``addmm``: MKL/oneDNN on CPU, cuBLAS on CUDA) where that was measured faster.

The choice is data, made in C++ on every call (csrc/policy.h) from a table this module installs:
one entry per device type, op (``"forward"``, ``"backward"``, ``"accumulate"``), dtype, weight-size
bucket (n·m) and rows bucket (rows of the input). Bucket bounds come from the extension
(``_C.path_size_edges``, ``_C.path_row_edges``), so Python and C++ agree by construction.

Where the table comes from, first match wins:

1. this machine's ``python -m torchmatgrad tune`` cache (keyed by a fingerprint of the machine and
   the build, in ``$TORCHMATGRAD_CACHE_DIR`` or ``~/.cache/torchmatgrad``);
2. the measured defaults for this kind of device (:data:`DEFAULTS`, each saying where it was
   measured);
3. the generic rule: the kernel up to the few-rows bound (``_C.few_rows`` rows, the memory-bound
   regime), the vendor route above it.

A path can be forced for the whole process with the environment variable
``TORCHMATGRAD_PATH=auto|kernel|vendor`` (read at import) or for a block with
:func:`force_path`. Within a process (and without forcing) the same shape always takes the same
path. Both paths give the same results up to rounding; every feature works on both.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from . import _C, _compat
from ._version import __version__

__all__ = [
    "OPS",
    "PathTable",
    "current_path",
    "device_kind",
    "force_path",
    "installed",
    "path",
]

OPS = ("forward", "backward", "accumulate")
#: The C++ table's dtype order.
DTYPES = ("float32", "float64", "bfloat16", "float16")
SIZE_EDGES: tuple[int, ...] = tuple(_C.path_size_edges)
ROW_EDGES: tuple[int, ...] = tuple(_C.path_row_edges)
N_SIZES = len(SIZE_EDGES) + 1
N_ROWS = len(ROW_EDGES) + 1
_FORCED = {"auto": 0, "kernel": 1, "vendor": 2}
_ops = torch.ops.torchmatgrad


def size_bucket(n: int, m: int) -> int:
    """The weight-size bucket of an (n, m) weight: the first bound ≥ n·m."""
    return bisect.bisect_left(SIZE_EDGES, n * m)


def rows_bucket(rows: int) -> int:
    """The rows bucket of a call with ``rows`` rows of input: the first bound ≥ rows."""
    return bisect.bisect_left(ROW_EDGES, rows)


def _label(edges: tuple[int, ...], i: int, square: bool) -> str:
    if i == len(edges):
        bound = edges[-1]
        return f">{int(bound**0.5)}²" if square else f">{bound}"
    return f"≤{int(edges[i] ** 0.5)}²" if square else f"≤{edges[i]}"


def size_label(i: int) -> str:
    return _label(SIZE_EDGES, i, True)


def rows_label(i: int) -> str:
    return _label(ROW_EDGES, i, False)


def _generic_row() -> str:
    """'k' for the rows buckets the few-rows kernels cover, 'v' above."""
    few = rows_bucket(int(_C.few_rows))
    return "".join("k" if r <= few else "v" for r in range(N_ROWS))


@dataclasses.dataclass
class PathTable:
    """The path of every (op, dtype, size bucket, rows bucket) for one kind of device.

    ``paths[(op, dtype)]`` is a list of one string per size bucket, each with one character per
    rows bucket: ``"k"`` the hand-written kernel, ``"v"`` the vendor route. ``source`` says where
    the table comes from (machine, torch, commit, date); ``measurements`` (optional) holds what
    it was derived from: dicts with op, dtype, n, m, rows, kernel_ms, vendor_ms.
    """

    device_kind: str
    source: str
    paths: dict[tuple[str, str], list[str]]
    measurements: list[dict] = dataclasses.field(default_factory=list)

    def validate(self) -> PathTable:
        for op in OPS:
            for dt in DTYPES:
                rows = self.paths.get((op, dt))
                ok = (
                    rows is not None
                    and len(rows) == N_SIZES
                    and all(len(r) == N_ROWS and set(r) <= {"k", "v"} for r in rows)
                )
                if not ok:
                    raise ValueError(
                        f"path table for {self.device_kind} ({self.source}): entry ({op}, {dt}) "
                        f"must be {N_SIZES} strings of {N_ROWS} 'k'/'v', got {rows!r}"
                    )
        return self

    def path(self, op: str, dtype: str, n: int, m: int, rows: int) -> str:
        flag = self.paths[(op, dtype)][size_bucket(n, m)][rows_bucket(rows)]
        return "kernel" if flag == "k" else "vendor"

    def tensor(self) -> torch.Tensor:
        """The bool [ops, dtypes, sizes, rows] tensor ``_set_path_table`` takes (True: vendor)."""
        flags = [
            [[[c == "v" for c in row] for row in self.paths[(op, dt)]] for dt in DTYPES]
            for op in OPS
        ]
        return torch.tensor(flags, dtype=torch.bool)

    def to_json(self) -> dict:
        return {
            "device_kind": self.device_kind,
            "source": self.source,
            "paths": {f"{op}/{dt}": rows for (op, dt), rows in self.paths.items()},
            "measurements": self.measurements,
        }

    @classmethod
    def from_json(cls, doc: dict) -> PathTable:
        paths = {tuple(k.split("/", 1)): list(v) for k, v in doc["paths"].items()}
        return cls(doc["device_kind"], doc["source"], paths, list(doc.get("measurements", [])))


#: The vendor route is taken only when faster than the kernel by more than this fraction
#: (timing noise must not flip a tie away from the hand-written kernel).
MARGIN = 0.02


def choice(point: dict) -> str:
    """ "k" or "v" for one measured point (kernel_ms, vendor_ms; or inferred)."""
    if point.get("inferred"):
        return point["inferred"][0]
    return "v" if point["vendor_ms"] < (1 - MARGIN) * point["kernel_ms"] else "k"


def generic_table(device_kind: str) -> PathTable:
    row = _generic_row()
    paths = {(op, dt): [row] * N_SIZES for op in OPS for dt in DTYPES}
    return PathTable(
        device_kind,
        f"generic rule (not measured on this kind of device): the kernel for ≤ {_C.few_rows} "
        "rows, the vendor route above",
        paths,
    )


def table_from_rules(device_kind: str, source: str, rules: dict) -> PathTable:
    """A table from compact rules: ``rules[(op, dtype)]`` is either a string for every size
    bucket or a dict {size bucket: string} with a "*" default; dtypes not given copy a sibling
    (float64 from float32, float16 from bfloat16)."""
    sibling = {"float64": "float32", "float16": "bfloat16"}
    paths = {}
    for op in OPS:
        for dt in DTYPES:
            rule = rules.get((op, dt), rules.get((op, sibling.get(dt, dt))))
            if rule is None:
                raise ValueError(f"rules for {device_kind} lack ({op}, {dt})")
            if isinstance(rule, str):
                paths[(op, dt)] = [rule] * N_SIZES
            else:
                paths[(op, dt)] = [rule.get(s, rule["*"]) for s in range(N_SIZES)]
    return PathTable(device_kind, source, paths).validate()


# ---- measured defaults -----------------------------------------------------------------------
#
# One JSON file per device kind in policy_defaults/ (the format `tune` writes: the table, its
# source (machine, torch, commit, date) and the measurements behind it), written by
# `python -m torchmatgrad tune --out ...` on a machine of that kind, or by `tune --from-bench`
# from a recorded benchmark run.

DEFAULTS_DIR = Path(__file__).with_name("policy_defaults")


def _load_defaults() -> dict[str, PathTable]:
    tables = {}
    for path in sorted(DEFAULTS_DIR.glob("*.json")):
        table = PathTable.from_json(json.loads(path.read_text(encoding="utf-8"))).validate()
        tables[table.device_kind] = table
    return tables


DEFAULTS: dict[str, PathTable] = _load_defaults()

# CUDA before its table is installed (CUDA not initialised yet) or on a GPU kind with no measured
# table: the hand-written few-rows kernels (which read W once) for ≤ 16 rows, cuBLAS above (the
# tiled CUDA-core GEMM cannot match tensor cores).
_CUDA_PENDING = (
    "generic rule (CUDA not initialised yet, or no table measured for this device's kind): the "
    "few-rows kernels for ≤ 16 rows, cuBLAS above"
)


#: CPU flags (/proc/cpuinfo) of native 16-bit dot products, which torch's vendor route (oneDNN)
#: uses for every 16-bit GEMM and the hand-written kernels only in the bf16 forward's lanes
#: kernel (AVX512-BF16); the rest widen to float32.
_NATIVE_16BIT_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name`` line of /proc/cpuinfo, its value; None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def device_kind(device: str | torch.device = "cpu") -> str:
    """The key of :data:`DEFAULTS` for ``device``: ``cpu/<arch>-<isa>-<vendor>`` (ISA as the
    kernels run it, e.g. ``cpu/x86_64-avx512-intel``), with ``-bf16`` appended on a CPU that
    multiplies 16-bit floats natively (AVX512-BF16, AVX512-FP16 or AMX: the measured tables,
    made without them, would keep 16-bit GEMMs on the kernels there), or
    ``cuda/sm_<major><minor>``."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda/sm_{major}{minor}"
    v = _cpuinfo_field("vendor_id")
    vendor = (
        "other" if v is None else {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(v, v.lower())
    )
    flags = set((_cpuinfo_field("flags") or "").split())
    native16 = "-bf16" if flags.intersection(_NATIVE_16BIT_FLAGS) else ""
    return f"cpu/{platform.machine().lower()}-{_C.cpu_isa}-{vendor}{native16}"


# ---- the tune cache ----------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$TORCHMATGRAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchmatgrad``, else
    ``~/.cache/torchmatgrad``."""
    env = os.environ.get("TORCHMATGRAD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchmatgrad"


def fingerprint(device: str | torch.device = "cpu") -> str:
    """What a tune result depends on: the device (kind, model, threads), torch, and this build of
    torchmatgrad (the extension file's size and modification time)."""
    device = torch.device(device)
    so = Path(_C.__file__).stat()
    if device.type == "cuda":
        model = torch.cuda.get_device_name(device)
    else:
        model = cpu_model()
    parts = [
        device_kind(device),
        model,
        str(torch.get_num_threads()),
        torch.__version__,
        __version__,
        f"{so.st_size}-{int(so.st_mtime)}",
    ]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform.processor()."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "?"


def cache_file(device: str | torch.device = "cpu") -> Path:
    device = torch.device(device)
    return cache_dir() / f"policy-{device.type}-{fingerprint(device)}.json"


def _load_cache(device: torch.device) -> PathTable | None:
    path = cache_file(device)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return PathTable.from_json(doc).validate()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        import warnings

        warnings.warn(f"torchmatgrad: ignoring unreadable tune cache {path}: {e}", stacklevel=2)
        return None


# ---- installing -----------------------------------------------------------------------------

_installed: dict[str, PathTable] = {}


def install(table: PathTable, device_type: str) -> None:
    """Make ``table`` the policy for every ``device_type`` ("cpu" or "cuda") call."""
    _ops._set_path_table(device_type, table.validate().tensor())
    _installed[device_type] = table


def load(device: str | torch.device = "cpu") -> PathTable:
    """Install the table for ``device``'s kind (tune cache, else measured default, else generic)
    and return it."""
    device = torch.device(device)
    table = _load_cache(device)
    if table is None:
        kind = device_kind(device)
        table = DEFAULTS.get(kind) or generic_table(kind)
    install(table, device.type)
    return table


def installed() -> dict[str, PathTable]:
    """The tables in use, by device type."""
    return dict(_installed)


def path(op: str, dtype: torch.dtype, n: int, m: int, rows: int, device: str = "cpu") -> str:
    """``"kernel"`` or ``"vendor"``: the path a call takes now (forcing included), as the C++
    policy decides it."""
    return _ops._path(torch.device(device).type, dtype, op, rows, n, m)


# ---- forcing a path ---------------------------------------------------------------------------

_forced = "auto"


def current_path() -> str:
    """The forced path ("kernel", "vendor") or "auto" (the table)."""
    return _forced


def _set_forced(name: str) -> None:
    global _forced
    if name not in _FORCED:
        raise ValueError(f"path must be one of {', '.join(_FORCED)}, got {name!r}")
    _ops._set_path_override(_FORCED[name])
    _forced = name


@contextlib.contextmanager
def force_path(name: str) -> Iterator[None]:
    """Within the block, every op call of the process takes ``name``: "kernel" (the hand-written
    kernels), "vendor" (ATen mm/addmm) or "auto" (the table). Process-wide, not per thread."""
    previous = _forced
    _set_forced(name)
    try:
        yield
    finally:
        _set_forced(previous)


# ---- the tensor-core few-rows forward (CUDA) --------------------------------------------------


def cuda_tensor_cores() -> bool:
    """Whether the CUDA kernels may run bfloat16/float16 calls of ``_C.tc_few_rows_min`` ..
    ``_C.tc_few_rows_max`` rows on tensor cores (mma.sync): the forward (W read once) and, above
    ``_C.few_rows`` rows, the backward's grad_W, where the kernel path runs. Off unless the
    process started with ``TORCHMATGRAD_CUDA_TC=1`` or :func:`set_cuda_tensor_cores` turned it
    on: the kernels are compiled but have not yet been run on a GPU. The path policy still
    decides kernel against vendor first (its CUDA defaults send 16-bit calls of 16 rows and more
    to cuBLAS), so measuring them needs the kernel path forced."""
    return bool(_ops._cuda_tensor_cores())


def set_cuda_tensor_cores(on: bool) -> None:
    """Turn the tensor-core few-rows forward on or off for the whole process."""
    _ops._set_cuda_tensor_cores(bool(on))


@contextlib.contextmanager
def cuda_tensor_cores_enabled(on: bool = True) -> Iterator[None]:
    """Within the block, :func:`cuda_tensor_cores` is ``on`` (process-wide, not per thread)."""
    previous = cuda_tensor_cores()
    set_cuda_tensor_cores(on)
    try:
        yield
    finally:
        set_cuda_tensor_cores(previous)


def _init() -> None:
    env = os.environ.get("TORCHMATGRAD_PATH", "auto").strip().lower() or "auto"
    if env not in _FORCED:
        raise ValueError(
            f"TORCHMATGRAD_PATH must be one of {', '.join(_FORCED)}, got "
            f"{os.environ['TORCHMATGRAD_PATH']!r}"
        )
    load("cpu")
    # CUDA: the generic rule until CUDA initialises; then the table of the device's kind (tune
    # cache, else the measured default, e.g. cuda/sm_90, else the generic rule). Looking the
    # kind up needs the device's capability, and importing must not initialise CUDA.
    install(dataclasses.replace(generic_table("cuda/*"), source=_CUDA_PENDING), "cuda")
    if torch.cuda.is_available():
        _compat.on_cuda_init(_load_cuda)
    _set_forced(env)


def _load_cuda() -> None:
    """Install the CUDA table once CUDA is up. A failure leaves the generic rule in place, with a
    warning: it must not break CUDA's initialisation."""
    try:
        load("cuda")
    except Exception as e:  # noqa: BLE001 - any failure here keeps the generic table
        warnings.warn(
            f"torchmatgrad: CUDA path table not loaded ({e}); the generic rule applies",
            stacklevel=2,
        )


_init()
