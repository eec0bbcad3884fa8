"""What the benchmark scripts share: their argument parser and argument types (a bad value is one
error line, ``<script>: error: ...``, and exit 2 before anything runs, as in the CLI), the
--device / --precision flags resolved through nsvit_fast.runtime, the machine line, the GPU sync a
timer needs, and the ns finetuning step the engine runs.

The scripts run as ``python bench/<script>.py``, so this file is importable as ``common``.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from nsvit_fast.cli import POSITIVE, SEED, count, listof, number, one_of
from nsvit_fast.errors import NsvitError
from nsvit_fast.io import check_output_dir, write_json, write_text
from nsvit_fast.runtime import Runtime


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``<script>: error: ...`` and exit 2, no usage block.
    A bench run can take an hour, so every argument is checked here, before the first one. Flags are
    never abbreviated: ``--precision`` was read as bench_precision's ``--precisions``. ``doc``: the
    script's docstring, whose first paragraph is the --help description (its first line was cut
    mid-sentence)."""

    def __init__(self, *args, doc: str | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        if doc is not None:
            kwargs.setdefault("description", " ".join(doc.strip().split("\n\n")[0].split()))
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        first = (message.strip().splitlines() or ["bad arguments"])[0]
        self.exit(2, f"{self.prog}: error: {first} (see {self.prog} --help)\n")

    def check(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, with an NsvitError (a bad config key, say) as this parser's error line."""
        try:
            return fn(*args, **kwargs)
        except NsvitError as e:
            self.error(str(e))

    def runtime(self, device: str, precision: str = "fp32") -> Runtime:
        """The engines' Runtime for --device / --precision; a bad one (or CUDA asked for on a machine
        without it) is this parser's error line."""
        return self.check(Runtime.create, device, precision)


def out_dir(text: str) -> Path:
    """An output folder that exists or can be made, and can be written (argparse type). An empty
    or blank name is refused: '' was the working directory (an unset shell variable)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"--out {text!r} is empty: name a folder")
    try:
        return check_output_dir(text, what="folder")
    except NsvitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seeds(text: str) -> list[int]:
    """Comma-separated seeds >= 0, none twice (argparse type)."""
    return listof(SEED, "seeds >= 0")(text)


def add_runtime_args(ap: argparse.ArgumentParser, precision: bool = True) -> None:
    """--device and (unless the script takes several precisions) --precision, with the engines' choices."""
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA when available)")
    if precision:
        ap.add_argument("--precision", default="fp32", help="fp32, tf32, bf16 or fp16 (autocast of the model)")


RESULTS_ROOT = Path(__file__).resolve().parent / "results"  # the committed results


def check_quick_out(ap: argparse.ArgumentParser, args) -> None:
    """Refuse a ``--quick`` smoke run whose results would land among the committed ones (the default
    --out replaced bench/results/cpu/synth.json, which the README quotes, with numbers that measure
    nothing)."""
    out = Path(args.out).resolve()
    if args.quick and (out == RESULTS_ROOT or RESULTS_ROOT in out.parents):
        ap.error(f"--quick is a smoke run whose numbers measure nothing: give an --out outside {RESULTS_ROOT}")


QUICK_NOTE = "**Smoke run (`--quick`): tiny settings, one repeat. These numbers measure nothing.**\n\n"


def write_results(out: Path, stem: str, data: dict, md: str) -> None:
    """``out/stem.json`` and ``out/stem.md`` (atomic writes), and the table on stdout. A ``--quick``
    run (``data["quick"]``) says so at the top of the .md: its JSON said so, its table did not."""
    if data.get("quick"):
        md = QUICK_NOTE + md
    write_json(out / f"{stem}.json", data)
    write_text(out / f"{stem}.md", md)
    print(md)
    print(f"written: {out / stem}.json, .md")


def sync(rt: Runtime) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on the CPU)."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what platform reports."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_line() -> str:
    """``CPU (model, N cores)``: what a CPU timing is labelled with, in every script."""
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores)"


def machine_line(rt: Runtime) -> str:
    """The device (GPU name, or CPU model and cores), torch version and CPU threads, for a results header."""
    if rt.device.type == "cuda":
        return f"{torch.cuda.get_device_name(rt.device)}, torch {torch.__version__}"
    return f"{cpu_line()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def ns_step(parts, opt, x, y, v, rt: Runtime, fused: bool = True) -> None:
    """One ns finetuning step under ``rt``'s precision: CE on the clean and the noisy view, backward,
    ``opt.step()``. ``fused`` runs both views as one 2B batch (``fused_views``, what the engine runs);
    otherwise the patch embedding and encoder run twice, as in the official code. The caller puts
    ``parts`` in train mode and wraps the steps in ``rt.matmul_mode()``."""
    from nsvit_fast.train.methods.ns import fused_views

    with rt.autocast():
        if fused:
            z, zn = fused_views(parts, x, v)
        else:
            z = parts.encode(parts.patch_embed(x))
            zn = parts.encode(parts.patch_embed(x) + v)
        loss = F.cross_entropy(z.float(), y) + F.cross_entropy(zn.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


__all__ = ["Parser", "out_dir", "seeds", "check_quick_out", "POSITIVE", "SEED", "count", "listof", "number", "one_of",
           "add_runtime_args", "sync", "cpu_model", "cpu_line", "machine_line", "ns_step"]
