import os

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before triton
# is imported; on a machine with CUDA the real kernels are tested instead.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits_parts():
    from nsvit_fast import load_model

    return load_model("digits_vit")


@pytest.fixture(scope="session")
def digits_test():
    from nsvit_fast import digits

    return digits("test")
