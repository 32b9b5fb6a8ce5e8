"""The wgmma building blocks (kernels_cu/common/wgmma.cuh) on their own: descriptors, the WgTile
shared-memory layout and the accumulator/operand fragment layouts, checked against torch through
the test kernel kernels_cu/wgmma_probe.cu. It compiles for sm_90a anywhere (NVRTC needs no GPU) and
runs on a compute-capability-9.0 GPU."""
import pytest
import torch

from flashtree import _jit

_PARAMS = _jit.param_layout("QQQ QQ")


def probe_spec(dtype: torch.dtype, d: int) -> _jit.KernelSpec:
    return _jit.KernelSpec(family="wgmma_probe", kernel="ft::wgmma_probe_kernel",
                           template_args=(_jit.ctype(dtype), d), name=f"wgmma_probe_{_jit.short(dtype)}_d{d}",
                           arch_suffix="a", archs=("sm_90",))


@pytest.mark.parametrize("d", [64, 128])
def test_probe_compiles_for_sm90a_without_spills(d, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHTREE_CACHE_DIR", str(tmp_path))
    spec = probe_spec(torch.bfloat16, d)
    assert spec.target("sm_90") == "sm_90a" and spec.target("sm_80") is None
    kernel, cached = _jit.load_or_compile(spec, "sm_90a")
    assert not cached and kernel.resources.spills == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_wgmma_products_match_torch(dtype, d, gen):
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) != (9, 0):
        pytest.skip("wgmma needs compute capability 9.0")
    q, k, v = (torch.randn(64, d, generator=gen).to(device, dtype) for _ in range(3))
    s_out = torch.full((64, 64), float("nan"), device=device)
    o_out = torch.full((64, d), float("nan"), device=device)
    kernel = _jit.get_kernel(probe_spec(dtype, d), device)
    kernel.launch((1, 1, 1), (128, 1, 1), _PARAMS,
                  (q.data_ptr(), k.data_ptr(), v.data_ptr(), s_out.data_ptr(), o_out.data_ptr()),
                  smem=3 * 64 * d * 2 + 1024)
    s_ref = q.double() @ k.double().T
    torch.testing.assert_close(s_out.double(), s_ref, rtol=1e-5, atol=1e-3 * d ** 0.5)
    o_ref = s_out.to(dtype).double() @ v.double()  # the kernel's own S, rounded as its P operand
    torch.testing.assert_close(o_out.double(), o_ref, rtol=1e-5, atol=1e-3 * d)
