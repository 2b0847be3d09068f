"""The label and landmark vocabulary shared by datasets, augmentation, metrics and pictures.

Label maps are ``(H, W)`` arrays of class indices into one of two class lists:

``HELEN_CLASSES``
    The 11 classes of HELEN as relabelled by Smith et al. (2013), in their file order
    (``_lbl00`` .. ``_lbl10``). "Left" and "right" name the side of the *image*: the left eye is
    the one with the smaller x in an upright face (the person's right eye).
``LFW_CLASSES``
    The 3 classes of LFW-PL (Kae et al. 2013): background, skin, hair.

Every facial part counts as skin in the 3-class setting (``HELEN_TO_LFW``), as LFW-PL labels it.
"""

import numpy

HELEN_CLASSES = (
    "background", "skin", "left brow", "right brow", "left eye", "right eye",
    "nose", "upper lip", "inner mouth", "lower lip", "hair",
)
LFW_CLASSES = ("background", "skin", "hair")

BACKGROUND = 0  # index of "background" in both class lists; padding and warping fill with it

#: ``HELEN_TO_LFW[helen_label]`` is the LFW label: a lookup table, uint8 ``(11,)``.
HELEN_TO_LFW = numpy.array(
    [LFW_CLASSES.index(name if name in ("background", "hair") else "skin") for name in HELEN_CLASSES],
    dtype=numpy.uint8,
)

# A mirrored image shows the left eye where the right one was; its label must follow.
def class_list(n_classes):
    """The class names for ``n_classes`` (11 -> ``HELEN_CLASSES``, 3 -> ``LFW_CLASSES``)."""
    if n_classes == len(HELEN_CLASSES):
        return HELEN_CLASSES
    if n_classes == len(LFW_CLASSES):
        return LFW_CLASSES
    raise ValueError(f"n_classes must be {len(HELEN_CLASSES)} (HELEN) or {len(LFW_CLASSES)} (LFW-PL), "
                     f"got {n_classes!r}")


def mirror_permutation(classes):
    """The label permutation that horizontal mirroring applies, uint8 ``(K,)``.

    After flipping an image left-right, a pixel labelled ``c`` must be relabelled
    ``mirror_permutation(classes)[c]``: every "left ..." class swaps with its "right ..." partner
    (brows and eyes in ``HELEN_CLASSES``), all else stays. For ``LFW_CLASSES`` it is the identity.
    Names match whatever their case, and with ``_`` or ``-`` between words ("Left Eye", "left_eye");
    a left or right class without its partner is a ValueError, since keeping it would average a
    left part with a right one; so is a side not written as a word of its own ("leftEye"), which
    would be read as no side.
    """
    classes = tuple(classes)
    permutation = numpy.arange(len(classes), dtype=numpy.uint8)
    sides = {}  # the part's name without its side -> {side: index}
    for index, name in enumerate(classes):
        words = str(name).lower().replace("_", " ").replace("-", " ").split()
        side = [word for word in words if word in ("left", "right")]
        if len(side) == 1:
            part = " ".join(word for word in words if word not in ("left", "right"))
            sides.setdefault(part, {})[side[0]] = index
        elif not side and any(word in str(name).lower() for word in ("left", "right")):
            raise ValueError(f"mirror_permutation: cannot tell the side of class {name!r}; write it as a word "
                             "of its own ('left eye', 'left_eye', 'Left-Eye')")
    for part, indices in sides.items():
        if set(indices) != {"left", "right"}:
            (side, index), = indices.items()
            raise ValueError(f"mirror_permutation: class {classes[index]!r} has no "
                             f"{'right' if side == 'left' else 'left'} partner among {list(classes)}; "
                             "mirroring would swap it with nothing")
        permutation[indices["left"]], permutation[indices["right"]] = indices["right"], indices["left"]
    return permutation


def _indices(*names):
    return tuple(HELEN_CLASSES.index(name) for name in names)


#: The facial components scored in the paper's Table 3, as tuples of ``HELEN_CLASSES`` indices.
#: "mouth" is the union of the lips and the inner mouth; "overall" is the union of every facial
#: component (eyes, brows, nose, mouth), the convention of Smith et al. that Table 3 follows
#: (skin and hair are not part of it).
COMPONENT_GROUPS = {
    "eyes": _indices("left eye", "right eye"),
    "brows": _indices("left brow", "right brow"),
    "nose": _indices("nose"),
    "in mouth": _indices("inner mouth"),
    "U-lip": _indices("upper lip"),
    "L-lip": _indices("lower lip"),
    "mouth": _indices("upper lip", "inner mouth", "lower lip"),
    "skin": _indices("skin"),
    "overall": _indices("left brow", "right brow", "left eye", "right eye",
                        "nose", "upper lip", "inner mouth", "lower lip"),
}

#: The five key points that place the stage-2 crops, in this order; "left" is the image's left,
#: as for the classes. Key point arrays are ``(..., 5, 2)`` float ``(x, y)`` pixel coordinates,
#: pixel centres at integers.
KEYPOINT_NAMES = ("left eye centre", "right eye centre", "nose tip", "left mouth corner", "right mouth corner")
#: ``points[..., KEYPOINT_MIRROR_ORDER, :]`` relists the key points of a mirrored face in order.
KEYPOINT_MIRROR_ORDER = (1, 0, 2, 4, 3)
