# Tests see 4 CPU devices, so multi-device (pmap) logic runs on any machine. This must be
# set before jax is first imported.
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
