"""Image sources, each returning a split as NumPy arrays: images uint8 [N, H, W, C] (4x less host
memory than float32; batches are converted to float32 [-1, 1] one at a time, `to_model_range`)
and labels int32 [N].

  * "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), with
    a fixed seeded split: 1,497 "train" and 300 "validation".
  * "folder:/path": every PNG/JPEG under a folder, center-cropped and resized; label 0.
  * any other name: a tensorflow-datasets image dataset (mnist, fashion_mnist, cifar10,
    celeb_a, oxford_flowers102, ...), imported lazily: the core never needs TensorFlow.
  * "array_record:DIR": a split prepared once (`prepare`, data/prepare.py), read a batch at a
    time from its ArrayRecord shards: datasets larger than host memory.
All but the last hold the split in memory.
"""
from __future__ import annotations

import json
import pathlib
from typing import NamedTuple, Optional

import numpy as np

from diffusion_jax.viz import to_model_range
from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_text

DIGITS_VALIDATION = 300


class ImageData(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, C] (or an array-like of them: data/prepared.py)
    labels: np.ndarray  # int32 [N]
    process_shard: bool = False  # True: only this process's shard of the split (see Batches)
    captions: Optional[list] = None  # N strings (a captioned data set), or None
    sizes: Optional[np.ndarray] = None  # int32 [N, 4]: each image's original (H, W) and its crop's top-left
                                        # corner in the resized image (`crop_corner`; SDXL's micro-conditioning)

    def model_range(self, index=slice(None)) -> np.ndarray:
        """images[index] as float32 in [-1, 1]."""
        return to_model_range(self.images[index])


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C]: the central square, resized (area/bicubic)."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    if side == size:
        return image
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    pil = pil.resize((size, size), Image.BICUBIC if side < size else Image.BOX)
    out = np.asarray(pil)
    return out[..., None] if squeeze else out


def crop_corner(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of `center_crop_resize`'s crop of an H x W image, in the coordinates of the image
    resized so its short side is `size`: diffusers' SDXL training scripts' crop_top_left."""
    side = min(height, width)
    return round((height - side) // 2 * size / side), round((width - side) // 2 * size / side)


def folder_image_sizes(files, size: int) -> np.ndarray:
    """int32 [n, 4]: (H, W, crop top, crop left) of each image file (its header read, not its pixels)."""
    from PIL import Image

    def record(path):
        with Image.open(path) as image:
            width, height = image.size
        return (height, width, *crop_corner(height, width, size))
    return np.asarray([record(f) for f in files], np.int32).reshape(-1, 4)


def _match_shape(images: np.ndarray, image_size: int, channels: int, name: str) -> np.ndarray:
    if images.shape[-1] != channels:
        raise UsageError(f"dataset {name!r} has {images.shape[-1]} channels but the config asks for "
                         f"{channels}: set data.channels={images.shape[-1]} (and a matching model)")
    if images.shape[1:3] != (image_size, image_size):
        images = np.stack([center_crop_resize(im, image_size) for im in images])
    return images


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTIONS = ("a handwritten {d}", "the digit {w}", "a handwritten {w}", "the number {d}")


def digit_captions(labels) -> list:
    """A caption per digit: the templates of DIGIT_CAPTIONS in turn ("a handwritten 7", "the digit
    seven", ...)."""
    return [DIGIT_CAPTIONS[i % len(DIGIT_CAPTIONS)].format(d=int(y), w=DIGIT_WORDS[int(y)])
            for i, y in enumerate(labels)]


def digits_table() -> tuple[np.ndarray, np.ndarray]:
    """(pixels float64 [1797, 8, 8] in 0..16, digits int [1797]): scikit-learn's digits, read from
    the file it ships (importing scikit-learn itself takes seconds); its loader if the file moved."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_digits

        bunch = sk_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_digits(split: str, image_size: int = 8, channels: int = 1) -> ImageData:
    pixels, digits = digits_table()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    order = np.random.default_rng(0).permutation(len(images))
    parts = {"train": order[DIGITS_VALIDATION:], "validation": order[:DIGITS_VALIDATION],
             "test": order[:DIGITS_VALIDATION], "all": order}
    if split not in parts:
        raise UsageError(f"unknown split {split!r} for digits; choose one of {sorted(parts)}")
    idx = np.sort(parts[split])
    images = _match_shape(images[idx], image_size, channels, "digits")
    labels = digits[idx].astype(np.int32)
    return ImageData(images, labels, captions=digit_captions(labels))


def read_image(path, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] of an image file; 16-bit and 32-bit integer images are scaled to
    8 bits (not clipped). ValueError naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                values = np.asarray(image)
                full = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
                gray = values.astype(np.float64) * (255.0 / full)
                image = Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8), mode="L")
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated or broken files
        raise UsageError(f"cannot read the image {str(path)!r} ({e}): remove or replace the file") from None
    return array.reshape(*array.shape[:2], channels)


def folder_files(path: str) -> list:
    """Every PNG / JPEG under `path`, sorted (the order of a folder data set)."""
    root = pathlib.Path(path)
    if not root.is_dir():
        raise UsageError(f"image folder {path!r} does not exist (data.name='folder:PATH')")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UsageError(f"no PNG or JPEG images under {path!r}")
    return files


def read_folder_images(files, image_size: int, channels: int) -> np.ndarray:
    """uint8 [n, size, size, channels] of image files, center-cropped and resized."""
    return np.stack([center_crop_resize(read_image(f, channels), image_size) for f in files])


def folder_captions(path: str, files) -> Optional[list]:
    """The captions of a folder's images: PATH/captions.jsonl ({"file": NAME, "text": ...} a line,
    NAME relative to PATH), else NAME.txt beside each image; None when there are neither. A
    captioned folder must caption every image."""
    root, table = pathlib.Path(path), {}
    if (root / "captions.jsonl").exists():
        for n, line in enumerate(read_text(root / "captions.jsonl", "the captions file").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    name, text = str(row["file"]), row["text"]
                except (ValueError, KeyError, TypeError):
                    name, text = None, None
                if not isinstance(text, str):
                    raise UsageError(f"{root / 'captions.jsonl'} line {n} is not {{\"file\": NAME, \"text\": CAPTION}} "
                                     "with a string caption: fix that line")
                if name in table:
                    raise UsageError(f"{root / 'captions.jsonl'} captions {name} twice (line {n} again): keep one row "
                                     "an image")
                table[name] = text
        captions = [table.get(str(pathlib.Path(f).relative_to(root))) for f in files]
    else:
        captions = [read_text(pathlib.Path(f).with_suffix(".txt"), "the caption").strip()
                    if pathlib.Path(f).with_suffix(".txt").exists() else None for f in files]
        if all(c is None for c in captions):
            return None
    missing = [str(f) for f, c in zip(files, captions) if c is None]
    if missing:
        raise UsageError(f"{len(missing)} image(s) of the captioned folder {path} have no caption, e.g. {missing[0]}: "
                         "give every image its NAME.txt (or a captions.jsonl row)")
    return captions


def load_folder(path: str, image_size: int, channels: int) -> ImageData:
    files = folder_files(path)
    return ImageData(read_folder_images(files, image_size, channels), np.zeros(len(files), np.int32),
                     captions=folder_captions(path, files), sizes=folder_image_sizes(files, image_size))


def _tfds(name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # the user's install to complete: one line, no traceback
        raise UsageError(f"data.name {name!r} is a tensorflow-datasets data set, which needs tensorflow-datasets and "
                         f"tensorflow-cpu ({e}): pip install 'diffusion_jax[data]', or use digits, folder:DIR or "
                         "array_record:DIR") from None
    # The builders tfds ships, listed without importing TensorFlow (0.3 s); its community data sets'
    # listing imports it and asks the network (8 s on a 2-core machine, for a mistyped name). A name
    # with a colon (a version, mnist:3.0.1, or a community namespace) is left to tfds.load.
    if ":" not in name and name not in tfds.list_builders(with_community_datasets=False):
        raise UsageError(f"unknown dataset {name!r}: not 'digits', 'folder:/path', 'array_record:DIR' or a "
                         "tensorflow-datasets builder (see tfds.list_builders())")
    return tfds


def _load_failure(name: str, split: str, error: Exception) -> Exception:
    """Why a tfds split could not be loaded, named by its cause: a module the builder imports that is
    not installed, an unknown split, or no prepared copy where tfds looks (it downloads only when
    the network is reachable)."""
    detail = f"{type(error).__name__}: {str(error)[:300]}"
    if isinstance(error, ImportError):
        return UsageError(f"the tfds builder {name!r} needs a module that is not installed ({detail}): pip install "
                          f"{getattr(error, 'name', None) or 'it'}")
    if "unknown split" in str(error).lower():
        return UsageError(f"{name!r} has no split {split!r} ({detail}): name one of its splits (data.train_split, "
                          "data.eval_split)")
    return FileNotFoundError(f"cannot load the tfds dataset {name!r} split {split!r} ({detail}): prepare it once (tfds "
                             "build, or a first run where it can download) and point data.data_dir at that copy")


def tfds_split_size(name: str, split: str, data_dir: str = "") -> int:
    """Number of examples of a tfds split: its metadata's count, else counted by reading it once."""
    tfds = _tfds(name)
    try:
        return int(tfds.builder(name, data_dir=data_dir or None).info.splits[split].num_examples)
    except Exception:  # no metadata (a generated copy without it, or tfds.testing.mock_data)
        pass
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
    except Exception as e:
        raise _load_failure(name, split, e) from None
    count = int(ds.cardinality())
    return count if count >= 0 else sum(1 for _ in ds)


def tfds_captions(info, feature: str):
    """example -> caption of a tfds data set's `feature` ("captions/text": a nested feature, "/"
    between the names): a text feature's string (a sequence of them: the first, "" when empty), or a
    ClassLabel's class name."""
    names = feature.split("/")
    try:
        spec = info.features
        for name in names:
            spec = spec[name]
    except (KeyError, TypeError):
        raise UsageError(f"data.caption_feature = {feature!r} is not a feature of {info.name!r} (its features: "
                         f"{', '.join(info.features.keys())}): name the feature that holds the captions, "
                         "'/' between nested names (coco_captions: 'captions/text')") from None
    class_names = getattr(spec, "names", None)

    def caption(example) -> str:
        value = example
        for name in names:
            value = value[name]
        value = np.asarray(value)
        if value.ndim:  # a sequence of captions: the first
            value = value.reshape(-1)[0] if value.size else b""
        value = value.item() if isinstance(value, np.ndarray) else value
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if class_names is not None:
            return class_names[int(value)]
        return str(value)

    return caption


def load_tfds(name: str, split: str, image_size: int, channels: int, data_dir: str = "",
              process_index: int = 0, process_count: int = 1, caption_feature: str = "") -> ImageData:
    """A tfds split, this process's shard of it only (tfds.even_splits) when several run, with
    the captions of `caption_feature` (see `tfds_captions`) when one is named."""
    tfds = _tfds(name)
    if process_count > 1:
        split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    try:
        ds, info = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False, with_info=True)
    except Exception as e:  # no prepared copy, a missing module tfds needs, ...
        raise _load_failure(name, split, e) from None
    caption = tfds_captions(info, caption_feature) if caption_feature else None
    images, labels, captions = [], [], []
    for example in tfds.as_numpy(ds):
        images.append(example["image"])
        labels.append(example.get("label", 0))
        if caption is not None:
            captions.append(caption(example))
    if not images:
        raise UsageError(f"split {split!r} of {name!r} is empty")
    shapes = {im.shape for im in images}
    if len(shapes) == 1:
        array = np.stack(images)
        array = _match_shape(array, image_size, channels, name)
    else:  # variable-size images (celeb_a, flowers): crop and resize one by one
        array = np.stack([_match_shape(im[None], image_size, channels, name)[0] for im in images])
    return ImageData(array, np.asarray(labels, np.int32), process_shard=process_count > 1,
                     captions=captions if caption is not None else None)


SOURCE_KINDS = ("digits", "folder", "array_record", "tfds")


def parse_source(name: str) -> tuple[str, str]:
    """(kind, argument) of a data.name, the one place a dataset name is read: ("digits", ""),
    ("folder", PATH), ("array_record", DIR) or ("tfds", BUILDER)."""
    if name == "digits":
        return "digits", ""
    for kind in ("folder", "array_record"):
        if name.startswith(f"{kind}:"):
            return kind, name[len(kind) + 1:]
    return "tfds", name


def checked_source(data_config) -> tuple[str, str]:
    """`parse_source` of data.name, after checking the settings that belong to one kind of source:
    data.caption_feature only for tfds (digits carry their captions; a folder its NAME.txt or
    captions.jsonl)."""
    kind, where = parse_source(data_config.name)
    if data_config.get("caption_feature", "") and kind != "tfds":
        raise UsageError(f"data.caption_feature is set but data.name = {data_config.name!r} is not a tfds data set: "
                         "digits carry captions, a folder's come from NAME.txt or captions.jsonl, a prepared "
                         "split keeps its own; unset data.caption_feature")
    return kind, where


def load_split(data_config, split: str, process_index: int = 0, process_count: int = 1) -> ImageData:
    """The split named in a run's data config (see config.py), in memory (a prepared one: read
    by index from its shards)."""
    kind, where = checked_source(data_config)
    size, channels = data_config.image_size, data_config.channels
    if kind == "digits":
        return load_digits(split, size, channels)
    if kind == "folder":
        return load_folder(where, size, channels)
    if kind == "array_record":
        from diffusion_jax.data.prepared import load_prepared
        images, labels, captions = load_prepared(where, split, size, channels)
        return ImageData(images, labels, captions=captions)
    return load_tfds(where, split, size, channels, data_config.data_dir, process_index, process_count,
                     data_config.get("caption_feature", ""))


def split_rows(data_config, split: str):
    """(count, read(first, last) -> (uint8 images [n, H, W, C], int32 labels [n], captions [n] or
    None)) of a split of a digits / folder / tfds source, read a range at a time (what `prepare`
    writes shards from)."""
    kind, where = checked_source(data_config)
    size, channels = data_config.image_size, data_config.channels
    if kind == "digits":
        data = load_digits(split, size, channels)
        return len(data.images), lambda a, b: (data.images[a:b + 1], data.labels[a:b + 1], data.captions[a:b + 1])
    if kind == "folder":
        files = folder_files(where)
        captions = folder_captions(where, files)
        return len(files), lambda a, b: (read_folder_images(files[a:b + 1], size, channels),
                                         np.zeros(b + 1 - a, np.int32), captions and captions[a:b + 1])
    if kind == "array_record":
        raise UsageError(f"{data_config.name!r} is prepared already: train from it (data.name={data_config.name})")
    count = tfds_split_size(where, split, data_config.data_dir)
    feature = data_config.get("caption_feature", "")

    def read(first: int, last: int):
        data = load_tfds(where, f"{split}[{first}:{last + 1}]", size, channels, data_config.data_dir,
                         caption_feature=feature)
        return data.images, data.labels, data.captions

    return count, read
