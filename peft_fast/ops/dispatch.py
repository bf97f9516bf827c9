"""Backend choice for every op: "auto" | "torch" | "triton" | "triton_composite" | "cuda".

Each op family registers one implementation per backend together with a `supports`
predicate. `select(op, ...)` returns the implementation to run for the current backend
setting and the op's tensors:

* an explicit backend ("triton", say) must be available, else `set_backend` raises;
  when it is available but cannot take this particular input (dtype, device, shape), or
  has no implementation of the op, dispatch falls back to the next backend in
  `FALLBACK_ORDER` ("triton_composite": in the op's AUTO_DEFAULT) and says so once at
  debug level;
* "auto" tries the fastest backends first and ends on "torch", which takes anything;
  on CPU tensors it uses "torch" (Triton's interpreter is a test vehicle, not a fast path).
  "Fastest" comes from the backend table (per op and shape class, measured on a GPU by
  `peft-fast bench --write-table PATH`): the file named by $PEFT_FAST_BACKEND_TABLE, else the
  shipped default backend_table.json, or whatever `load_backend_table(path)` last loaded.
  Where it has no entry, AUTO_DEFAULT: for each op, only backends that are never slower than
  the unfused torch composition by construction (cuBLAS base products plus adapter passes
  that move no more bytes than torch's), so an unmeasured fully fused kernel is never the
  default:
    lora_linear        triton_composite, cuda, torch   (cuBLAS + Triton adapter passes; the
                                                        fused "triton" kernel only by name or
                                                        where the table measured it faster)
    ia3_linear         cuda, torch                     (cuBLAS + one-pass scale kernels; the
                                                        fused "triton" matmul only by name or
                                                        table)
    lora_linear_mixed  triton, cuda, torch             (both are cuBLAS + SGMV/BGMV adapter
                                                        passes, composites already)
    loha_linear        triton, torch                   (adapter-only passes around torch's base
    lokr_linear        triton, torch                    product: fewer bytes and launches than
                                                        torch's factored form, see ops/triton/)
    xlora_linear       triton, torch                   (cuBLAS base products + the stacked
                                                        shrink and an in-place expand-add)
  Other ops follow FALLBACK_ORDER.

Backends load lazily: importing peft_fast never needs Triton, a GPU or a built extension.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("peft_fast.dispatch")

BACKENDS = ("auto", "torch", "triton", "triton_composite", "cuda")
# The order an explicit backend that cannot take an input falls back along, and "auto"'s order
# for ops without an AUTO_DEFAULT entry.
FALLBACK_ORDER = ("triton", "triton_composite", "cuda", "torch")
# The order "auto" tries on CUDA tensors when the backend table has no measurement for the op
# and shape class: composites only (see the module docstring).
AUTO_DEFAULT: dict[str, tuple[str, ...]] = {
    "lora_linear": ("triton_composite", "cuda", "torch"),
    "ia3_linear": ("cuda", "torch"),
    "lora_linear_mixed": ("triton", "cuda", "torch"),
    "loha_linear": ("triton", "torch"),
    "lokr_linear": ("triton", "torch"),
    "xlora_linear": ("triton", "torch"),
    # The fused 4-bit matmul replaces the base product itself: bitsandbytes' dequantizer + cuBLAS
    # until a measurement in the backend table puts "triton" first for a shape class.
    "lora_linear_4bit": ("torch",),
}
# The backend table shipped with the package (read-only: nothing writes into an install).
BACKEND_TABLE = Path(__file__).with_name("backend_table.json")
# Environment variable naming a user's measured table, read instead of the shipped one.
BACKEND_TABLE_ENV = "PEFT_FAST_BACKEND_TABLE"


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""

    fn: Callable[..., Any]
    # Returns None when the implementation can take these arguments, else the reason it cannot.
    supports: Callable[..., str | None]


_IMPLS: dict[str, dict[str, Impl]] = {}
# Modules that register the implementations of a backend, imported on first use.
_BACKEND_MODULES: dict[str, tuple[str, ...]] = {"torch": (), "triton": (), "triton_composite": (), "cuda": ()}
_state = threading.local()
_global_backend = "auto"
_warned: set[tuple[str, str, str]] = set()


def register(op: str, backend: str, fn: Callable[..., Any], supports: Callable[..., str | None] | None = None) -> None:
    """Register `fn` as `backend`'s implementation of `op`."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = Impl(fn, supports or (lambda *a, **k: None))


def register_backend_module(backend: str, module: str) -> None:
    """Declare that importing `module` registers `backend`'s implementations (lazy load)."""
    mods = _BACKEND_MODULES.setdefault(backend, ())
    if module not in mods:
        _BACKEND_MODULES[backend] = mods + (module,)


def interpreter_enabled() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status(backend: str = "triton") -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    if not _BACKEND_MODULES.get(backend):
        return f"no {backend} kernels are registered in this version of peft_fast"
    import torch

    if not torch.cuda.is_available() and not interpreter_enabled():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    return None


def _cuda_status() -> str | None:
    if not _BACKEND_MODULES.get("cuda"):
        return "no CUDA C++ kernels are registered in this version of peft_fast"
    from .cuda.build import unavailable_reason as cuda_reason

    # no CUDA device / torch without CUDA / no nvcc and no prebuilt library / build failed (log)
    return cuda_reason()


_STATUS: dict[str, Callable[[], str | None]] = {
    "torch": lambda: None,
    "triton": _triton_status,
    "triton_composite": lambda: _triton_status("triton_composite"),
    "cuda": _cuda_status,
}
_loaded: dict[str, str | None] = {}


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else why not. Loads its kernels on first success.

    The device check is not cached (TRITON_INTERPRET may be set after import); loading the
    backend's modules happens once."""
    _check_name(backend)
    if backend == "auto":
        return None
    reason = _STATUS[backend]()
    if reason is not None:
        return reason
    if backend not in _loaded:
        _loaded[backend] = None
        for mod in _BACKEND_MODULES.get(backend, ()):
            try:
                importlib.import_module(mod)
            except Exception as e:
                _loaded[backend] = f"loading {mod} failed ({type(e).__name__}: {e})"
                break
    return _loaded[backend]


def available_backends() -> dict[str, str | None]:
    """Every concrete backend mapped to None (available) or the reason it is not."""
    return {b: unavailable_reason(b) for b in BACKENDS[1:]}


def _check_name(name: Any) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")


def set_backend(name: str) -> None:
    """Choose the backend for every op in this process ("auto" picks the best available)."""
    global _global_backend
    _check_name(name)
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    _global_backend = name


def get_backend() -> str:
    """The backend in force in this thread (a `use_backend` block, else the global one)."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend, e.g. `with peft_fast.use_backend("torch"): ...`."""
    _check_name(name)
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _debug_once(op: str, backend: str, why: str) -> None:
    key = (op, backend, why)
    if key not in _warned:
        _warned.add(key)
        logger.debug("peft_fast: %s: backend %r cannot take this input (%s); falling back", op, backend, why)


def _first_tensor(args: tuple[Any, ...]) -> Any:
    for a in args:
        if hasattr(a, "device") and hasattr(a, "dtype"):
            return a
    return None


def shape_class(x: Any) -> str:
    """The backend table's shape class of a call whose first tensor is `x`: its token count
    (all dims but the last) in buckets, the dimension that changes which kernel wins most."""
    if x is None or getattr(x, "dim", lambda: 0)() < 1:
        return "any"
    tokens = x.numel() // max(1, x.shape[-1])
    for bound in (256, 4096):
        if tokens <= bound:
            return f"tokens<={bound}"
    return "tokens>4096"


_table_cache: dict[str, Any] | None = None


def _validated_table(table: Any, source: str) -> dict[str, Any]:
    """`table` if it has the backend table's shape, else ValueError naming `source`."""
    if not isinstance(table, dict) or not isinstance(table.get("entries"), dict):
        raise ValueError(f"backend table {source}: expected a JSON object with an 'entries' object")
    for op, classes in table["entries"].items():
        if not isinstance(classes, dict):
            raise ValueError(f"backend table {source}: entries[{op!r}] must map shape classes to backend lists")
        for cls, order in classes.items():
            if not isinstance(order, list) or not all(b in FALLBACK_ORDER for b in order):
                raise ValueError(
                    f"backend table {source}: entries[{op!r}][{cls!r}] must be a list of backends "
                    f"from {list(FALLBACK_ORDER)}, got {order!r}"
                )
    return table


def load_backend_table(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read a backend table and make it the one "auto" follows in this process; return it.

    `path` None means $PEFT_FAST_BACKEND_TABLE when set, else the shipped default (empty
    until measured). Raises FileNotFoundError for a missing file and ValueError for one that
    is not a backend table (JSON object with `entries`: op -> shape class -> backends)."""
    global _table_cache
    if path is None:
        env = os.environ.get(BACKEND_TABLE_ENV)
        source = Path(env) if env else BACKEND_TABLE
        label = f"{source} (from ${BACKEND_TABLE_ENV})" if env else str(source)
    else:
        source = Path(path)
        label = str(source)
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"backend table {label} does not exist") from None
    try:
        table = json.loads(text)
    except ValueError as e:
        raise ValueError(f"backend table {label} is not valid JSON ({e})") from None
    _table_cache = _validated_table(table, label)
    return _table_cache


def backend_table() -> dict[str, Any]:
    """The backend table in force: the last `load_backend_table` result, loaded on first use
    from $PEFT_FAST_BACKEND_TABLE or the shipped default."""
    return _table_cache if _table_cache is not None else load_backend_table()


def auto_order(op: str, x: Any, table: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The order "auto" tries for `op` on CUDA tensor `x` (anything with `shape`/`numel`): the
    measured order of `table` (default: the table in force) for the op and x's shape class,
    then the op's default order without those; where it has no entry, the default order:
    AUTO_DEFAULT[op] (composites only), else FALLBACK_ORDER."""
    default = AUTO_DEFAULT.get(op, FALLBACK_ORDER)
    table = backend_table() if table is None else table
    measured = table.get("entries", {}).get(op, {}).get(shape_class(x))
    if not measured:
        return default
    known = [b for b in measured if b in FALLBACK_ORDER]
    return tuple(known) + tuple(b for b in default if b not in known)


def select(op: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """The implementation of `op` to run on these arguments under the current backend."""
    impls = _IMPLS.get(op)
    if not impls or "torch" not in impls:
        raise KeyError(f"op {op!r} has no reference implementation registered")
    chosen = get_backend()
    if chosen == "auto":
        # Kernels are the fast path on GPUs only; on CPU tensors (Triton's interpreter) the
        # reference is faster, so "auto" uses kernels there only when asked by name.
        x = _first_tensor(args)
        order = auto_order(op, x) if x is not None and x.device.type == "cuda" else ("torch",)
    else:
        # Choosing the composite chooses the safe path: its fallbacks are the op's composites too.
        rest = AUTO_DEFAULT.get(op, FALLBACK_ORDER) if chosen == "triton_composite" else FALLBACK_ORDER
        order = (chosen,) + tuple(b for b in rest if b != chosen)
    for backend in order:
        # Availability first: it imports the backend's modules, which register its impls.
        if backend != "torch" and unavailable_reason(backend) is not None:
            continue
        impl = impls.get(backend)
        if impl is None:
            continue
        why = impl.supports(*args, **kwargs)
        if why is None:
            return impl.fn
        if backend == chosen:
            _debug_once(op, backend, why)
    return impls["torch"].fn
