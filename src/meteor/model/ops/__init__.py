"""Custom ops. The Mamba-1 selective scan: a readable reference, a fused CPU kernel (C++, JIT-built per
instruction set), a pure-PyTorch fallback, and mamba_ssm's CUDA kernel when present. See
``selective_scan.py`` and ``_build.py``."""

from meteor.model.ops._build import ISA_ENV_VAR, build_extension
from meteor.model.ops.selective_scan import ENV_VAR, scan_backend, scan_isa, selective_scan, selective_scan_ref

__all__ = ["ENV_VAR", "ISA_ENV_VAR", "build_extension", "scan_backend", "scan_isa", "selective_scan",
           "selective_scan_ref"]
