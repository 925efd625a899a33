"""BAGEL / ThinkMorph preprocessing: the understanding image transform and the chat format of the checkpoint.

Image transform (BAGEL `data/transforms.py`, ThinkMorph/Visual-OPSD use max 980, min 378, stride 14): RGB (alpha
composited on white), resize so the long edge <= max and the short edge >= min with both sides multiples of the
patch size (then capped by `max_pixels`), bicubic; scale to [-1, 1] (mean = std = 0.5); cut into p x p patches
flattened in (row, col, channel) order, row-major over the patch grid. Output is Qwen-VL shaped so the trainer's
multimodal plumbing applies unchanged: `pixel_values` `(sum patches, p*p*3)` and `image_grid_thw` `(n, 3)` =
(1, rows, cols), one LLM token per patch (`merge_size` 1).

Chat format: BAGEL packs every text span as `<|im_start|>text<|im_end|>` with no role names, and every image as a
block `<|vision_start|> patches <|vision_end|>` (`<|image_pad|>` stands for each patch row here); the model
answers after a bare `<|im_start|>` and stops at `<|im_end|>`. ThinkMorph's interleaved traces mark a visual
thought with the literal text `<image_start>`, which is what the image-skip rounds look for in decoded text.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from ...markers import IMAGE_SKIP_MARKER

IMAGE_TOKEN = "<|image_pad|>"
# The Visual-OPSD reference's ViT transform (its data/configs/visual_opsd.yaml; also ThinkMorph's text-reasoning
# config). BAGEL's demo uses 980 / 224; ThinkMorph's interleaved training 518 / 224 (docs/models.md).
REFERENCE_IMAGE_TRANSFORM = {"max_image_size": 980, "min_image_size": 378, "max_pixels": 2_007_040}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}<|im_start|>{{ message['content'] }}<|im_end|>"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}<|im_start|>{{ part['text'] }}<|im_end|>"
    "{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


def to_rgb(image: Image.Image) -> Image.Image:
    """BAGEL's `pil_img2rgb`: transparent pixels become white, not black."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def target_size(width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int):
    """`(new_width, new_height)` of BAGEL's MaxLongEdgeMinShortEdgeResize (same order of clamps)."""

    def fit(w, h, scale):
        return tuple(max(stride, int(round(round(v * scale) / stride) * stride)) for v in (w, h))

    scale = max(min(max_size / max(width, height), 1.0), min_size / min(width, height))
    w, h = fit(width, height, scale)
    if w * h > max_pixels:  # BAGEL scales by the area ratio here (not its square root); kept as is
        w, h = fit(w, h, max_pixels / (w * h))
    if max(w, h) > max_size:
        w, h = fit(w, h, max_size / max(w, h))
    return w, h


class BagelImageProcessor(ImageProcessingMixin):
    """PIL-only understanding transform (no torchvision)."""

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, max_image_size=980, min_image_size=378, patch_size=14, max_pixels=14 * 14 * 9 * 1024,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **kwargs):
        super().__init__(**kwargs)
        self.max_image_size, self.min_image_size = max_image_size, min_image_size
        self.patch_size, self.max_pixels = patch_size, max_pixels
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.merge_size = 1  # one LLM token per patch (read by code written for Qwen-VL geometry)

    def fetch_images(self, images):
        return images

    def preprocess_one(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        image = to_rgb(image)
        w, h = target_size(*image.size, self.max_image_size, self.min_image_size, self.patch_size, self.max_pixels)
        image = image.resize((w, h), Image.BICUBIC)
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        p = self.patch_size
        patches = x.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * 3)
        return torch.from_numpy(np.ascontiguousarray(patches)), (h // p, w // p)

    def __call__(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        flat = [im for item in images for im in (item if isinstance(item, list | tuple) else [item])]
        out = [self.preprocess_one(im) for im in flat]
        return BatchFeature(
            {
                "pixel_values": torch.cat([o[0] for o in out]),
                "image_grid_thw": torch.tensor([[1, *o[1]] for o in out], dtype=torch.long),
            },
            tensor_type=return_tensors,
        )

    preprocess = __call__


class BagelProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False, "return_mm_token_type_ids": True}}


class BagelProcessor(ProcessorMixin):
    """`BagelImageProcessor` + the Qwen2 tokenizer + BAGEL's chat format; expands each `<|image_pad|>` to one
    token per patch and returns `mm_token_type_ids` (1 on patch tokens)."""

    valid_processor_kwargs = BagelProcessorKwargs
    image_skip_marker = IMAGE_SKIP_MARKER

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * int(image_inputs["image_grid_thw"][image_idx].prod())

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"]

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load what `save_pretrained` wrote, without the Auto registries (they do not know these classes)."""
        import json
        import os

        tokenizer = AutoTokenizer.from_pretrained(path)
        with open(os.path.join(path, "processor_config.json")) as f:
            cfg = json.load(f)
        image_cfg = cfg.get("image_processor") or {}
        image_cfg = {k: v for k, v in image_cfg.items() if not k.startswith("_") and k != "image_processor_type"}
        image_cfg.pop("merge_size", None)
        return cls(BagelImageProcessor(**image_cfg), tokenizer, chat_template=tokenizer.chat_template)
