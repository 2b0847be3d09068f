"""Face parsing datasets read from a local folder in their official on-disk layout.

Every dataset follows one small protocol (:class:`Dataset`):

- ``len(ds)`` samples; ``ds[i]`` returns ``(image, labels)``: ``image`` uint8 ``(H, W, 3)`` RGB and
  ``labels`` uint8 ``(H, W)`` class indices into ``ds.classes``, at the file's native resolution
  (resizing and augmentation belong to :mod:`minirnng.data.pipeline`);
- ``ds.classes``: the class names; ``ds.names``: one name per sample (the file stem).

Nothing here downloads anything. A missing folder or file raises :class:`MissingDataError` (a
``FileNotFoundError``) that names it and shows the layout that was expected; a file that is there
but cannot be used raises :class:`MalformedDataError` (a ``ValueError``) that names the file and
what is wrong with it. Folder contents and split lists are checked when a dataset is built; the
pixels of a sample are decoded, and checked, when it is read.
"""

import os
import re
import textwrap

import numpy
from PIL import Image, ImageOps

from .classes import HELEN_CLASSES, LFW_CLASSES


class MissingDataError(FileNotFoundError):
    """A dataset folder or file is not where the dataset's official layout puts it."""


class MalformedDataError(ValueError):
    """A dataset file exists but is unreadable or inconsistent (truncated, wrong size, unknown colour...)."""


class Dataset:
    """Base of every minirnng dataset: index checking and the ``(image, labels)`` protocol.

    Subclasses set ``classes`` and ``names`` and implement ``_load(index)``.
    """

    classes = ()

    @property
    def names(self):
        """One name per sample (tuple of ``str``)."""
        return self._names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        """``(image, labels)`` of sample ``index``: uint8 ``(H, W, 3)`` RGB and uint8 ``(H, W)``."""
        return self._load(self._checked_index(index))

    def _checked_index(self, index):
        if isinstance(index, bool) or not isinstance(index, (int, numpy.integer)):
            raise TypeError(f"{type(self).__name__} indices must be integers, got {index!r}")
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} is out of range: "
                             f"valid indices are 0 .. {len(self) - 1} ({len(self)} samples; "
                             "negative indices are not supported)")
        return index

    def _load(self, index):
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__}: {len(self)} samples, classes {', '.join(self.classes)}>"


# ---------------------------------------------------------------------------------------------
# Reading files with errors that name the file


def _require_folder(path, dataset, layout):
    if os.path.exists(path) and not os.path.isdir(path):
        raise MissingDataError(f"{dataset}: {path} is a file, not a folder; expected this layout:\n{layout}")
    if not os.path.isdir(path):
        raise MissingDataError(f"{dataset}: folder {path} does not exist; expected this layout:\n{layout}")


def _require_file(path, dataset, layout):
    if not os.path.isfile(path):
        raise MissingDataError(f"{dataset}: file {path} does not exist; expected this layout:\n{layout}")


def _read_picture(path, what):
    """Decode the picture file ``path`` completely with Pillow, or raise an error naming it."""
    if os.path.isdir(path):  # opening a folder is IsADirectoryError here, PermissionError on Windows
        raise MalformedDataError(f"{what} {path} is a folder, not an image file")
    try:
        with Image.open(path) as picture:
            picture.load()  # decode now, so that a truncated file fails here, with its name
            return picture
    except FileNotFoundError:
        raise MissingDataError(f"{what} {path} does not exist") from None
    except Image.UnidentifiedImageError:
        raise MalformedDataError(f"{what} {path} is not an image Pillow can identify "
                                 "(an empty or truncated file, or not an image at all)") from None
    except Image.DecompressionBombError as error:
        # Pillow refuses pictures of more than 2 * Image.MAX_IMAGE_PIXELS pixels before decoding
        # them, against files made to exhaust memory; it is not an OSError, so name it here
        raise MalformedDataError(f"{what} {path} is too large to decode ({error})") from None
    except PermissionError as error:
        raise MalformedDataError(f"{what} {path} cannot be read ({error.strerror})") from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow reports a file that ends early as OSError("image file is truncated ...").
        raise MalformedDataError(f"{what} {path} is truncated or corrupt ({error})") from None


#: Pillow modes of more than 8 bits a channel, and the value that maps to white in each
_WIDE_GREY_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _bits_per_sample(picture):
    """The bits of each pixel a TIFF declares (its BitsPerSample tag), None for other formats:
    Pillow reads 16-bit PNG and PGM, and 32-bit TIFF, into one mode, "I"."""
    bits = getattr(picture, "tag_v2", {}).get(258)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return bits


def read_rgb(path, what, exif_orientation=False):
    """uint8 ``(H, W, 3)`` RGB of an image file: grey, palette, RGBA and CMYK pictures converted,
    16-bit grey scaled to 8 bits (Pillow's own conversion would clip it to white).

    exif_orientation : turn the picture upright as its EXIF orientation tag says, as viewers show
        it (photographs from phones); off for the datasets, whose labels match the stored pixels.
    """
    picture = _read_picture(path, what)
    bits = _bits_per_sample(picture)  # before any transposition, whose copy has no TIFF tags
    if exif_orientation:
        picture = ImageOps.exif_transpose(picture)
    if picture.mode in _WIDE_GREY_WHITE:
        # 16-bit grey (PNG, TIFF; Pillow's "I" holds them in 32 bits): 65535 is white
        grey = numpy.asarray(picture, dtype=numpy.float64)
        beyond_16_bits = grey.size and (grey.min() < 0 or grey.max() > 65535)
        if picture.mode == "I" and (beyond_16_bits or bits not in (None, 16)):
            # a 32-bit TIFF's white could be 255, 65535 or 2**32 - 1: guessing 65535 would parse a
            # picture of 8-bit values as black
            values = f" from {grey.min():.0f} to {grey.max():.0f}" if grey.size else ""
            raise MalformedDataError(f"{what} {path} holds 32-bit integer pixels{values}"
                                     f"{', beyond 16 bits' if beyond_16_bits else ''}, whose white is not "
                                     "defined; save it with 8 or 16 bits a channel")
        grey = grey * (255 / _WIDE_GREY_WHITE[picture.mode])
        grey = numpy.clip(numpy.rint(grey), 0, 255).astype(numpy.uint8)
        return numpy.repeat(grey[:, :, None], 3, axis=2)
    if picture.mode == "F":
        raise MalformedDataError(f"{what} {path} holds 32-bit floating-point pixels, whose range is not "
                                 "defined; save it with 8 or 16 bits a channel")
    return numpy.asarray(picture.convert("RGB"))


def _check_same_size(label_path, label_shape, image_path, image_shape):
    if tuple(label_shape[:2]) != tuple(image_shape[:2]):
        raise MalformedDataError(
            f"label {label_path} is {label_shape[1]}x{label_shape[0]} (width x height) but its image "
            f"{image_path} is {image_shape[1]}x{image_shape[0]}")


def _split_lines(path):
    """``(line_number, text)`` of every non-blank line of a split list, text stripped. A UTF-8
    byte-order mark (which some editors write) is dropped; a file that is not UTF-8 is an error
    naming it and the line."""
    with open(path, "rb") as stream:
        raw = stream.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise MalformedDataError(f"split list {path} line {line} is not UTF-8 text ({error.reason} at byte "
                                 f"{error.start}); save it as UTF-8") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _refuse_duplicates(dataset, split_path, entries):
    """An error for a sample a split list names twice (it would count twice): ``entries`` are
    ``(line number, sample name)`` in file order."""
    first_line = {}
    for number, name in entries:
        if name in first_line:
            raise MalformedDataError(f"{dataset}: {split_path} names {name} twice, on lines {first_line[name]} "
                                     f"and {number}; each sample belongs once to a split")
        first_line[name] = number


def _report_missing(dataset, split_path, missing, layout):
    """Raise one error for the split lines whose files are absent: the first in full, then a count."""
    number, line, path = missing[0]
    others = len({entry[0] for entry in missing}) - 1  # a line may name two missing files: count lines
    more = f" (and {others} more line{'s' if others > 1 else ''} of it name missing files)" if others else ""
    state = ("is a folder, not a file" if os.path.isdir(path) else
             "is a file, not a folder" if os.path.exists(path) else "does not exist")
    raise MissingDataError(f"{dataset}: {split_path} line {number} ({line!r}) names {path}, "
                           f"which {state}{more}; expected this layout:\n{layout}")


# ---------------------------------------------------------------------------------------------
# LFW-PL

LFW_LAYOUT = """\
  <root>/
    lfw_funneled/<Name>/<Name>_NNNN.jpg          the images (250x250 JPEG)
    parts_lfw_funneled_gt_images/<Name>_NNNN.ppm the labels (binary PPM: red hair, green skin, blue background)
    parts_train.txt, parts_validation.txt, parts_test.txt   split lists, one 'Name N' a line"""

#: The label colours of LFW-PL's PPM files, in ``LFW_CLASSES`` order.
LFW_LABEL_COLOURS = ((0, 0, 255), (0, 255, 0), (255, 0, 0))

SPLITS = ("train", "validation", "test")


def _check_split(split, dataset):
    if split not in SPLITS:
        raise ValueError(f"{dataset}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")


class LFWPL(Dataset):
    """LFW Part Labels (Kae et al., CVPR 2013): background, skin and hair on funneled LFW faces.

    ``LFWPL(root, split)`` with ``split`` one of ``train`` (1,500), ``validation`` (500) or
    ``test`` (927), read from ``root`` in the official layout::

{layout}

    A split line ``Name N`` (``N`` zero-padded or not) names the sample ``Name_NNNN``. Labels are the
    exact colours ``LFW_LABEL_COLOURS``; any other colour in a label file is an error (the files of
    the original distribution contain only these three).

    ``ds[i]`` returns uint8 ``(250, 250, 3)`` RGB and uint8 ``(250, 250)`` labels in ``LFW_CLASSES``.
    """

    classes = LFW_CLASSES

    @staticmethod
    def split_list(root, split):
        """The path of a split's list, ``<root>/parts_<split>.txt``."""
        return os.path.join(os.fspath(root), f"parts_{split}.txt")

    def __init__(self, root, split):
        _check_split(split, "LFWPL")
        self.root, self.split = os.fspath(root), split
        _require_folder(self.root, "LFWPL", LFW_LAYOUT)
        self.image_folder = os.path.join(self.root, "lfw_funneled")
        self.label_folder = os.path.join(self.root, "parts_lfw_funneled_gt_images")
        self.split_path = self.split_list(self.root, split)
        _require_folder(self.image_folder, "LFWPL", LFW_LAYOUT)
        _require_folder(self.label_folder, "LFWPL", LFW_LAYOUT)
        _require_file(self.split_path, f"LFWPL split {split!r}", LFW_LAYOUT)

        names, numbers, missing = [], [], []
        for number, line in _split_lines(self.split_path):
            fields = line.split()
            if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdigit()):
                raise MalformedDataError(f"LFWPL: {self.split_path} line {number} is {line!r}; "
                                         "expected a person's name and an image number, like 'Aaron_Peirsol 2'")
            stem = f"{fields[0]}_{int(fields[1]):04d}"
            for path in (self._image_path(stem), self._label_path(stem)):
                if not os.path.isfile(path):
                    missing.append((number, line, path))
            names.append(stem)
            numbers.append(number)
        if missing:
            _report_missing("LFWPL", self.split_path, missing, LFW_LAYOUT)
        _refuse_duplicates("LFWPL", self.split_path, zip(numbers, names))
        if not names:
            raise MalformedDataError(f"LFWPL: split list {self.split_path} names no samples")
        self._names = tuple(names)

    def _image_path(self, stem):
        person = stem.rsplit("_", 1)[0]
        return os.path.join(self.image_folder, person, stem + ".jpg")

    def _label_path(self, stem):
        return os.path.join(self.label_folder, stem + ".ppm")

    def _load(self, index):
        stem = self.names[index]
        image_path, label_path = self._image_path(stem), self._label_path(stem)
        image = read_rgb(image_path, "LFW-PL image")
        picture = _read_picture(label_path, "LFW-PL label")
        if picture.mode != "RGB":
            raise MalformedDataError(f"LFW-PL label {label_path} has Pillow mode {picture.mode!r}; "
                                     "expected a colour (RGB, binary P6) PPM")
        colours = numpy.asarray(picture)
        _check_same_size(label_path, colours.shape, image_path, image.shape)
        return image, decode_colour_labels(colours, LFW_LABEL_COLOURS, label_path)

    __doc__ = __doc__.format(layout=textwrap.indent(LFW_LAYOUT, "    "))


def decode_colour_labels(colours, palette, path="<array>"):
    """Class indices of a colour-coded label image.

    ``colours``: uint8 ``(H, W, 3)``; ``palette``: the RGB colour of each class, in class order.
    Returns uint8 ``(H, W)``. A pixel of any other colour is an error that names ``path``, the
    number of such pixels and the most frequent unknown colours.
    """
    colours = numpy.asarray(colours)
    if colours.ndim != 3 or colours.shape[2] != 3 or colours.dtype != numpy.uint8:
        raise ValueError(f"label {path}: a colour-coded label image is uint8 (H, W, 3) RGB, "
                         f"got {colours.dtype} {colours.shape}")
    table = numpy.asarray(palette)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) == 0 or table.min() < 0 or table.max() > 255:
        raise ValueError(f"decode_colour_labels: the palette is one RGB colour (0-255) per class, (K, 3) with "
                         f"K >= 1, got shape {table.shape}")
    codes = _colour_codes(colours)
    known = numpy.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=numpy.int32)
    order = numpy.argsort(known)
    position = numpy.searchsorted(known[order], codes).clip(0, len(known) - 1)
    matched = known[order][position] == codes
    if not matched.all():
        unknown, counts = numpy.unique(codes[~matched], return_counts=True)
        most = numpy.argsort(counts)[::-1][:3]
        examples = ", ".join(f"{tuple(int(c) for c in _code_colour(unknown[k]))} ({counts[k]} pixels)" for k in most)
        raise MalformedDataError(
            f"label {path}: {int((~matched).sum())} of {codes.size} pixels have colours that are no class "
            f"colour (expected only {', '.join(str(c) for c in palette)}); most frequent: {examples}")
    return order[position].astype(numpy.uint8)


def _colour_codes(colours):
    colours = colours.astype(numpy.int32)
    return (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]


def _code_colour(code):
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


# ---------------------------------------------------------------------------------------------
# HELEN, as relabelled by Smith et al. 2013

HELEN_LAYOUT = """\
  <root>/
    images/<id>.jpg                                 the images
    labels/<id>/<id>_lbl00.png .. <id>_lbl10.png    one grey map (0-255) per class, in HELEN_CLASSES order
    exemplars.txt (train), tuning.txt (validation), testing.txt (test)   one 'index , id' a line"""

HELEN_SPLIT_FILES = {"train": "exemplars.txt", "validation": "tuning.txt", "test": "testing.txt"}


class Helen(Dataset):
    """HELEN faces with the 11-class labels of Smith et al. (CVPR 2013).

    ``Helen(root, split)`` with ``split`` one of ``train`` (2,000, ``exemplars.txt``), ``validation``
    (230, ``tuning.txt``) or ``test`` (100, ``testing.txt``), read from ``root`` in this layout::

{layout}

    The label of a pixel is the class whose map is largest there (ties go to the earlier class,
    so a pixel that every map leaves at 0 is background). Every map must be an 8-bit grey image
    of the image's size.

    ``ds[i]`` returns uint8 ``(H, W, 3)`` RGB and uint8 ``(H, W)`` labels in ``HELEN_CLASSES``, at
    the image's own size (which varies from image to image).
    """

    classes = HELEN_CLASSES

    def __init__(self, root, split):
        _check_split(split, "Helen")
        self.root, self.split = os.fspath(root), split
        _require_folder(self.root, "Helen", HELEN_LAYOUT)
        self.image_folder = os.path.join(self.root, "images")
        self.label_folder = os.path.join(self.root, "labels")
        self.split_path = os.path.join(self.root, HELEN_SPLIT_FILES[split])
        _require_folder(self.image_folder, "Helen", HELEN_LAYOUT)
        _require_folder(self.label_folder, "Helen", HELEN_LAYOUT)
        _require_file(self.split_path, f"Helen split {split!r}", HELEN_LAYOUT)

        names, numbers, missing = [], [], []
        for number, line in _split_lines(self.split_path):
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != 2 or not (fields[0].isascii() and fields[0].isdigit()) or not fields[1]:
                raise MalformedDataError(f"Helen: {self.split_path} line {number} is {line!r}; "
                                         "expected an index, a comma and an image id, like '1 , 100032540_1'")
            stem = fields[1]
            # the image a file, its labels a folder of per-class maps: either the other kind is missing too
            for path, present in ((self._image_path(stem), os.path.isfile),
                                  (os.path.join(self.label_folder, stem), os.path.isdir)):
                if not present(path):
                    missing.append((number, line, path))
            names.append(stem)
            numbers.append(number)
        if missing:
            _report_missing("Helen", self.split_path, missing, HELEN_LAYOUT)
        _refuse_duplicates("Helen", self.split_path, zip(numbers, names))
        if not names:
            raise MalformedDataError(f"Helen: split list {self.split_path} names no samples")
        self._names = tuple(names)

    def _image_path(self, stem):
        return os.path.join(self.image_folder, stem + ".jpg")

    def _label_path(self, stem, class_index):
        return os.path.join(self.label_folder, stem, f"{stem}_lbl{class_index:02d}.png")

    def _load(self, index):
        stem = self.names[index]
        image_path = self._image_path(stem)
        image = read_rgb(image_path, "HELEN image")
        best = numpy.zeros(image.shape[:2], dtype=numpy.uint8)
        labels = numpy.zeros(image.shape[:2], dtype=numpy.uint8)
        for class_index in range(len(HELEN_CLASSES)):
            path = self._label_path(stem, class_index)
            if not os.path.isfile(path):
                raise MissingDataError(f"Helen: label map {path} of class {HELEN_CLASSES[class_index]!r} "
                                       f"does not exist; expected this layout:\n{HELEN_LAYOUT}")
            picture = _read_picture(path, "HELEN label map")
            if picture.mode != "L":
                raise MalformedDataError(f"HELEN label map {path} has Pillow mode {picture.mode!r}; "
                                         "expected an 8-bit grey PNG (mode 'L')")
            probability = numpy.asarray(picture)
            _check_same_size(path, probability.shape, image_path, image.shape)
            wins = probability > best  # strictly larger: ties stay with the earlier class
            labels[wins] = class_index
            numpy.maximum(best, probability, out=best)
        return image, labels

    __doc__ = __doc__.format(layout=textwrap.indent(HELEN_LAYOUT, "    "))


# ---------------------------------------------------------------------------------------------
# CelebAMask-HQ

CELEBAMASK_LAYOUT = """\
  <root>/
    CelebA-HQ-img/<k>.jpg                                   the images, k = 0, 1, 2, ...
    CelebAMask-HQ-mask-anno/<k // 2000>/<k:05d>_<part>.png  one binary mask per part present"""

#: The parts of CelebAMask-HQ in the order its own tools paint them (later parts cover earlier
#: ones), with the HELEN class each becomes; ``None`` marks parts with no HELEN counterpart
#: (glasses, ears, earrings, hat, neck, necklace, cloth): they are not painted, so their pixels
#: keep whatever label lies beneath them, background if none. CelebAMask-HQ's ``l_``/``r_`` parts
#: are mapped by name to "left"/"right"; this mapping has not been checked against the real files.
CELEBAMASK_PARTS = (
    ("skin", "skin"), ("nose", "nose"), ("eye_g", None), ("l_eye", "left eye"), ("r_eye", "right eye"),
    ("l_brow", "left brow"), ("r_brow", "right brow"), ("l_ear", None), ("r_ear", None),
    ("mouth", "inner mouth"), ("u_lip", "upper lip"), ("l_lip", "lower lip"), ("hair", "hair"),
    ("hat", None), ("ear_r", None), ("neck_l", None), ("neck", None), ("cloth", None),
)
_CELEBAMASK_PART_NAMES = tuple(part for part, _ in CELEBAMASK_PARTS)
# ASCII digits only (\d would take '²' and other Unicode digits); any case of the extension
_CELEBAMASK_MASK_FILE = re.compile(r"^([0-9]{5})_([a-z_]+)\.png$", re.IGNORECASE)
_CELEBAMASK_IMAGE_FILE = re.compile(r"^([0-9]+)\.jpe?g$", re.IGNORECASE)
#: Extensions of pictures that CelebA-HQ-img should not hold under another name than '<k>.jpg'.
_PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_CELEBAMASK_MASK_SUFFIX = re.compile(r"\.png$", re.IGNORECASE)
_CELEBAMASK_IMAGES_PER_FOLDER = 2000


class CelebAMaskHQ(Dataset):
    """CelebAMask-HQ (Lee et al., CVPR 2020), its 18 parts (19 classes with
    the background) mapped to the 11 HELEN classes.

    ``CelebAMaskHQ(root)`` reads every image of ``CelebA-HQ-img`` (sorted by number) from::

{layout}

    The part masks are painted in CelebAMask-HQ's own order (see ``CELEBAMASK_PARTS`` for the
    mapping and for the parts that have no HELEN class). An image without any mask is an error.
    The masks (512x512) are coarser than the images (1024x1024): the image is resized (bilinear,
    antialiased) to the masks' size so that ``ds[i]`` returns uint8 ``(512, 512, 3)`` and uint8
    ``(512, 512)`` labels in ``HELEN_CLASSES``.
    """

    classes = HELEN_CLASSES

    def __init__(self, root):
        self.root = os.fspath(root)
        _require_folder(self.root, "CelebAMaskHQ", CELEBAMASK_LAYOUT)
        self.image_folder = os.path.join(self.root, "CelebA-HQ-img")
        self.mask_folder = os.path.join(self.root, "CelebAMask-HQ-mask-anno")
        _require_folder(self.image_folder, "CelebAMaskHQ", CELEBAMASK_LAYOUT)
        _require_folder(self.mask_folder, "CelebAMaskHQ", CELEBAMASK_LAYOUT)

        self._image_files = {}  # k -> the file's own name, as found (2.jpg, or 002.JPG)
        for file_name in sorted(os.listdir(self.image_folder)):
            match = _CELEBAMASK_IMAGE_FILE.match(file_name)
            if not match:
                # (a hidden file, such as the ._0.jpg that a Mac leaves beside 0.jpg, is not a picture)
                if not file_name.startswith(".") and os.path.splitext(file_name)[1].lower() in _PICTURE_EXTENSIONS:
                    # an image under another name or format would be left out silently, with its masks
                    raise MalformedDataError(f"CelebAMaskHQ: {os.path.join(self.image_folder, file_name)} is not "
                                             f"named '<k>.jpg', as the release names its images; expected this "
                                             f"layout:\n{CELEBAMASK_LAYOUT}")
                continue
            k = int(match.group(1))
            if k in self._image_files:
                raise MalformedDataError(f"CelebAMaskHQ: {self.image_folder} holds two files of image {k}, "
                                         f"{self._image_files[k]} and {file_name}")
            self._image_files[k] = file_name
        numbers = sorted(self._image_files)
        if not numbers:
            raise MissingDataError(f"CelebAMaskHQ: {self.image_folder} holds no '<k>.jpg' images; "
                                   f"expected this layout:\n{CELEBAMASK_LAYOUT}")
        self._parts = self._index_masks()
        without_masks = [k for k in numbers if k not in self._parts]
        if without_masks:
            k = without_masks[0]
            more = f" (and {len(without_masks) - 1} more images have none)" if len(without_masks) > 1 else ""
            raise MissingDataError(
                f"CelebAMaskHQ: image {os.path.join(self.image_folder, self._image_files[k])} has no mask file "
                f"{os.path.join(self._mask_subfolder(k), f'{k:05d}_<part>.png')}{more}; "
                f"expected this layout:\n{CELEBAMASK_LAYOUT}")
        self._numbers = tuple(numbers)
        self._names = tuple(str(k) for k in numbers)

    @property
    def numbers(self):
        """The number ``k`` of each sample's image ``<k>.jpg``, ascending (tuple of int)."""
        return self._numbers

    def _mask_subfolder(self, k):
        return os.path.join(self.mask_folder, str(k // _CELEBAMASK_IMAGES_PER_FOLDER))

    def _index_masks(self):
        """``{k: {part name: path}}`` of every mask file, from one listing of each mask folder (the
        paths as found, so that ``_load`` opens exactly these files). A mask in another folder
        than its number's (``k // 2000``) is an error: skipped, its part would silently become
        background."""
        parts = {}
        for folder in os.listdir(self.mask_folder):
            path = os.path.join(self.mask_folder, folder)
            if not (folder.isascii() and folder.isdigit() and os.path.isdir(path)):
                continue
            for file_name in os.listdir(path):
                if not _CELEBAMASK_MASK_SUFFIX.search(file_name):
                    continue
                match = _CELEBAMASK_MASK_FILE.match(file_name)
                part = match.group(2).lower() if match else None
                if part not in _CELEBAMASK_PART_NAMES:
                    raise MalformedDataError(
                        f"CelebAMaskHQ: mask file {os.path.join(path, file_name)} does not name a known "
                        f"part; expected '<k:05d>_<part>.png' with part one of {', '.join(_CELEBAMASK_PART_NAMES)}")
                k = int(match.group(1))
                if k // _CELEBAMASK_IMAGES_PER_FOLDER != int(folder):
                    raise MalformedDataError(
                        f"CelebAMaskHQ: mask file {os.path.join(path, file_name)} is in folder {folder}, but the "
                        f"masks of image {k} belong in folder {k // _CELEBAMASK_IMAGES_PER_FOLDER}")
                if part in parts.get(k, {}):
                    raise MalformedDataError(f"CelebAMaskHQ: two mask files of part {part} of image {k}: "
                                             f"{parts[k][part]} and {os.path.join(path, file_name)}")
                parts.setdefault(k, {})[part] = os.path.join(path, file_name)
        return parts

    def _load(self, index):
        k = self._numbers[index]
        image_path = os.path.join(self.image_folder, self._image_files[k])
        picture = Image.fromarray(read_rgb(image_path, "CelebAMask-HQ image"))
        labels, first_mask, first_path = None, None, None
        for part, class_name in CELEBAMASK_PARTS:
            path = self._parts[k].get(part)
            if path is None:
                continue
            mask = _read_picture(path, "CelebAMask-HQ mask")
            if labels is None:
                first_mask, first_path = mask, path
                labels = numpy.zeros((mask.height, mask.width), dtype=numpy.uint8)
            elif mask.size != first_mask.size:
                raise MalformedDataError(f"CelebAMask-HQ mask {path} is {mask.width}x{mask.height} but "
                                         f"{first_path} is {first_mask.width}x{first_mask.height}")
            if class_name is not None:
                labels[numpy.asarray(mask.convert("L")) != 0] = HELEN_CLASSES.index(class_name)
        if picture.size != first_mask.size:
            (width, height), (mask_width, mask_height) = picture.size, first_mask.size
            if width * mask_height != height * mask_width:
                raise MalformedDataError(f"CelebAMask-HQ image {image_path} is {width}x{height}, not the shape "
                                         f"of its masks ({mask_width}x{mask_height})")
            picture = picture.resize(first_mask.size, Image.BILINEAR)
        return numpy.asarray(picture), labels

    __doc__ = __doc__.format(layout=textwrap.indent(CELEBAMASK_LAYOUT, "    "))
