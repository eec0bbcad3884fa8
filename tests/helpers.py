"""Hand computations and data writers shared by several test files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def eval_pixels(path, size, crop_pct, interpolation):
    """timm's eval transform by hand: shorter side to floor(size / crop_pct), centre crop, [0, 1]."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    short = int(size / crop_pct)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation])
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    img = img.crop((left, top, left + size, top + size))
    return torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255


def save_pixels(x, path, **save_kw):
    """A [0, 1] CHW tensor as an 8-bit image file (format from the suffix, e.g. .png lossless)."""
    from PIL import Image

    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path, **save_kw)


def write_digits_folder(root, split="train", n=320, suffix=".png", **save_kw):
    """The first ``n`` images of a digits split in ImageFolder layout, root/digit<label>/<i><suffix>
    (real data; JPEG with e.g. ``suffix=".JPEG", quality=90``). Returns root."""
    from nsvit_fast import digits

    ds = digits(split)
    for i in range(n):
        d = root / f"digit{int(ds.labels[i])}"
        d.mkdir(exist_ok=True)
        save_pixels(ds.images[i], d / f"{i}{suffix}", **save_kw)
    return root

# two local ranks: a free port (no fixed one that another run could hold) on 127.0.0.1 (not the
# host's FQDN, which need not resolve)
TORCHRUN2 = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2", "--standalone",
             "--local-addr=127.0.0.1"]


def run_forkrun(jobs: list[dict], *mode: str, timeout: int, **kw) -> list[int]:
    """tests/_forkrun.py over ``jobs`` (its cases); returns their exit codes. On a timeout the whole
    process group goes, so no forked case keeps the cores busy for the tests after it."""
    p = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_forkrun.py")), *mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(json.dumps(jobs), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == 0, err[-3000:]
    return json.loads(out)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for rank 0 of a by-hand launch)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, timeout: float = 120) -> None:
    """Until ``proc`` (rank 0) listens on ``port`` on 127.0.0.1; fails if it exits or ``timeout`` passes."""
    import socket
    import time

    t0 = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.time() - t0 < timeout and proc.poll() is None, "rank 0 never opened its port"
            time.sleep(0.1)


def spy_adamw(monkeypatch, key: str) -> list:
    """Record ``param_groups[0][key]`` (lr, weight_decay) at every AdamW step; returns the list."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0][key])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen
