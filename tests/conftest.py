"""Test environment: set before JAX is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
os.environ["JAX_DEBUG_KEY_REUSE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tensorflow_datasets")
if os.path.isdir(_SHARED):
    os.environ.setdefault("TFDS_DATA_DIR", _SHARED)
# Resolved once, against the folder pytest was started from: notebooks' kernels and CLI children
# run in other folders and inherit the environment, so a relative `TFDS_DATA_DIR=../shared/...`
# (the README's test command) would name another folder there.
if os.environ.get("TFDS_DATA_DIR"):
    os.environ["TFDS_DATA_DIR"] = os.path.abspath(os.environ["TFDS_DATA_DIR"])

# The Ctrl-C tests send SIGINT to CLI subprocesses. A suite started with SIGINT ignored (under
# `nohup`, or `cmd &` from a script) passes that on to every child, and `jaxprune.main` rightly
# leaves an ignored SIGINT alone; restore the default here so those children can be interrupted.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
