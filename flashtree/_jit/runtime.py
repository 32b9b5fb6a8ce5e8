"""Loading compiled kernels into a GPU's context and launching them on torch's stream.

Everything here goes through CuPy: ``cupy.cuda.function.Module`` loads the cached cubin, and
``cupy.cuda.driver.launchKernel`` launches it on torch's current stream of the kernel's device,
read on every call. Arguments are raw pointers (``np.uint64``) and explicitly typed scalars
(``np.int32``, ``np.int64``, ``np.float32``), packed into one parameter buffer with ``struct``
(the layout is derived once per argument-type signature): a launch costs a few microseconds of
host time, where a generic per-argument launch costs about one microsecond per argument.
Nothing here allocates GPU memory or synchronises with the host.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import struct
import threading

import numpy as np

import torch

from .cache import load_or_compile
from .nvrtc import CompiledKernel, nvrtc_module
from .spec import KernelSpec

_lock = threading.Lock()
_compiled: dict[tuple[KernelSpec, str], CompiledKernel] = {}
_loaded: dict[tuple[KernelSpec, int], "LoadedKernel"] = {}

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _installed_cupy_dists() -> list[str]:
    names = []
    for dist in ("cupy-cuda12x", "cupy-cuda13x", "cupy"):
        try:
            importlib.metadata.version(dist)
            names.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return names


@functools.cache
def check_toolchain(need_torch_cuda: bool = True) -> dict:
    """Fail early and clearly when CuPy is missing or the CUDA majors disagree.

    Returns the versions found. CPU tensors never come here.
    """
    dists = _installed_cupy_dists()
    if len(dists) > 1:
        raise RuntimeError(
            f"several CuPy packages are installed ({', '.join(dists)}); keep the one that matches "
            "torch's CUDA: pip uninstall the others"
        )
    try:
        import cupy
    except ImportError as e:
        raise ImportError(
            "flashtree needs CuPy for CUDA tensors and it is not installed: "
            "pip install 'flashtree[cu12]' (CUDA 12) or 'flashtree[cu13]' (CUDA 13). "
            "CPU tensors work without it."
        ) from e
    nvrtc_major, nvrtc_minor = nvrtc_module().getVersion()
    cupy_cuda = cupy.cuda.runtime.runtimeGetVersion()
    versions = {
        "cupy": cupy.__version__,
        "cupy_cuda": f"{cupy_cuda // 1000}.{cupy_cuda % 1000 // 10}",
        "nvrtc": f"{nvrtc_major}.{nvrtc_minor}",
        "torch_cuda": torch.version.cuda,
    }
    majors = {"cupy": cupy_cuda // 1000, "NVRTC": nvrtc_major}
    if need_torch_cuda and torch.version.cuda:
        majors["torch"] = int(torch.version.cuda.split(".")[0])
    if len(set(majors.values())) > 1:
        found = ", ".join(f"{k} CUDA {v}" for k, v in majors.items())
        raise RuntimeError(
            f"CUDA major versions disagree ({found}); install the flashtree extra that matches "
            f"torch: 'flashtree[cu{majors.get('torch', nvrtc_major)}]'"
        )
    return versions


def device_arch(device: torch.device, suffix: str = "") -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}{suffix}"


def compiled(spec: KernelSpec, arch: str) -> CompiledKernel:
    """Compile (or read from disk) once per (spec, arch) per process."""
    key = (spec, arch)
    kernel = _compiled.get(key)
    if kernel is None:
        with _lock:
            kernel = _compiled.get(key)
            if kernel is None:
                kernel, _ = load_or_compile(spec, arch)
                _compiled[key] = kernel
    return kernel


class LoadedKernel:
    """A kernel loaded into one device's primary context, ready to launch."""

    def __init__(self, kernel: CompiledKernel, device_index: int):
        import cupy

        self.kernel = kernel
        self.device_index = device_index
        with cupy.cuda.Device(device_index):
            self._module = cupy.cuda.function.Module()
            self._module.load(kernel.cubin)
            self._function = self._module.get_function(kernel.lowered_name)
        self._max_dynamic_smem = 48 * 1024

    def param_offset(self, index: int) -> int:
        """Byte offset of parameter ``index`` in the kernel's parameter buffer (cuFuncGetParamInfo):
        a parameter aligned beyond 8 bytes (a 64-byte-aligned tensor map) may start past 0."""
        offset, size = ctypes.c_size_t(), ctypes.c_size_t()
        err = ctypes.CDLL("libcuda.so.1").cuFuncGetParamInfo(
            ctypes.c_void_p(self._function.ptr), ctypes.c_size_t(index), ctypes.byref(offset), ctypes.byref(size))
        if err != 0:
            raise RuntimeError(f"cuFuncGetParamInfo failed (CUresult {err}) for {self.kernel.lowered_name}")
        return offset.value

    def _allow_dynamic_smem(self, nbytes: int) -> None:
        # Above 48 KB a kernel must opt in; done once per size increase, before any launch.
        import cupy

        with cupy.cuda.Device(self.device_index):
            cupy.cuda.driver.funcSetAttribute(
                self._function.ptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes
            )
        self._max_dynamic_smem = nbytes

    def __call__(self, grid, block, args, *, smem: int = 0) -> None:
        """Launch on the current torch stream of this kernel's device (numpy-typed arguments)."""
        types = tuple(map(type, args))
        packer = _packers.get(types)
        if packer is None:
            packer = _packers.setdefault(types, _packer(types))
        self.launch(grid, block, packer, args, smem=smem)

    def launch(self, grid, block, layout: struct.Struct, args, *, smem: int = 0, dependent: bool = False) -> None:
        """Launch with plain Python ints and floats packed by ``layout`` (see ``param_layout``):
        the hot-path form, with no numpy scalar per argument.

        ``dependent``: a programmatic dependent launch (compute capability >= 9.0, else a plain one).
        The kernel may start before the previous kernel on the stream has finished, once every CTA
        of that kernel has executed ``griddepcontrol.launch_dependents`` or exited; it must execute
        ``griddepcontrol.wait`` before it reads anything that kernel writes (kernels_cu: ``pdl_wait``)."""
        if smem > self._max_dynamic_smem:
            self._allow_dynamic_smem(smem)
        buffer, extra = _param_buffer(layout)
        layout.pack_into(buffer, 0, *args)  # the driver copies the parameters during the launch call
        launch = self._launch_dependent if dependent and self._pdl else self._launch
        if _current_device() != self.device_index:
            with torch.cuda.device(self.device_index):  # the module lives in that device's context
                launch(grid, block, smem, extra)
        else:
            launch(grid, block, smem, extra)

    def _launch(self, grid, block, smem, extra: int) -> None:
        _driver().launchKernel(self._function.ptr, *grid, *block, smem, current_stream(self.device_index), 0, extra)

    @functools.cached_property
    def _pdl(self) -> bool:
        return device_properties(self.device_index).major >= 9

    def _launch_dependent(self, grid, block, smem, extra: int) -> None:
        config, address = _pdl_config()
        _LAUNCH_CONFIG.pack_into(config, 0, *grid, *block, smem, current_stream(self.device_index),
                                 address + _LAUNCH_CONFIG.size, 1)
        err = _launch_kernel_ex()(address, self._function.ptr, None, extra)
        if err != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed (CUresult {err}) for {self.kernel.lowered_name}")


# cuLaunchKernelEx through ctypes (as tma.py's cuTensorMapEncodeTiled), with one attribute:
# programmatic stream serialization. Per thread, one buffer holds the CUlaunchConfig (grid, block,
# shared memory, stream, the attribute array's address, its length), packed per launch by one
# struct call, then the CUlaunchAttribute (id, 4 bytes of padding, a 64-byte value).
_LAUNCH_CONFIG = struct.Struct("<7I4xQQI4x")  # 56 bytes
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


def _pdl_config() -> tuple[ctypes.Array, int]:
    entry = getattr(_tls, "pdl_config", None)
    if entry is None:
        buffer = ctypes.create_string_buffer(_LAUNCH_CONFIG.size + 72)
        struct.pack_into("<i4xi", buffer, _LAUNCH_CONFIG.size,  # the value: programmaticStreamSerializationAllowed = 1
                         _CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1)
        entry = _tls.pdl_config = (buffer, ctypes.addressof(buffer))
    return entry


@functools.cache
def _launch_kernel_ex():
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]  # ints pass as they are
    return fn


_tls = threading.local()  # one parameter buffer per layout and thread: packing never races a launch


def _param_buffer(layout: struct.Struct) -> tuple[ctypes.Array, int]:
    """(buffer, address of the cuLaunchKernel ``extra`` array pointing at it) for ``layout``."""
    cache = getattr(_tls, "buffers", None)
    if cache is None:
        cache = _tls.buffers = {}
    entry = cache.get(layout)
    if entry is None:
        buffer = ctypes.create_string_buffer(max(1, layout.size))
        size = ctypes.c_size_t(layout.size)
        extra = (ctypes.c_void_p * 5)(
            _CU_LAUNCH_PARAM_BUFFER_POINTER, ctypes.addressof(buffer),
            _CU_LAUNCH_PARAM_BUFFER_SIZE, ctypes.addressof(size), _CU_LAUNCH_PARAM_END,
        )
        entry = cache[layout] = (buffer, ctypes.addressof(extra), size, extra)  # keeps size, extra alive
    return entry[0], entry[1]


@functools.cache
def _driver():
    from cupy.cuda import driver

    return driver


_CU_LAUNCH_PARAM_END, _CU_LAUNCH_PARAM_BUFFER_POINTER, _CU_LAUNCH_PARAM_BUFFER_SIZE = 0, 1, 2
_FORMATS = {np.uint64: "Q", np.int64: "q", np.int32: "i", np.uint32: "I", np.float32: "f"}
_packers: dict[tuple[type, ...], struct.Struct] = {}


def _packer(types: tuple[type, ...]) -> struct.Struct:
    """The parameter layout for arguments of these numpy scalar types."""
    codes = []
    for t in types:
        code = _FORMATS.get(t)
        if code is None:
            raise TypeError(f"kernel argument: expected one of {sorted(c.__name__ for c in _FORMATS)}, got {t.__name__}")
        codes.append(code)
    return param_layout("".join(codes))


def param_layout(codes: str) -> struct.Struct:
    """The kernel-parameter buffer for a parameter list written as struct codes, one per parameter
    ('Q' pointer, 'q' int64, 'i' int32, 'I' uint32, 'f' float32): each value at an offset aligned
    to its size, the C ABI of a kernel's parameter list."""
    fmt, offset = "<", 0
    for code in codes.replace(" ", ""):
        size = struct.calcsize(code)
        pad = -offset % size
        fmt += "x" * pad + code
        offset += pad + size
    return struct.Struct(fmt)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def current_stream(device_index: int) -> int:
    """torch's current stream on the device, as a raw handle (read on every launch)."""
    if _raw_stream is not None:
        return _raw_stream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


@functools.cache
def device_properties(index: int):
    """torch's properties of CUDA device ``index`` (read once per device)."""
    return torch.cuda.get_device_properties(index)


def num_sms(device: torch.device) -> int:
    """The multiprocessor count of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device_properties(index).multi_processor_count


def get_kernel(spec: KernelSpec, device: torch.device) -> LoadedKernel:
    """The launchable kernel for ``spec`` on ``device``: compiled, cached and loaded once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (spec, index)
    loaded = _loaded.get(key)
    if loaded is None:
        check_toolchain()
        kernel = compiled(spec, device_arch(torch.device("cuda", index), spec.arch_suffix))
        with _lock:
            loaded = _loaded.get(key)
            if loaded is None:
                loaded = _loaded[key] = LoadedKernel(kernel, index)
    return loaded
