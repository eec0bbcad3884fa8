import os

import torch

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before triton
# is imported (torch does not import it); on a machine with CUDA the compiled kernels are tested
# on CUDA tensors instead (tests/test_ops.py picks each backend's device).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# subprocesses too: torch starts a thread per host core, not per CPU a container may use
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, len(os.sched_getaffinity(0))))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits_parts():
    from nsvit_fast import load_model

    return load_model("digits_vit")


@pytest.fixture(scope="session")
def digits_test():
    from nsvit_fast import digits

    return digits("test")
