"""One short finetuning run that records what each process saw; test_finetune runs it under plain
python (one process) and under torchrun (two), then compares.

    python tests/_ddp_run.py OUT_DIR

Writes OUT_DIR/rank{r}.json (rank, world size, the global batch and this rank's rows of it, per step,
and the round history) and OUT_DIR/rank{r}.safetensors (this rank's final weights).
"""

import json
import sys
from pathlib import Path

import torch

from nsvit_fast import digits, load_model
from nsvit_fast.distributed import init_from_env, rank_world
from nsvit_fast.io import save_tensors
from nsvit_fast.train import engine as eng
from nsvit_fast.train import finetune

CONFIG = dict(method="ns", rounds=2, model_steps=3, batch_size=32, lr=1e-4, noise_init="fresh",
              synth={"lim": 3.0, "lim_unit": "abs", "max_steps": 200, "batch_size": 64, "heldout": 64})


def main(out: Path) -> None:
    torch.set_num_threads(1)
    distributed = init_from_env()
    rank, world = rank_world()
    train = digits("train").subset(256)
    steps = []
    real = eng.Engine.local_batch

    def local_batch(self):
        # the engine's own slicing, observed: the global batch it drew and the rows it returned
        drawn = []
        order = self.stream.stream  # the in-memory batches' BatchStream: the global batch's indices
        nxt = order.next
        order.next = lambda: drawn.append(nxt()) or drawn[-1]
        try:
            x, y = real(self)
        finally:
            del order.next
        glob = drawn[0].tolist()
        mine = [i for i in glob if any(torch.equal(train.images[i], row) for row in x)]
        steps.append({"global": glob, "mine": mine, "rows": x.shape[0]})
        return x, y

    eng.Engine.local_batch = local_batch
    try:
        res = finetune(load_model("digits_vit"), train, progress=False, **CONFIG)
    finally:
        eng.Engine.local_batch = real
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "steps": steps,
                                                      "history": res.history}))
    save_tensors(out / f"rank{rank}.safetensors", {k: v.contiguous() for k, v in res.parts.model.state_dict().items()})
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
