"""Copies between engine KV memory and tier slots: the synchronous span router (span_copy), the
asynchronous layer-wise copier (copier), CUDA DMA and kernels (cuda_copy, the only CuPy importer;
cudart, ctypes bindings; kv_copy.cu, compiled at run time), the cost model (cost) and the torch
reference (torch_ref). Importing this package imports neither torch nor CuPy."""
