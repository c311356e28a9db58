"""TensorFlow, as every module of this project uses it: the TF1 graph-mode API of TensorFlow 2.

`from tf_compat import tf` is the only way a module here should reach TensorFlow. Switching v2
behaviour off has to happen once, before any graph is built, and importing this module is what
guarantees that ordering for every caller.

On a machine without an NVIDIA driver, a CUDA build of TensorFlow logs that it found no CUDA
driver and that cuInit failed, from C++ straight to file descriptor 2, at import and at the
first device query. Those lines look like errors and mean nothing there, so the import and a
first device query run with descriptor 2 captured, and everything but those lines is passed on.
With a driver nothing is captured: a GPU machine still logs its devices.

On such a CPU machine TensorFlow's start-up lines (CPU instruction notes, the absl notice, a
oneDNN line tagged E0000 that looks like an error, the deprecation note of switching v2 off) are
kept out too, and its C++ INFO lines are off by default (TF_CPP_MIN_LOG_LEVEL=1). A user who sets
TF_CPP_MIN_LOG_LEVEL gets every line as TensorFlow prints it.
"""

import contextlib
import ctypes.util
import os
import re
import sys
import tempfile

# Lines of TensorFlow's CUDA probe on a machine without a driver.
CUDA_PROBE_LINE = re.compile(rb'cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc|failed call to cuInit|'
                             rb'Could not find cuda drivers')


# TensorFlow's start-up lines on a CPU machine, kept out unless the user sets TF_CPP_MIN_LOG_LEVEL.
STARTUP_LINE = re.compile(rb'absl::InitializeLog|cpu_feature_guard\.cc|To enable the following instructions|oneDNN|'
                          rb'disable_resource_variables|^Instructions for updating|non-resource variables are not supported')


def has_nvidia_driver():
    return os.path.exists('/dev/nvidiactl') or ctypes.util.find_library('cuda') is not None


@contextlib.contextmanager
def without_lines(pattern):
    """Capture descriptor 2 for the duration, then write back every line but those pattern matches."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not pattern.search(line)]
            os.write(2, b''.join(kept))


def without_cuda_probe_lines():
    return without_lines(CUDA_PROBE_LINE)


def quiet_startup_pattern():
    """What to keep out of the start-up output: nothing with a GPU driver; the CUDA probe lines
    without one, and the start-up lines too unless the user set TF_CPP_MIN_LOG_LEVEL (which then
    rules); None = capture nothing."""
    if has_nvidia_driver():
        return None
    if 'TF_CPP_MIN_LOG_LEVEL' in os.environ:
        return CUDA_PROBE_LINE
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '1'
    return re.compile(CUDA_PROBE_LINE.pattern + b'|' + STARTUP_LINE.pattern)


_pattern = quiet_startup_pattern()
with contextlib.nullcontext() if _pattern is None else without_lines(_pattern):
    import tensorflow.compat.v1 as tf
    tf.config.list_physical_devices('GPU')     # the device query that calls cuInit, once per process
    tf.disable_v2_behavior()
