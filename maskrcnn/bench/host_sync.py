"""Finding the ops that would make a GPU step wait for the host, on any device.

`HostSyncCounter` is a TorchDispatchMode that records every ATen (or torchvision) op which,
on CUDA, copies a value to the host and blocks until the device has caught up: `nonzero`,
`unique`, `.item()` / `int()` / `bool()` / `.tolist()` (all `_local_scalar_dense`),
`masked_select`, indexing or `index_put` with a boolean mask, `bincount`, `repeat_interleave`
without `output_size`, `equal`, torchvision's `nms` (its CUDA kernel copies its mask to the
host) and copies from a device to the CPU (ops, and the Tensor methods `tolist`, `numpy` and
`cpu`, which on a CPU tensor dispatch nothing and are caught by wrapping the methods while the
mode is active; `.to(device)` is not, as on a CPU run its device is the CPU wherever the code
means "the data's device"). It enters the project's own `torch.library` ops
(namespace `maskrcnn`), running their Python bodies under the mode, so that what they do inside
counts too. Each record names the op and the source line that called it (the innermost frame
outside torch and this file), so that a test can print where a synchronisation came from.

On a CPU run the counter sees the same ops the GPU would run, provided the model is built with
the GPU's choices (`Runtime.gpu_path()`); copies to the CPU are then invisible (everything is on
the CPU already) except through the wrapped methods, and a GPU run under
`torch.cuda.set_sync_debug_mode("error")` covers the rest.
"""

import dataclasses
import traceback
from pathlib import Path

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops (overload packet names) that synchronise on CUDA whatever their arguments.
ALWAYS_SYNC = frozenset({
    "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "unique_dim_consecutive", "_local_scalar_dense", "masked_select", "bincount", "equal",
    "is_nonzero", "nms",
})
# Our ops' namespace: the counter runs their bodies under the mode.
OWN_NAMESPACE = "maskrcnn"
_TORCH_ROOT = Path(torch.__file__).parent
# Frames that are not the caller: torch, this file, the libraries our ops call into.
_SKIPPED_PREFIXES = (str(_TORCH_ROOT), str(Path(__file__)), "<frozen")
_SKIPPED_PARTS = ("/torchvision/", "/triton/")


@dataclasses.dataclass(frozen=True)
class HostSync:
    op: str
    where: str  # "path:line: source" of the caller

    def __str__(self) -> str:
        return f"{self.op} at {self.where}"


def _bool_index(indices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
               for t in indices if t is not None)


def _syncs(func, args, kwargs) -> bool:
    """Whether this call synchronises with the host on CUDA."""
    name = func.overloadpacket.__name__
    if name in ALWAYS_SYNC:
        return True
    if name == "repeat_interleave":
        # Tensor repeats: the output size is a sum over the repeats, unless given.
        repeats = args[0] if func._overloadname == "Tensor" else args[1]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name == "index" and len(args) > 1:
        return _bool_index(args[1])
    if name in ("index_put", "index_put_", "_index_put_impl", "_index_put_impl_"):
        return _bool_index(args[1])
    if name in ("_to_copy", "to", "copy_"):
        # A device -> CPU copy.
        source = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device")
        return (isinstance(source, torch.Tensor) and source.device.type != "cpu"
                and target is not None and torch.device(target).type == "cpu")
    return False


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if not name.startswith(_SKIPPED_PREFIXES) and not any(p in name for p in _SKIPPED_PARTS):
            return f"{name}:{frame.lineno}: {(frame.line or '').strip()}"
    return "<unknown>"


# Tensor methods that read a tensor on the host (on CUDA a device -> CPU copy).
_HOST_METHODS = ("tolist", "numpy", "cpu")


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as syncs:` ... then `syncs.found` lists every HostSync."""

    def __init__(self):
        super().__init__()
        self.found: list[HostSync] = []
        self._saved: dict = {}
        self._depth = 0

    def __enter__(self):
        if self._depth == 0:  # the outermost entry wraps the host-reading methods
            for method in _HOST_METHODS:
                self._saved[method] = original = getattr(torch.Tensor, method)
                setattr(torch.Tensor, method, self._recording(method, original))
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)

    def _recording(self, method: str, original):
        def wrapper(tensor, *args, **kwargs):
            self.found.append(HostSync(f"Tensor.{method}", _caller()))
            return original(tensor, *args, **kwargs)
        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == OWN_NAMESPACE:
            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        if _syncs(func, args, kwargs):
            self.found.append(HostSync(str(func), _caller()))
        return func(*args, **kwargs)

    def report(self) -> str:
        """One line per synchronisation, in call order."""
        return "\n".join(str(s) for s in self.found)
