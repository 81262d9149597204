"""Copies between engine KV memory and tier slots: the one asynchronous copier (copier) and its
transfer handles (transfer), the host transfer threads it runs CPU copies on (host_stream), CUDA
DMA and kernels (cuda_copy, the only CuPy importer; cudart, ctypes bindings; kv_copy.cu, package
data compiled at run time), pinning host memory (pinning), the blocking span router (span_copy),
the cost model (cost) and the torch reference (torch_ref). Importing this package imports neither
torch nor CuPy."""
