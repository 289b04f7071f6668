"""Custom ops. The Mamba-1 selective scan: a readable reference, a fused CPU kernel (C++, JIT-built),
a pure-PyTorch fallback, and mamba_ssm's CUDA kernel when present. See ``selective_scan.py``."""

from meteor.model.ops._build import build_extension
from meteor.model.ops.selective_scan import ENV_VAR, selective_scan, selective_scan_ref, scan_backend

__all__ = ["ENV_VAR", "build_extension", "scan_backend", "selective_scan", "selective_scan_ref"]
