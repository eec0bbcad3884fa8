import os

import pytest
import torch

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
