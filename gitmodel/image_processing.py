"""GIT image preprocessing: the CLIP / VideoMAE recipe of transformers' PIL backend, pixel for pixel.

Work is split in two so that pipelines can run each half where it is cheap:

- `to_uint8(image)`: decode, RGB conversion, resize and centre crop on the CPU, giving a small
  (H, W, 3) uint8 crop that is cheap to batch and to ship to an accelerator;
- `normalize(crops)`: rescale + normalise a uint8 batch on any device, through a 256-entry table
  per channel that holds exactly the float32 values transformers computes for each byte value.

`__call__` is just the two halves in a row, so there is a single code path.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from gitmodel.hub import CheckpointFolder

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Class defaults of the two processors GIT checkpoints use; a config lists only what it sets.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {"resample": Image.Resampling.BICUBIC, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "VideoMAEImageProcessor": {"resample": Image.Resampling.BILINEAR, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
}

ImageInput = Union[Image.Image, np.ndarray, bytes, bytearray, memoryview]


def _canonical_type(name: str | None) -> str:
    """`CLIPFeatureExtractor`, `CLIPImageProcessorFast`, `...Pil` all mean the same recipe."""
    name = name or "CLIPImageProcessor"
    for suffix in ("Pil", "Fast"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    name = name.replace("FeatureExtractor", "ImageProcessor")
    if name not in _DEFAULTS:
        raise ValueError(f"unsupported image processor {name!r}; GIT checkpoints use one of {sorted(_DEFAULTS)}")
    return name


def _size_dict(size: Any) -> dict[str, int]:
    """Legacy `size`: an int is the shortest edge (both processors resize without squaring). A shortest
    edge may come with a longest edge that caps the other side."""
    if isinstance(size, int):
        return {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and ("shortest_edge" in size or {"height", "width"} <= size.keys()):
        if size.get("shortest_edge") is not None:
            edges = {"shortest_edge": int(size["shortest_edge"])}
            if size.get("longest_edge"):  # transformers ignores a null or zero longest edge
                edges["longest_edge"] = int(size["longest_edge"])
            return edges
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise ValueError(
        f"unsupported size {size!r}: expected an int, (height, width), {{'shortest_edge'[, 'longest_edge']}} "
        "or {'height', 'width'}"
    )


def _crop_dict(crop_size: Any) -> dict[str, int]:
    """Legacy `crop_size`: an int is a square."""
    if isinstance(crop_size, int):
        return {"height": crop_size, "width": crop_size}
    if isinstance(crop_size, (list, tuple)) and len(crop_size) == 2:
        return {"height": int(crop_size[0]), "width": int(crop_size[1])}
    if isinstance(crop_size, dict) and {"height", "width"} <= crop_size.keys():
        return {"height": int(crop_size["height"]), "width": int(crop_size["width"])}
    raise ValueError(f"unsupported crop_size {crop_size!r}: expected an int, (height, width) or {{'height', 'width'}}")


@dataclass
class GitImageProcessor:
    """Turns images into GIT's `pixel_values`, exactly as transformers' CLIP / VideoMAE PIL processors do."""

    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    do_convert_rgb: bool = True
    image_processor_type: str = "CLIPImageProcessor"

    def __post_init__(self) -> None:
        self.size = _size_dict(self.size)
        self.crop_size = _crop_dict(self.crop_size)
        self.resample = int(self.resample)
        self.image_mean = _three(self.image_mean, "image_mean")
        self.image_std = _three(self.image_std, "image_std")
        self._luts: dict[tuple, torch.Tensor] = {}  # per device and settings

    # ---------------------------------------------------------------- config

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GitImageProcessor:
        kind = _canonical_type(config.get("image_processor_type") or config.get("feature_extractor_type"))
        values = {**_DEFAULTS[kind], "image_processor_type": kind}
        for name in cls.__dataclass_fields__:
            if name != "image_processor_type" and config.get(name) is not None:
                values[name] = config[name]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": self.image_processor_type,
            "size": dict(self.size),
            "crop_size": dict(self.crop_size),
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | CheckpointFolder, storage_options: dict[str, Any] | None = None
    ) -> GitImageProcessor:
        """Reads `preprocessor_config.json` (hub layout) or the `image_processor` inside `processor_config.json`."""
        folder = path if isinstance(path, CheckpointFolder) else CheckpointFolder(path, storage_options)
        if folder.exists(PREPROCESSOR_CONFIG):
            config = folder.read_json(PREPROCESSOR_CONFIG)
            source = PREPROCESSOR_CONFIG
        elif folder.exists(PROCESSOR_CONFIG):
            config = folder.read_json(PROCESSOR_CONFIG).get("image_processor")
            source = f"{PROCESSOR_CONFIG} ['image_processor']"
        else:
            raise FileNotFoundError(
                f"{folder.path}: no {PREPROCESSOR_CONFIG} or {PROCESSOR_CONFIG} (image preprocessing config)"
            )
        if not isinstance(config, dict):
            raise ValueError(f"{folder.path}/{source}: expected a JSON object describing the image processor")
        try:
            return cls.from_dict(config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{folder.path}/{source}: {err}") from None

    def save_pretrained(
        self, path: str | os.PathLike | CheckpointFolder, storage_options: dict[str, Any] | None = None
    ) -> None:
        """Writes preprocessor_config.json, which transformers' AutoImageProcessor loads."""
        folder = path if isinstance(path, CheckpointFolder) else CheckpointFolder(path, storage_options)
        folder.write_json(PREPROCESSOR_CONFIG, {**self.to_dict(), "processor_class": "GitProcessor"})

    # ------------------------------------------------------ CPU half: uint8 crops

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every crop, or None when it depends on the image (no crop, no fixed resize)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def fixed_output_size(self) -> tuple[int, int]:
        """`output_size`, or a ValueError saying why crops vary in size (a model needs one size to batch)."""
        if self.output_size is None:
            raise ValueError(
                f"this image processor gives crops of varying sizes (do_center_crop={self.do_center_crop}, "
                f"size={self.size}): GIT needs do_center_crop, or do_resize to a fixed {{'height', 'width'}}"
            )
        return self.output_size

    def to_uint8(self, image: ImageInput) -> np.ndarray:
        """RGB conversion, resize and centre crop: an (H, W, 3) uint8 array, ready for `normalize`."""
        rgb = _to_rgb(_open(image))
        if self.do_resize:
            height, width = self._resized_shape(rgb.height, rgb.width)
            # The whole image is resized, then cropped, as transformers does. Resizing just the crop box
            # in one PIL call would be cheaper, but PIL then places its filter taps from the box's own
            # origin and scale: the rounding differs from the full resize for about half of all image
            # sizes (by up to 24 levels, measured), so that shortcut is not exact and is not taken.
            rgb = rgb.resize((width, height), resample=self.resample)
        pixels = np.asarray(rgb)
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return np.array(pixels, order="C")  # a fresh, writable array (small: the crop)

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        # transformers' get_size_with_aspect_ratio, in its float order: the long side is truncated, not
        # rounded. When the long side would pass longest_edge, the short side is what fits, rounded, and
        # the long side is scaled from the unrounded value; a short side already at its target stays as is.
        target = scale = self.size["shortest_edge"]
        short, long = min(height, width), max(height, width)
        longest = self.size.get("longest_edge")
        if longest and long / short * target > longest:
            scale = longest * short / long
            target = int(round(scale))
        if short == target:
            return height, width
        new_long = int(scale * long / short)
        return (new_long, target) if width < height else (target, new_long)

    # ------------------------------------------------ device half: uint8 → float

    def normalize(
        self,
        crops: np.ndarray | torch.Tensor | Sequence[np.ndarray],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(..., H, W, 3) uint8 → (..., 3, H, W) `dtype` on `device`; bit-exact with transformers in float32.

        Only the uint8 batch crosses to the device; each byte is then looked up in a per-channel table
        of the float32 values transformers computes (rescale in float64, normalise in float32), so
        the result does not depend on the device's arithmetic. The cast to `dtype` comes last.
        """
        if isinstance(crops, (list, tuple)):
            crops = np.stack(crops)
        if isinstance(crops, np.ndarray):
            crops = torch.from_numpy(crops if crops.flags.writeable else crops.copy())
        if crops.dtype != torch.uint8 or crops.ndim < 3 or crops.shape[-1] != 3:
            raise TypeError(f"expected uint8 crops of shape (..., H, W, 3), got {tuple(crops.shape)} {crops.dtype}")
        crops = crops.to(device, non_blocking=True) if device is not None else crops
        lut = self._lut(crops.device)
        out = torch.empty((*crops.shape[:-3], 3, *crops.shape[-3:-1]), dtype=dtype, device=crops.device)
        for channel in range(3):  # one channel at a time keeps the int64 index tensor small
            out[..., channel, :, :] = lut[channel][crops[..., channel].long()]
        return out

    def _lut(self, device: torch.device) -> torch.Tensor:
        key = (device, self.do_rescale, self.rescale_factor, self.do_normalize, *self.image_mean, *self.image_std)
        if key not in self._luts:
            values = np.arange(256, dtype=np.uint8)
            # The same numpy operations, in the same dtypes, as transformers' rescale and normalize.
            x = values.astype(np.float32)
            if self.do_rescale:
                x = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                mean = np.array(self.image_mean, dtype=np.float32)[:, None]
                std = np.array(self.image_std, dtype=np.float32)[:, None]
                table = (x[None, :] - mean) / std
            else:
                table = np.broadcast_to(x, (3, 256))
            self._luts[key] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)).to(device)
        return self._luts[key]

    # ------------------------------------------------------------ whole recipe

    def preprocess(
        self, images: ImageInput | Sequence[ImageInput], return_tensors: str | None = "pt"
    ) -> dict[str, Any]:
        """One image or a list of images → {"pixel_values": (B, 3, H, W) float32}.

        A VideoMAE processor (video checkpoints) takes a list of images as the frames of one video and
        gives (1, F, 3, H, W), as transformers' does: that is how its docs caption a video,
        `processor(images=frames)`. Nested lists are several videos (see `_as_videos`).
        """
        if self.image_processor_type == "VideoMAEImageProcessor":
            return self.preprocess_videos(_as_videos(images), return_tensors)
        if not isinstance(images, (list, tuple)):
            images = [images]
        crops = _stack([self.to_uint8(image) for image in images])
        return {"pixel_values": _as_return_type(self.normalize(crops), return_tensors)}

    __call__ = preprocess

    def preprocess_videos(
        self, videos: Sequence[Sequence[ImageInput]], return_tensors: str | None = "pt"
    ) -> dict[str, Any]:
        """A list of videos, each a list of frames (all videos the same length) → (B, F, 3, H, W)."""
        if not isinstance(videos, (list, tuple)) or not videos or not isinstance(videos[0], (list, tuple)):
            raise ValueError("videos must be a list of videos, each a list of frames")
        if len({len(video) for video in videos}) != 1:
            raise ValueError(f"all videos need the same number of frames, got {[len(v) for v in videos]}")
        crops = _stack([_stack([self.to_uint8(frame) for frame in video]) for video in videos])
        return {"pixel_values": _as_return_type(self.normalize(crops), return_tensors)}


def _as_videos(images: Any) -> list[list[ImageInput]]:
    """transformers' `make_nested_list_of_images`, which its VideoMAE processor applies to any input: a list
    of lists is a list of videos, as is a list of (F, H, W, C) arrays; a list of images, or one such array,
    is one video; a single image is a one-frame video."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [list(images)]
    if not isinstance(images, (list, tuple)):
        return [[images]]
    if images and all(isinstance(video, (list, tuple)) for video in images):
        return [list(video) for video in images]
    if images and all(isinstance(video, np.ndarray) and video.ndim == 4 for video in images):
        return [list(video) for video in images]
    return [list(images)]


def _three(values: Any, name: str) -> list[float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {values}")
    return values


def _open(image: ImageInput) -> Image.Image | np.ndarray:
    """Encoded bytes are decoded and turned upright (EXIF), as transformers' `load_image` does."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        decoded = Image.open(io.BytesIO(image))
        return ImageOps.exif_transpose(decoded)
    if isinstance(image, (Image.Image, np.ndarray)):
        return image
    raise TypeError(
        f"unsupported image type {type(image).__name__}: expected a PIL image, a uint8 array or encoded bytes"
    )


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """transformers' `convert_to_rgb`: transparency is composited onto white."""
    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_image(array: np.ndarray) -> Image.Image:
    """Channels-last uint8 arrays: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).

    transformers blends 4-channel arrays onto white in float64 and rounds; PIL's integer
    alpha_composite gives the same byte for every (value, alpha) pair, so arrays share the PIL path.
    """
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W[, C]), got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}")
    return Image.fromarray(array, "RGB" if array.shape[-1] == 3 else "RGBA")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop`: top/left = (size - crop) // 2, zero padding when the image is smaller."""
    orig_h, orig_w = pixels.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]
    # Pad to at least the crop size, centred with the extra pixel (if any) before the image.
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    pad_top, pad_left = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)
    padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    padded[pad_top : pad_top + orig_h, pad_left : pad_left + orig_w] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(
            f"images end up with different shapes {sorted({a.shape for a in arrays})}; enable do_center_crop "
            "or a fixed (height, width) size to batch them"
        )
    return np.stack(arrays)


def _as_return_type(pixel_values: torch.Tensor, return_tensors: str | None) -> Any:
    if return_tensors == "pt":
        return pixel_values
    if return_tensors in ("np", None):
        return pixel_values.numpy()
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
