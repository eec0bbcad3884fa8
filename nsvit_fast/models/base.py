"""The adapter boundary: one ViT split at the noise insertion point.

Everything outside ``nsvit_fast.models`` sees a model only through this interface:

    x (B, C, H, W) pixels in [0, 1]
      --patch_embed-->  u (B, N, D)      patch tokens: the insertion point of the noise
      --encode------->  logits (B, K)    prefix tokens, positional embedding, blocks, norm, pool, head

Normalisation (mean, std from the model's own timm data config) happens inside ``patch_embed``,
so attacks, corruptions and nullspace noise all work in pixel space. Besides the two halves an
adapter answers what its users would otherwise read off the timm model: the attention maps and
hidden states of the encoder (``encode_with_attention``, ``encode_with_hidden``), whether token 0
is a class token (``has_class_token``), the transform settings (``data_config``), the weights
(``weights``, ``load_weights``) and the architecture record (``arch``, ``model_kwargs``) that
rebuilds it. A test greps the package so that nothing outside ``models/`` reaches past it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import NsvitError


NORM_RANGE = {"mean": (-10.0, 10.0), "std": (1e-3, 1e3)}  # normalisation statistics of [0, 1] pixels


class Adapter(nn.Module):
    """Base class of a model family's adapter: one timm model split at the patch tokens.

    Args:
        model: the timm model; wrapped, not copied (training the adapter trains it).
        mean, std: per-channel normalisation (1 or C values each) applied inside ``patch_embed``.
        name: how reports name the model; by default the class name.
        arch: the timm architecture that rebuilds the model (``timm.create_model(arch, **model_kwargs)``);
            by default ``name``.
        model_kwargs: the constructor arguments given with ``arch`` (``img_size``, ``num_classes``...).
        data_config: timm's data config of the model (``timm.data.resolve_model_data_config``); by
            default resolved from the model. Only its transform settings are kept (interpolation,
            crop_pct, crop_mode): input size, mean and std are the adapter's own.

    Raises:
        NsvitError: mean/std of the wrong length, or a std that is not > 0.

    Subclasses set the geometry attributes below before calling this constructor, and implement
    ``patch_embed``, ``encode``, ``patch_projection``, ``encode_with_attention`` and
    ``encode_with_hidden``.
    """

    family: str = "?"
    serves: str = ""  # which timm models, for the "not a supported family" message

    def __init__(self, model: nn.Module, mean, std, name: str = "", *, arch: str | None = None,
                 model_kwargs: dict[str, Any] | None = None, data_config: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.name = name or type(model).__name__
        self.arch = arch or self.name
        self.model_kwargs: dict[str, Any] = dict(model_kwargs or {})
        # None: a timm model built outside nsvit-fast, whose constructor arguments nobody recorded
        self.kwargs_known = model_kwargs is not None
        # the name of each output where a finetune on a folder set them (its class folders, in label
        # order): saved with the weights, so a val or eval folder is read by name, not by position
        self.class_names: list[str] | None = None
        if data_config is None:
            from timm.data import resolve_model_data_config

            data_config = resolve_model_data_config(model)
        self._transform = {"interpolation": data_config.get("interpolation", "bicubic"),
                           "crop_pct": float(data_config.get("crop_pct", 0.875)),
                           "crop_mode": data_config.get("crop_mode", "center")}
        c = self.in_chans
        given = (mean, std)  # as passed, for the message: mean is a tensor once converted
        try:
            mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
            std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise NsvitError(f"mean/std must be numbers, got {given[0]!r} and {given[1]!r}") from None
        if mean.numel() not in (1, c) or std.numel() not in (1, c):
            raise NsvitError(f"{self.name}: a {c}-channel model needs mean/std of {'1' if c == 1 else f'1 or {c}'} "
                             f"value(s), got "
                             f"{mean.numel()} and {std.numel()} (mean= and std=, or --mean and --std)")
        # pixels are in [0, 1]: 0-255 statistics, a std near 0 or NaN give saturated or NaN logits
        lo, hi = NORM_RANGE["mean"]
        if not bool(torch.isfinite(mean).all()) or bool(((mean < lo) | (mean > hi)).any()):
            raise NsvitError(f"mean must be numbers in [{lo:g}, {hi:g}] (pixels in [0, 1]), got {mean.tolist()}")
        lo, hi = NORM_RANGE["std"]
        if not bool(torch.isfinite(std).all()) or bool(((std < lo) | (std > hi)).any()):
            raise NsvitError(f"std must be numbers in [{lo:g}, {hi:g}] (pixels in [0, 1]), got {std.tolist()}")
        # on the weights' device: adapt(model_on_gpu) and the EMA copy had their mean on the CPU
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.register_buffer("mean", mean.expand(c).reshape(1, c, 1, 1).clone().to(dev), persistent=False)
        self.register_buffer("std", std.expand(c).reshape(1, c, 1, 1).clone().to(dev), persistent=False)

    # -- geometry (subclasses set these attributes) --
    in_chans: int
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    embed_dim: int
    num_classes: int
    num_prefix_tokens: int  # P: class / register / distillation tokens ahead of the N patch tokens
    has_class_token: bool   # whether token 0 of the encoder sequence is a class token
    not_a_classifier: str = ""  # why encode cannot give logits (B, K), e.g. num_classes=0; "" when it can

    @property
    def num_patches(self) -> int:
        """N = gh * gw patch tokens per image."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def token_shape(self) -> tuple[int, int]:
        """Shape (N, D) of one image's patch tokens, hence of one noise."""
        return (self.num_patches, self.embed_dim)

    def compile_encoder(self, **kwargs) -> "Adapter":
        """torch.compile each transformer block in place (``nn.Module.compile``: state-dict keys and
        checkpoints are unchanged); ``kwargs`` go to torch.compile. Returns self.

        Raises NsvitError for a family without a ``blocks`` sequence."""
        blocks = getattr(self.model, "blocks", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList):
            raise NsvitError(f"{self.family} adapter has no block sequence to compile")
        for b in blocks:
            b.compile(**kwargs)
        return self

    @property
    def data_config(self) -> dict[str, Any]:
        """What a data pipeline needs: ``input_size`` (C, H, W), ``mean`` and ``std`` (C values each,
        applied by the adapter itself: feed it pixels in [0, 1]), and timm's transform settings
        ``interpolation``, ``crop_pct``, ``crop_mode`` for ``timm.data.create_transform``."""
        return {"input_size": (self.in_chans, *self.img_size),
                "mean": tuple(self.mean.flatten().tolist()), "std": tuple(self.std.flatten().tolist()),
                **self._transform}

    # -- the two halves --
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) in [0, 1] -> the model's normalised input, (x - mean) / std."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def check_images(self, x: torch.Tensor) -> None:
        """Shape and dtype check only (no host sync): float (B, C, H, W) at the model's input size, on
        any device (data kept on the host and moved batch by batch is checked here too; the forward,
        ``patch_embed``, also checks the device). The range [0, 1] is not checked here, on every
        forward of the hot paths (it would cost a host sync per call on a GPU): the engines and
        ``accuracy`` check it where data comes in (:func:`nsvit_fast.errors.check_pixels`); a
        caller of ``parts(x)`` or ``patch_embed`` keeps x in [0, 1] itself.

        Raises:
            NsvitError: any other shape, or integer pixels (uint8 0-255 would be scored as noise)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = str(x.dtype).replace("torch.", "") if isinstance(x, torch.Tensor) else type(x).__name__
            raise NsvitError(f"{self.name} takes float pixels in [0, 1], got {got}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_chans, *self.img_size):
            raise NsvitError(f"{self.name} takes images (B, {self.in_chans}, {self.img_size[0]}, "
                             f"{self.img_size[1]}), got {tuple(x.shape)}")

    def check_device(self, what: str, t: torch.Tensor) -> None:
        """Raise NsvitError naming both devices when ``t`` (``what``: images, patch tokens) is not on
        the model's weights' device (else a torch traceback 17 frames deep). For the forward path
        only: data that stays on the host between batches is not a mistake."""
        dev = next((p.device for p in self.parameters()), t.device)
        if t.device != dev:
            raise NsvitError(f"{self.name}: {what} are on {t.device}, the model on {dev}: move one of them "
                             f"(.to(...))")

    def check_tokens(self, u: torch.Tensor) -> None:
        """Check before ``encode``: patch tokens of shape (B, N, D), and a model that gives logits.

        Raises:
            NsvitError: any other shape, or a model without a classifier (``not_a_classifier``)."""
        if self.not_a_classifier:
            raise NsvitError(self.not_a_classifier)
        if not isinstance(u, torch.Tensor) or not u.is_floating_point():
            got = str(u.dtype).replace("torch.", "") if isinstance(u, torch.Tensor) else type(u).__name__
            raise NsvitError(f"{self.name}: patch tokens must be a float tensor, got {got}")
        if u.dim() != 3 or tuple(u.shape[1:]) != self.token_shape:
            raise NsvitError(f"{self.name}: patch tokens must be (B, {self.num_patches}, {self.embed_dim}), "
                             f"got {tuple(u.shape)}")
        self.check_device("patch tokens", u)
        w = self.weight_dtype
        # tokens wider than the weights (float64 into float32, float32 into float16) give torch's "mixed
        # dtype" error deep in the encoder; narrower ones are promoted at the positional embedding
        if torch.promote_types(u.dtype, w) != w and not torch.is_autocast_enabled(u.device.type):
            raise NsvitError(f"{self.name}: patch tokens are {str(u.dtype)[6:]} but the weights are {str(w)[6:]}; "
                             f"give {str(w)[6:]} tokens, or keep float32 weights under autocast for mixed precision")

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the model's first parameter (float32 unless the caller converted it)."""
        return next(self.model.parameters()).dtype

    def check_learnable(self, what: str) -> None:
        """Refuse float16 / bfloat16 weights before learning noise or weights on them (``what``):
        AdamW steps and MSE-prob near ε need float32; mixed precision is autocast over float32 weights."""
        w = self.weight_dtype
        if w not in (torch.float32, torch.float64):
            raise NsvitError(f"{what} needs float32 weights, {self.name}'s are {str(w)[6:]}: keep them float32 "
                             f"(model.float()) and pick the precision with autocast (precision='bf16', --precision bf16)")

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) in [0, 1] -> patch tokens u (B, N, D).

        Raises:
            NsvitError: images of the wrong shape."""
        raise NotImplementedError

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """Patch tokens u (B, N, D), noise already added -> logits (B, K).

        Raises:
            NsvitError: tokens of the wrong shape."""
        raise NotImplementedError

    def encode_noisy(self, u: torch.Tensor, v: torch.Tensor | None, include_clean: bool = False,
                     backend: str | None = None) -> torch.Tensor:
        """Logits of u (B, N, D) plus every noise of v (M, N, D), broadcast over the batch:
        (M * B, K) noise-major, preceded by the B clean rows if ``include_clean``. A family may fuse
        this (the ViT adapter does); this default builds the rows and encodes them.

        Raises:
            NsvitError: u or v of another shape (a (N, D) noise must be given as (1, N, D)), or
                no rows at all (no noise and not ``include_clean``)."""
        self.check_noisy(u, v, include_clean)
        if backend is not None:  # a fused family takes it; here it has nothing to choose, but a typo is a typo
            from ..ops import backend_for

            backend_for("token_assembly", u.device, backend)
        rows = [u] if include_clean else []
        if v is not None and v.shape[0]:
            rows.append((u[None] + v[:, None]).reshape(-1, *u.shape[1:]))
        return self.encode(torch.cat(rows) if len(rows) > 1 else rows[0])

    def check_noisy(self, u: torch.Tensor, v: torch.Tensor | None, include_clean: bool) -> None:
        """Shape checks of :meth:`encode_noisy` (no host sync)."""
        self.check_tokens(u)
        if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 3 or tuple(v.shape[1:]) != self.token_shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise NsvitError(f"{self.name}: noises must be (M, {self.num_patches}, {self.embed_dim}), got {got}")
        if v is not None and (not v.is_floating_point() or (
                torch.promote_types(v.dtype, self.weight_dtype) != self.weight_dtype
                and not torch.is_autocast_enabled(v.device.type))):  # as the tokens: torch's "mixed dtype" deep inside
            raise NsvitError(f"{self.name}: noises are {str(v.dtype)[6:]} but the weights are "
                             f"{str(self.weight_dtype)[6:]}; give {str(self.weight_dtype)[6:]} noises")
        if not include_clean and (v is None or v.shape[0] == 0):
            raise NsvitError(f"{self.name}: encode_noisy needs at least one noise, or include_clean=True")

    def encode_with_attention(self, u: torch.Tensor, in_graph: bool = False
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``encode(u)`` and every block's attention probabilities, a list of L tensors
        (B, heads, T, T) with T = P + N (rows: queries, softmax over keys; token order as in the
        encoder: prefix tokens, then patches row-major).

        Differentiable with respect to u. With ``in_graph`` the maps are the very tensors the
        logits were computed from, so ``torch.autograd.grad(logits, maps)`` is defined (Chefer
        relevance needs this); a family may then use a slower unfused attention path.

        Raises:
            NsvitError: tokens of the wrong shape, or blocks whose attention the family cannot read."""
        raise NsvitError(f"{self.name}: the {self.family} adapter gives no attention maps")

    def encode_with_hidden(self, u: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``encode(u)`` and the input tokens of every block, a list of L tensors (B, T, D), in the
        graph (Grad-CAM differentiates the logits with respect to the last one).

        Raises:
            NsvitError: tokens of the wrong shape."""
        raise NsvitError(f"{self.name}: the {self.family} adapter gives no hidden states")

    def encode_hooked(self, u: torch.Tensor, hooks: list) -> torch.Tensor:
        """``encode(u)`` with the given hook handles in place; removes them after, also on error."""
        try:
            return self.encode(u)
        finally:
            for h in hooks:
                h.remove()

    def patch_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear patch map in pixel space: weight (D, C, r, r) with 1/std folded in, bias (D,)
        or None. ``patch_embed(x)`` is this map applied to each patch of ``x - mean``."""
        raise NotImplementedError

    # -- weights --
    def weights(self) -> dict[str, torch.Tensor]:
        """The wrapped model's state dict, keyed as timm names its parameters (what ``save_model``
        writes and ``load_weights`` reads). The tensors are shared, not copied."""
        return self.model.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load a state dict keyed as ``weights()`` (a ``module.`` prefix from DDP is dropped).

        Raises:
            NsvitError: missing, unexpected or wrongly shaped keys, naming ``source``."""
        from .loading import load_state

        load_state(self.model, state, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) in [0, 1] -> logits (B, K): ``encode(patch_embed(x))``."""
        return self.encode(self.patch_embed(x))

    def extra_repr(self) -> str:
        """The adapter's geometry in ``repr(parts)``: name, family, image and patch size, token
        shape (N, D), classes."""
        return (f"name={self.name!r}, family={self.family!r}, img_size={self.img_size}, "
                f"patch_size={self.patch_size}, tokens={self.token_shape}, classes={self.num_classes}")
