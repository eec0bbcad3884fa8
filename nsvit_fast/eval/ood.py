"""Out-of-distribution test folders: ImageNet-A, -R, -V2, -Sketch, Stylized-ImageNet, DamageNet.

Each is an ImageFolder tree (``root/<class>/<image>``) whose class folder names are the model's
class names (ImageNet wnids such as n01440764 for 1000-class models, taken from timm's ImageNet
info; give ``model_classes`` for other models). Images are streamed through the model's pixel
transform, so folders of any size work. ImageNet-A and -R hold 200 of the 1000 classes: the logits
are masked to the classes the folder holds (argmax over those), as their authors evaluate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NsvitError
from .accuracy import check_logits, eval_mode

SUITES = {"imagenet-a": 200, "imagenet-r": 200, "imagenet-v2": None, "imagenet-sketch": None,
          "stylized": None, "damagenet": None}  # expected class count (None: all of the model's)
PRECROPPED = ("stylized", "imagenet-c")  # stored at 224 px: centre crop only, as their official evaluations


def model_class_names(parts, model_classes: list[str] | None = None) -> list[str]:
    """The names of the model's K outputs, in order: ``model_classes`` when given, else
    ``data.folders.known_class_names`` (digits_vit's "0"-"9", timm's ImageNet synsets for a
    1000-class model). Raises NsvitError for any other model
    without ``model_classes``, and for ``model_classes`` that do not name each output once."""
    if model_classes is not None:
        names = list(model_classes)
        if len(names) != parts.num_classes or len(set(names)) != len(names):
            raise NsvitError(f"model_classes: {len(names)} names ({len(set(names))} distinct) for {parts.name}'s "
                             f"{parts.num_classes} outputs; give one name per output, in output order")
        return names
    from ..data.folders import known_class_names

    known = known_class_names(parts)  # the same rule as training folders: digits_vit's digits, ImageNet's synsets
    if known is not None:
        return known
    raise NsvitError(f"{parts.name} has {parts.num_classes} classes: give the model's class names "
                     f"(model_classes) to map folder names to its outputs")


def index_folders(suite: str, classes: list[str], names: list[str]) -> list[int] | None:
    """The output index of each class folder for ImageNet-V2 as its authors release it: folders
    named "0"-"999", ImageNet's class indices (timm's wnid order), mapped through the model's own
    class names (``names``, which may be in another order); None for any other folder."""
    if suite != "imagenet-v2" or len(names) != 1000 or set(classes) & set(names):
        return None
    if not all(c.isascii() and c.isdigit() and str(int(c)) == c and int(c) < 1000 for c in classes):
        return None
    from timm.data import ImageNetInfo

    wnids = list(ImageNetInfo().label_names())
    where = {n: i for i, n in enumerate(names)}
    if not set(wnids) <= set(where):  # the model's names are not wnids: no way to place an index
        return None
    return [where[wnids[int(c)]] for c in classes]


def check_folder(root: str | Path, suite: str, names: list[str]) -> list[str]:
    """The folder's class names, after checking it is complete for ``suite``; errors name what is missing.
    ImageNet-V2's index-named folders are read as the model's class names (:func:`index_folders`)."""
    root = Path(root)
    if not root.is_dir():
        raise NsvitError(f"{suite}: folder not found: {root}")
    from ..data.folders import check_no_symlink_loop, class_folders

    check_no_symlink_loop(root)  # the loader follows links: a loop would be read over and over
    classes = class_folders(root)  # dot-folders (.ipynb_checkpoints) are not classes, as for training folders
    if not classes:
        raise NsvitError(f"{suite}: {root} has no class folders (expected {root}/<class>/<image>)")
    index = index_folders(suite, classes, names)
    if index is not None:
        return _check_names(root, suite, names, classes, [names[i] for i in index])
    return _check_names(root, suite, names, classes, classes)


def _check_names(root: Path, suite: str, names: list[str], folders: list[str], classes: list[str]) -> list[str]:
    """``folders`` (as on disk), after checking that their class names ``classes`` make ``suite`` whole."""
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise NsvitError(f"{suite}: {len(unknown)} class folder(s) the model does not know, e.g. {unknown[:3]}")
    expected = SUITES.get(suite) or len(names)
    if len(classes) < expected:
        missing = [c for c in names if c not in classes][:3] if expected == len(names) else []
        raise NsvitError(f"{suite}: incomplete, {len(classes)} of {expected} class folders"
                         + (f" (missing e.g. {missing})" if missing else ""))
    from ..data.folders import visible_image

    # as the loader reads them: any case of the extension, in sub-folders too, no dot-files (._x.JPEG)
    empty = [c for c in folders if not any(visible_image(str(f)) for f in (root / c).rglob("*") if f.is_file())]
    if empty:
        raise NsvitError(f"{suite}: {len(empty)} class folder(s) hold no images, e.g. {empty[:3]}")
    return folders


@torch.no_grad()
def folder_accuracy(parts, root: str | Path, suite: str = "folder", model_classes: list[str] | None = None,
                    batch_size: int = 64, max_images: int | None = None, num_workers: int = 0,
                    on_bad_image: str = "error", precropped: bool = False, progress: bool = False) -> float:
    """Top-1 accuracy on an OOD folder, logits masked to the classes present. An unreadable file
    stops it naming the file, or with ``on_bad_image="skip"`` is left out (one warning, the count).
    ``precropped``: the set is stored at the input size (ImageNet-C, Stylized), so images are only
    centre-cropped, as their official evaluations do; otherwise the model's timm eval transform.
    ``progress``: a per-batch bar on a terminal."""
    from torch.utils.data import DataLoader, Subset
    from ..data.folders import IndexedFolder, crop_transform, pixel_transform, read_rgb

    names = model_class_names(parts, model_classes)
    classes = check_folder(root, suite, names)
    transform = crop_transform(parts) if precropped else pixel_transform(parts)
    ds = IndexedFolder(str(root), (classes, {c: i for i, c in enumerate(classes)}), transform=transform,
                       loader=read_rgb)  # a bad file: BadImage, named; dot-folders skipped as check_folder does
    index = index_folders(suite, classes, names)
    to_model = torch.tensor(index if index is not None else [names.index(c) for c in classes])
    if max_images is not None and max_images < len(ds):
        ds = Subset(ds, torch.linspace(0, len(ds) - 1, max_images).round().long().tolist())
    dev = next(parts.parameters()).device
    keep = torch.full((len(names),), float("-inf"), device=dev)
    keep[to_model.to(dev)] = 0.0
    from .source import _collate, progress_bar

    hits = n = 0
    bad: list[str] = []
    loader = DataLoader(_SkipBad(ds, on_bad_image == "skip"), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    with eval_mode(parts):
        for x, y, b in progress_bar(loader, len(loader), suite, progress):
            bad += b
            if not len(y):
                continue
            z = check_logits(parts(x.to(dev))) + keep  # -inf masks the classes absent from the folder
            hits += int((z.argmax(-1).cpu() == to_model[y]).sum())
            n += len(y)
    if bad:
        import warnings

        warnings.warn(f"{suite}: skipped {len(bad)} unreadable image(s) (on_bad_image: skip), e.g. {bad[0]}",
                      stacklevel=2)
    if not n:
        raise NsvitError(f"{suite}: {root} holds no readable images ({len(bad)} skipped)")
    return hits / n


class _SkipBad(torch.utils.data.Dataset):
    """Items (x, y, None), or (None, y, path) for an unreadable file when skipping (the collate
    leaves it out); without skipping its BadImage stops the run, naming the file."""

    def __init__(self, ds, skip: bool):
        self.ds, self.skip = ds, skip

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        from ..data.folders import BadImage

        try:
            x, y = self.ds[i]
        except BadImage:
            if not self.skip:
                raise
            base, j = (self.ds.dataset, self.ds.indices[i]) if hasattr(self.ds, "indices") else (self.ds, i)
            path, y = base.samples[j]
            return None, y, str(path)
        return x, y, None
