"""The applications as files: watermark (App. E), targeted noise (App. F) and fingerprints.

Each ``run_*`` function reads its inputs, runs the computation of :mod:`.edit` or
:mod:`.fingerprint`, writes its image, figure and JSON atomically (``nsvit_fast.io``) and returns
the JSON's contents. The ``watermark``, ``targeted`` and ``fingerprint`` commands call these and
only print what they return, so the command line and the API write the same files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NsvitError
from ..io import check_distinct, check_output_dir, check_output_file, staged_writes, write_json
from ..viz import image_grid
from .edit import targeted, watermark
from .fingerprint import Fingerprint, make_fingerprint, verify
from .images import load_pair, save_image
from .saliency import METHODS, saliency



def beside_files(out) -> tuple[Path, Path]:
    """The files run_watermark and run_targeted write beside their PNG."""
    out = Path(out)
    return out.with_suffix(".json"), out.with_name(out.stem + "_figure.png")

def _numbers(result: dict) -> dict:
    """The JSON-able part of an edit's result: everything but its tensors."""
    return {k: v for k, v in result.items() if not hasattr(v, "shape")}


def _model_record(parts) -> dict:
    """Which model made a result file: its name and weights fingerprint."""
    from ..models import weights_fingerprint

    return {"model": parts.name, "model_weights": weights_fingerprint(parts)}


@staged_writes()  # its files all new or all as they were: an interrupted run mixed two runs' files
def run_watermark(parts, image: str, out: str | Path, mark: str = "logo", strength: float = 0.5,
                  iters: int = 100) -> dict:
    """Draw ``mark`` over ``image`` through the nullspace (:func:`.edit.watermark`) and write files.

    Args:
        parts: the model's adapter.
        image: an image file or ``skimage:NAME``; resized to the model's input size.
        out: the marked image, an 8-bit PNG (so a ``.png`` name). Beside it: ``<stem>.json`` (this
            function's return value) and ``<stem>_figure.png`` (image, target, marked, noise).
        mark: an image of the same size as ``image``, or ``logo`` (white "NS" on black).
        strength: weight of the mark in the target (1 - s) image + s mark, in (0, 1].
        iters: Dykstra iterations for the [0, 1] box.

    Returns:
        {"model", "model_weights", "image", "mark", "strength", "iters", "psnr_to_target",
        "psnr_to_image", "psnr_target_to_image",
        "box_violation", "float": {...}, "png_8bit": {...}}; the last two hold the invariance
        numbers (``patch_embed_rel``, ``logits_rel``, ``predictions_match``) of the float result and
        of the saved 8-bit PNG.

    Raises:
        NsvitError: an output name not ending in .png or not writable, an unreadable image, a mark of
            another size, a strength outside (0, 1], or a model without a nullspace.
    """
    out = check_output_file(out, (".png",), "out", siblings=beside_files(out))
    check_distinct({"out": out, **dict(zip(("its .json", "its _figure.png"), beside_files(out)))},
                   {"image": image, "mark": mark})
    x, m = load_pair(parts, image, mark)
    r = watermark(parts, x, m, strength, iters)
    save_image(r["marked"][0], out)
    res = {**_model_record(parts), "image": str(image), "mark": str(mark), "strength": strength, "iters": iters,
           **_numbers(r)}
    write_json(out.with_suffix(".json"), res)
    v = r["noise"][0]  # zero when the mark is the image: the clamp keeps its panel grey, not NaN (0/0)
    image_grid([[(x[0], "image"), (r["target"][0], f"target ({strength:g} mark)"),
                 (r["marked"][0], f"marked, PSNR {r['psnr_to_target']:.1f} dB to target"),
                 (0.5 + v / (2 * v.abs().max().clamp_min(1e-12)), "nullspace noise (scaled)")]],
               out.with_name(out.stem + "_figure.png"), title=f"{parts.name}: watermark through the nullspace")
    return res


@staged_writes()  # its files all new or all as they were: an interrupted run mixed two runs' files
def run_targeted(parts, source: str, target: str, out: str | Path, iters: int = 100,
                 maps: tuple[str, ...] | list[str] = METHODS) -> dict:
    """An image that looks like ``target`` but is ``source`` to the model (:func:`.edit.targeted`),
    written with a figure of saliency maps.

    Args:
        parts: the model's adapter.
        source, target: image files or ``skimage:NAME`` (any sizes; both resized to the model's).
        out: the result, an 8-bit PNG (so a ``.png`` name). Beside it: ``<stem>.json`` (this
            function's return value) and ``<stem>_figure.png`` (source, target, result with their
            predicted classes, then one row of maps per method in ``maps``, all for the source's class).
        iters: Dykstra iterations for the [0, 1] box.
        maps: saliency methods to draw, each one of :data:`.saliency.METHODS`; may be empty.

    Returns:
        {"model", "model_weights", "source", "target", "iters", "box_violation",
        "l2_result_to_target", "l2_source_to_target",
        "l2_result_to_source", "psnr_result_to_target", "logits_rel_to_source",
        "predictions_match_source", "png_8bit": {...}}.

    Raises:
        NsvitError: an unknown saliency method (before any work), an output name not ending in .png
            or not writable, an unreadable image, or a model without a nullspace.
    """
    bad = [m for m in maps if m not in METHODS]
    if bad:
        raise NsvitError(f"unknown saliency method {bad[0]!r} (methods: {', '.join(METHODS)})")
    out = check_output_file(out, (".png",), "out", siblings=beside_files(out))
    check_distinct({"out": out, **dict(zip(("its .json", "its _figure.png"), beside_files(out)))},
                   {"source": source, "target": target})
    a, b = load_pair(parts, source, target, same_size=False)
    r = targeted(parts, a, b, iters)
    save_image(r["result"][0], out)
    with torch.no_grad():
        za, zb, zr = parts(a), parts(b), parts(r["result"])
    rows = [[(a[0], f"source: class {int(za.argmax())}"), (b[0], f"target: class {int(zb.argmax())}"),
             (r["result"][0], f"result: class {int(zr.argmax())}")]]
    cls = za.argmax(-1)
    shown = r["result"].clamp(0, 1)  # Dykstra leaves the box by up to box_violation (1e-4): saliency takes pixels
    for m in maps:
        rows.append([(saliency(parts, img, m, target=cls)[0], m) for img in (a, b, shown)])
    image_grid(rows, out.with_name(out.stem + "_figure.png"),
               title=f"{parts.name}: targeted nullspace noise (columns: source, target, result)")
    res = {**_model_record(parts), "source": str(source), "target": str(target), "iters": iters, **_numbers(r)}
    write_json(out.with_suffix(".json"), res)
    return res


@staged_writes()  # its files all new or all as they were: an interrupted run mixed two runs' files
def run_fingerprint_make(parts, images: torch.Tensor, fingerprint: str | Path, report: str | Path,
                         n: int = 64, scale: float = 2.0, seed: int = 0) -> dict:
    """Make a fingerprint of ``parts`` (:func:`.fingerprint.make_fingerprint`), save it, check the
    owner against it, and write the report.

    Args:
        parts: the owner's adapter.
        images: (N, C, H, W) pixels in [0, 1] to draw the challenges from (or an ImageDataset).
        fingerprint: the fingerprint file to write (``.safetensors``).
        report: folder receiving ``fingerprint_make.json`` (this function's return value) and
            ``fingerprint_make.png`` (three challenges, with nullspace and control noise added).
        n, scale, seed: as :func:`.fingerprint.make_fingerprint`.

    Returns:
        {"fingerprint": path, the fingerprint's meta ("owner", "arch", "owner_weights", "n", "scale",
        "seed", "nullspace_dim", "threshold", "input_size", "digest"), "owner_check": the owner's
        :func:`.fingerprint.verify` result}.

    Raises:
        NsvitError: a fingerprint name not ending in .safetensors, an unwritable path, images not in
            [0, 1], n < 1, scale <= 0 or > 1e3, a model without a nullspace, or an owner that does not
            verify against its own fingerprint (nothing is written then).
    """
    rep = check_output_dir(report, "report", files=("fingerprint_make.json", "fingerprint_make.png"))
    path = check_output_file(fingerprint, (".safetensors",), "fingerprint")
    fp = make_fingerprint(parts, getattr(images, "images", images), n=n, scale=scale, seed=seed)
    own = verify(parts, fp)
    if not own["verified"]:  # a file its own owner fails is no fingerprint: nothing is written
        raise NsvitError(f"{parts.name} does not verify against its own fingerprint (score {own['score']:.3g}, "
                         f"threshold {own['threshold']}): try a smaller scale or other images")
    fp.save(path)
    res = {"fingerprint": str(fingerprint), **fp.meta, "owner_check": own}
    write_json(rep / "fingerprint_make.json", res)

    def show(t):  # noisy challenges leave [0, 1]: min-max scaled for display
        return (t - t.min()) / (t.max() - t.min())

    with torch.no_grad():
        rows = []
        for i in range(min(3, fp.images.shape[0])):
            x = fp.images[i]
            pred = [int(parts(t[None]).argmax()) for t in (x, x + fp.noise[i], x + fp.control[i])]
            rows.append([(x, f"challenge: class {pred[0]}"), (show(x + fp.noise[i]), f"+ nullspace: class {pred[1]}"),
                         (show(x + fp.control[i]), f"+ control: class {pred[2]}")])
    image_grid(rows, rep / "fingerprint_make.png",
               title=f"{parts.name}: fingerprint challenges (noisy images rescaled for display)")
    return res


def run_fingerprint_verify(parts, fingerprint: str | Path, report: str | Path, threshold: float | None = None,
                           expect_digest: str | None = None, checkpoint: str | None = None) -> dict:
    """Score a suspect against a fingerprint file (:func:`.fingerprint.verify`) and write the report.

    Args:
        parts: the suspect's adapter.
        fingerprint: a file written by :func:`run_fingerprint_make`; read and checked by
            :meth:`.fingerprint.Fingerprint.load` (with ``expect_digest``).
        report: folder receiving ``fingerprint_verify.json`` (this function's return value).
        threshold: decision threshold in (0, 1); None: the fingerprint's own.
        expect_digest: refuse a fingerprint whose digest is not this one.
        checkpoint: the suspect's checkpoint path, recorded in the report (None: not recorded).

    Returns:
        {"fingerprint", "suspect": the model's name, "checkpoint", "score", "nullspace_change",
        "control_change", "prediction_agreement", "threshold", "verified": score < threshold}.

    Raises:
        NsvitError: an unreadable, edited or unexpected fingerprint, a threshold outside (0, 1), a
            suspect of another input size, or an unwritable report folder.
    """
    rep = check_output_dir(report, "report", files=("fingerprint_verify.json",))
    fp = Fingerprint.load(fingerprint, expect_digest)
    r = verify(parts, fp, threshold)
    res = {"fingerprint": str(fingerprint), "suspect": parts.name, "checkpoint": checkpoint, **r}
    write_json(rep / "fingerprint_verify.json", res)
    return res


FINGERPRINT_ACTIONS = {"make": run_fingerprint_make, "verify": run_fingerprint_verify}  # ``nsvit-fast fingerprint ACTION``
