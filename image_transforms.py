"""How images become the model's input: the training and evaluation transforms, and the same in numbers
(:func:`preprocessing`) for a deployment to repeat.

Image files and CIFAR-10 use ImageNet mean/std and DeiT's transforms (timm ``create_transform``), or at
:data:`SMALL_IMAGE` px and below CIFAR's (the whole image, a shifted crop and a mirror). Digits and
Fashion-MNIST, held as tensors, use mean 0.5 / std 0.5 and the batch transforms :func:`each_image` and
:func:`flip_half`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
TENSOR_DATASETS = ('digits', 'fashion-mnist')  # small grayscale images held as tensors, normalized by 0.5 / 0.5
# Inputs this small (CIFAR-sized and below) get the small-image transform: ImageNet's RandomResizedCrop
# (down to 8% of the image) and its centre crop would leave a few pixels of each image.
SMALL_IMAGE = 32
AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # DeiT's RandAugment
POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with the 0-bit case (a black image) that older Pillow gave and Pillow 11 refuses."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def allow_zero_bit_posterize() -> None:
    """RandAugment's increasing posterize reaches 0 bits at magnitude 10 (m9 + noise), which Pillow 11 refuses:
    timm's posterize ops take :func:`_posterize` so that DeiT's recipe keeps working. RandAugment looks its ops
    up when it is built, so this runs just before; running it again changes nothing."""
    for name in POSTERIZE_OPS:
        timm_auto_augment.NAME_TO_OP[name] = _posterize


def train_transform(img_size: int, grayscale: bool = False) -> Callable:
    """The official run's augmentation: RandAugment, random erasing of a quarter of the images with per-pixel
    random values ('pixel', not timm's default 'const'), bicubic resizing. Grayscale images get neither
    RandAugment's colour operations nor colour noise: crops, flips and erasing with grey only."""
    if grayscale:
        return create_transform(img_size, is_training=True, auto_augment=None, color_jitter=None, re_prob=0.25,
                                re_mode='const', re_count=1, interpolation='bicubic')
    allow_zero_bit_posterize()
    return create_transform(img_size, is_training=True, auto_augment=AUTO_AUGMENT, re_prob=0.25, re_mode='pixel',
                            re_count=1, interpolation='bicubic')


def small_image_transform(img_size: int, training: bool) -> Callable:
    """CIFAR's recipe: the whole image resized to the input, a crop shifted by up to 1/8 of it and a mirror in
    training (a no-op resize for CIFAR-10 at 32 px)."""
    steps = [transforms.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC)]
    if training:
        steps += [transforms.RandomCrop(img_size, padding=max(img_size // 8, 1)), transforms.RandomHorizontalFlip()]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_transform(img_size: int, training: bool, grayscale: bool = False) -> Callable:
    """The transform of an image file: the small-image one, the training augmentation, or DeiT's evaluation
    (bicubic resize to ``int(img_size / 0.875)``, centre crop, normalize)."""
    if img_size <= SMALL_IMAGE:
        return small_image_transform(img_size, training)
    if training:
        return train_transform(img_size, grayscale)
    return create_transform(img_size, is_training=False, interpolation='bicubic', crop_pct=0.875)


def cifar_transform(img_size: int, training: bool) -> Callable:
    """CIFAR-10's: evaluated upsampled whole, since a centre crop would cut the border of an image already
    32 px; trained as any image."""
    return image_transform(img_size, training) if training else small_image_transform(img_size, training=False)


def each_image(transform: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch transform that draws ``transform``'s random parameters for every image on its own."""
    return lambda batch: torch.stack([transform(image) for image in batch])


def flip_half(batch: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(len(batch)) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the dataset's tensors are normalized with."""
    if dataset in TENSOR_DATASETS:
        return (0.5,) * 3, (0.5,) * 3
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def preprocessing(dataset: str, img_size: int) -> dict[str, Any]:
    """How an image becomes the model's input at evaluation, in numbers a deployment can repeat: the
    resize (shorter side to ``resize``, or the whole image to ``resize`` x ``resize`` when ``crop`` is
    None), the centre crop, pixel values scaled to [0, 1], then per-channel ``(x - mean) / std``."""
    mean, std = normalization(dataset)
    steps: dict[str, Any] = {'input_size': img_size, 'channels': 'RGB; grayscale images repeated on 3 channels'}
    if dataset in TENSOR_DATASETS:
        native = 8 if dataset == 'digits' else 28
        steps.update(resize=img_size, crop=None, interpolation='bilinear (antialiased)',
                     source=f'{native}x{native} grayscale')
    elif img_size <= SMALL_IMAGE or dataset == 'cifar10':
        steps.update(resize=img_size, crop=None, interpolation='bicubic')
    else:  # DeiT's: the shorter side to img_size / 0.875, then the centre crop
        steps.update(resize=int(img_size / 0.875), crop=img_size, interpolation='bicubic')
    return {**steps, 'mean': list(mean), 'std': list(std)}
