"""Run on 2 ranks (tests/test_finetune.py): each rank measures its held-out decisions on *other*
images, as a GPU could give two ranks sums that differ in the last bit. Synthesis must still take
the same decisions on every rank (growth searches, held-out confirmation, boundary scan, the
scale to ε of random.match=eps), or it hangs in an all-reduce or trains each rank on its own
noise. Saves each rank's noises."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from nsvit_fast import digits, load_model
from nsvit_fast.distributed import init_from_env, rank_world
from nsvit_fast.synth import CleanCache, scale_to_eps, synthesize

out = sys.argv[1]
assert init_from_env("cpu")
rank, world = rank_world()
model = load_model("digits_vit")
train = digits("train").images[:64]
held = digits("val").images[32 * rank:32 * rank + 32]  # a different held-out set per rank
base = dict(eps=0.03, lim=6.0, lim_unit="token_rms", lr=0.1, batch_size=32, max_steps=40, heldout_every=2,
            seed=3, boundary_iters=3)
torch.manual_seed(0)
warm = synthesize(model, train, heldout_data=held, progress=False, **base).noises[0]
runs = {
    "boundary": {"schedule": "boundary", "lim": 2.0, "lr": 0.02, "max_steps": 120},  # held-out stop (confirmation) and the boundary scan
    "secant": {"init_scale": "boundary", "grow_search": "secant"},
    "walk": {"init_scale": "boundary", "grow_search": "walk"},
}
saved = {}
for name, kw in runs.items():
    bank = synthesize(model, train, heldout_data=held, progress=False,
                      init=None if name == "boundary" else warm, **{**base, **kw})
    saved[name] = bank.noises.contiguous()
    saved[name + "_steps"] = bank.steps.contiguous()
# random.match=eps: the scale that puts a noise just inside ε, searched on each rank's held-out images
s, e = scale_to_eps(model, warm, CleanCache(model, held), 0.03)
saved["eps_scale"] = torch.tensor([s, e], dtype=torch.float64)
save_file(saved, f"{out}/rank{rank}.safetensors")
dist.destroy_process_group()
