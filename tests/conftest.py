"""Test-session settings: JAX on the CPU with two fake devices and the CPU
convolution flag of ``gcgd_jax.train.xla_flags`` (set before JAX starts)."""

import os

_FLAGS = (
    "--xla_force_host_platform_device_count=2",
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing, *(f for f in _FLAGS if f not in _existing)]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
