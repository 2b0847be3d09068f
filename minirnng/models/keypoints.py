"""The five key points that place the stage-2 crops, read off an 11-class label map.

The paper takes its five points (eye centres, nose tip, mouth corners) from a landmark detector.
minirnng reads them from a HELEN label map instead: the ground truth during training (then
jittered, :func:`jitter_keypoints`), the stage-1 prediction at test time, so that a bare image is
enough. Where a dataset ships landmarks (the synthetic faces do), training may use those.

From a label map ``(H, W)`` (:func:`keypoints_from_labels`):

- eye centres: the centroids of the two largest connected regions of "left eye" or "right eye"
  (both classes together, so that an eye the stage-1 network gives the wrong side still counts),
  the one on the image's left first;
- mouth corners: the mouth is the largest connected region of upper lip, inner mouth and lower
  lip; its corners are its two extremes along the line through the eyes (the image's x axis when
  the eyes are missing), each the mean of the pixels within ``CORNER_BAND`` pixels of the extreme,
  moved out by half a pixel (the extreme pixel's outer edge);
- nose tip: the centroid of the lowest ``TIP_FRACTION`` (along the face's "down") of the largest
  connected nose region.

On ground truth that is all (measured on synthetic faces: a median error of 0.3 pixel for the
eyes, 0.4 for the nose tip, 0.7 for the mouth corners, at 128 x 128). A stage-1 prediction also
has stray blobs and misses parts, so with a mean face shape (:class:`FaceShape`) the reading is
guided by the face's geometry:

- eyes: of the ``_EYE_CANDIDATES`` largest eye regions, the pair with the most pixels whose
  distance fits the size of the face region (within a factor 2) and whose line is closer to
  horizontal than vertical;
- mouth, then nose: the mean shape, aligned to the points found so far, predicts where the part
  is; of the part's regions near there, the one whose point is nearest the prediction counts if
  it is within ``GATE`` eye distances, else the prediction stands in.

Regions smaller than ``MINIMUM_PIXELS`` are noise and ignored. A point that cannot be found is
filled in from the mean shape aligned to the points that were found (:func:`complete_keypoints`).

Key point arrays are float64 ``(..., 5, 2)`` ``(x, y)``, pixel centres at integers.
"""

import dataclasses

import numpy
from scipy import ndimage

from ..data.classes import HELEN_CLASSES

MINIMUM_PIXELS = 3
CORNER_BAND = 1.0
TIP_FRACTION = 0.3
#: How far (in eye distances) a part may lie from where the mean shape predicts it and still count.
GATE = 0.35
#: How far beyond the gate (in eye distances) a part's region may reach: the search window.
SEARCH_REACH = 0.6
#: How many of the largest eye regions are weighed as pairs when a face shape guides the search.
_EYE_CANDIDATES = 6
_EIGHT_NEIGHBOURS = numpy.ones((3, 3), dtype=bool)

_EYES = [HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("right eye")]


def _member_table(*names):
    """bool ``(256,)``: ``table[labels]`` is the mask of those classes (a lookup is cheaper than isin)."""
    table = numpy.zeros(256, dtype=bool)
    table[[HELEN_CLASSES.index(name) for name in names]] = True
    return table


_IS_EYE = _member_table("left eye", "right eye")
_IS_NOSE = _member_table("nose")
_IS_MOUTH = _member_table("upper lip", "inner mouth", "lower lip")
_IS_FACE = ~_member_table("background", "hair")


def _regions(mask, keep=None, around=None):
    """The ``keep`` (all if None) largest 8-connected regions of a bool mask with at least
    ``MINIMUM_PIXELS`` pixels, largest first, each as ``(x, y)`` float64 ``(P, 2)`` pixel centres.

    around : optional ``(centre (x, y), half size)``: look only in that square window (a region
    is cut at its edge), which is where the face shape says the part must be, and is cheaper.
    """
    top = left = 0
    if around is not None:
        (x, y), half = around
        top, left = max(int(y - half), 0), max(int(x - half), 0)
        mask = mask[top:max(int(y + half) + 1, top), left:max(int(x + half) + 1, left)]
    labelled, count = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    if count == 0:
        return []
    sizes = numpy.bincount(labelled.ravel())[1:]
    big_enough = numpy.flatnonzero(sizes >= MINIMUM_PIXELS)
    order = big_enough[numpy.argsort(-sizes[big_enough], kind="stable")][:keep]
    if len(order) == 0:
        return []
    boxes = ndimage.find_objects(labelled, max_label=int(order.max()) + 1)
    regions = []
    for index in order:
        box = boxes[index]
        rows, columns = numpy.nonzero(labelled[box] == index + 1)
        regions.append(numpy.stack([columns + box[1].start + left, rows + box[0].start + top], axis=1)
                       .astype(numpy.float64))
    return regions


def _eye_centres(labels, shape=None):
    """(left, right) eye centres of one label map, each an (x, y) array or None.

    Without ``shape``: the two largest eye regions. With a :class:`FaceShape`: the pair of eye
    regions with the most pixels among the plausible pairs, whose distance is within a factor 2 of
    the eye distance the face region's size predicts and whose line is less than 45 degrees from
    the image's x axis; failing that, the largest region alone.
    """
    eyes = _regions(_IS_EYE[labels], keep=2 if shape is None else _EYE_CANDIDATES)
    if shape is not None and len(eyes) > 2:
        expected = numpy.sqrt(numpy.count_nonzero(_IS_FACE[labels])) / shape.face_size
        best, best_pixels = None, 0
        for i in range(len(eyes)):
            for j in range(i + 1, len(eyes)):
                offset = eyes[j].mean(axis=0) - eyes[i].mean(axis=0)
                plausible = (0.5 * expected <= numpy.linalg.norm(offset) <= 2.0 * expected
                             and abs(offset[1]) < abs(offset[0]))
                if plausible and len(eyes[i]) + len(eyes[j]) > best_pixels:
                    best, best_pixels = [eyes[i], eyes[j]], len(eyes[i]) + len(eyes[j])
        eyes = best if best is not None else eyes[:1]
    centres = [region.mean(axis=0) for region in eyes]
    if len(centres) == 2:
        left, right = sorted(centres, key=lambda centre: centre[0])
        return left, right
    if len(centres) == 1:  # one eye: its own label says which
        region = eyes[0].astype(numpy.int64)
        values = labels[region[:, 1], region[:, 0]]
        if (values == _EYES[0]).sum() >= (values == _EYES[1]).sum():
            return centres[0], None
        return None, centres[0]
    return None, None


def _mouth_corners(region, across):
    """Left and right corners of a mouth region (P, 2) along the unit vector ``across``."""
    along = region @ across
    # A pixel reaches half a pixel beyond its centre: so does the mouth.
    left = region[along <= along.min() + CORNER_BAND].mean(axis=0) - 0.5 * across
    right = region[along >= along.max() - CORNER_BAND].mean(axis=0) + 0.5 * across
    return left, right


def _nose_tip(region, down):
    """The tip of a nose region (P, 2): the centroid of its lowest part along the unit vector ``down``."""
    height = region @ down
    return region[height >= height.max() - TIP_FRACTION * (height.max() - height.min())].mean(axis=0)


def _nearest(candidates, prediction, radius):
    """The candidate (an array of points) nearest to ``prediction`` (same shape), if within ``radius``
    (root-mean-square distance of its points); else None."""
    best, best_distance = None, radius
    for candidate in candidates:
        distance = numpy.sqrt(((candidate - prediction) ** 2).sum(axis=-1).mean())
        if distance <= best_distance:
            best, best_distance = candidate, distance
    return best


def _one_face(labels, shape=None):
    """float64 ``(5, 2)`` points (NaN where missing) of one label map ``(H, W)``.

    Without ``shape``, each part is its largest region. With a :class:`FaceShape` and both eyes
    found, the mouth and then the nose are checked against the positions the mean shape predicts
    from the points found so far: of their regions in a window ``GATE + SEARCH_REACH`` eye
    distances around the prediction, the one whose point is nearest the prediction is taken if it
    lies within ``GATE`` eye distances of it (stray blobs of a weak stage 1 are ignored).
    """
    points = numpy.full((5, 2), numpy.nan)
    left, right = _eye_centres(labels, shape)
    if left is not None:
        points[0] = left
    if right is not None:
        points[1] = right
    across = numpy.array([1.0, 0.0])
    eye_distance = None
    if left is not None and right is not None and numpy.linalg.norm(right - left) > 1e-6:
        eye_distance = numpy.linalg.norm(right - left)
        across = (right - left) / eye_distance
    down = numpy.array([-across[1], across[0]])

    if shape is None or eye_distance is None:
        mouths = _regions(_IS_MOUTH[labels], keep=1)
        if mouths:
            points[3], points[4] = _mouth_corners(mouths[0], across)
        noses = _regions(_IS_NOSE[labels], keep=1)
        if noses:
            points[2] = _nose_tip(noses[0], down)
        return points

    radius = GATE * eye_distance
    reach = radius + SEARCH_REACH * eye_distance
    mean = numpy.asarray(shape.mean, dtype=numpy.float64)
    known = numpy.zeros(5, dtype=bool)
    known[:2] = True
    predicted = _similarity(mean[known], points[known])(mean)
    mouths = _regions(_IS_MOUTH[labels], around=((predicted[3] + predicted[4]) / 2, reach))
    corners = _nearest([numpy.stack(_mouth_corners(region, across)) for region in mouths], predicted[3:], radius)
    if corners is not None:
        points[3:] = corners
        known[3:] = True
        predicted = _similarity(mean[known], points[known])(mean)
    noses = _regions(_IS_NOSE[labels], around=(predicted[2], reach))
    tip = _nearest([_nose_tip(region, down) for region in noses], predicted[2], radius)
    if tip is not None:
        points[2] = tip
    return points


def keypoints_from_labels(labels, shape=None):
    """Key points of HELEN label maps ``(N, H, W)`` (or one ``(H, W)``): ``(points, found)``.

    points : float64 ``(N, 5, 2)`` (or ``(5, 2)``); found : bool ``(N, 5)`` (or ``(5,)``), False
    where a point was not in the labels. With ``shape`` (a :class:`FaceShape`) the reading is guided
    by the face's geometry (module docstring) and missing points are filled in
    (:func:`complete_keypoints`): the mode for stage-1 predictions. Without, every part is its
    largest region and missing points are NaN: the mode for ground truth.
    """
    labels = numpy.asarray(labels)
    single = labels.ndim == 2
    if single:
        labels = labels[None]
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise ValueError(f"keypoints_from_labels: labels must be integer (N, H, W) or (H, W), "
                         f"got {labels.dtype} {labels.shape}")
    points = numpy.stack([_one_face(label_map, shape) for label_map in labels])
    found = numpy.isfinite(points).all(axis=2)
    if shape is not None:
        points = complete_keypoints(points, found, shape, labels)
    return (points[0], found[0]) if single else (points, found)


def jitter_keypoints(points, sigma, rng):
    """Training augmentation: each point moved by a normal draw of ``sigma`` times its face's eye
    distance (per coordinate). points float ``(N, 5, 2)`` -> float64 ``(N, 5, 2)``."""
    points = numpy.asarray(points, dtype=numpy.float64)
    scale = numpy.linalg.norm(points[:, 1] - points[:, 0], axis=1)
    return points + sigma * scale[:, None, None] * rng.standard_normal(points.shape)


# ---------------------------------------------------------------------------------------------
# A mean face shape for the points that are missing


@dataclasses.dataclass(frozen=True)
class FaceShape:
    """The mean key points in a face-centred frame: they guide the reading of a stage-1 prediction
    and fill in the points that cannot be found.

    mean : float ``(5, 2)``, the points with the eye midpoint at the origin, the eyes along x and
        the eye distance 1 (so the eyes are ``(-0.5, 0)`` and ``(0.5, 0)``);
    face_offset : ``(x, y)`` of the face region's centroid (every class but background and hair)
        in that frame; face_size : the square root of the face region's area in eye distances.
        These two place the mean shape when fewer than two points are found.
    """

    # The defaults: fitted on the 1200 training faces of the small Table 3 budget, rounded.
    mean: tuple = ((-0.5, 0.0), (0.5, 0.0), (0.0, 0.64), (-0.39, 1.07), (0.39, 1.07))
    face_offset: tuple = (0.0, 0.40)
    face_size: float = 2.15

    @classmethod
    def fit(cls, points, labels=None):
        """The mean shape of key points float ``(N, 5, 2)`` (all found); with their label maps
        ``(N, H, W)`` also the face region's placement."""
        points = numpy.asarray(points, dtype=numpy.float64)
        middle = (points[:, 0] + points[:, 1]) / 2
        across = points[:, 1] - points[:, 0]
        distance = numpy.linalg.norm(across, axis=1)
        keep = distance > 1e-6
        if not keep.any():
            raise ValueError("FaceShape.fit: no face with two distinct eye centres")
        normalised = [_to_eye_frame(points[n], middle[n], across[n] / distance[n], distance[n])
                      for n in numpy.flatnonzero(keep)]
        mean = numpy.mean(normalised, axis=0)
        shape = cls(mean=tuple(map(tuple, mean.tolist())))
        if labels is None:
            return shape
        offsets, sizes = [], []
        for n in numpy.flatnonzero(keep):
            rows, columns = numpy.nonzero(_IS_FACE[labels[n]])
            if len(rows):
                centroid = numpy.array([columns.mean(), rows.mean()])
                offsets.append(_to_eye_frame(centroid[None], middle[n], across[n] / distance[n], distance[n])[0])
                sizes.append(numpy.sqrt(len(rows)) / distance[n])
        if offsets:
            shape = dataclasses.replace(shape, face_offset=tuple(numpy.mean(offsets, axis=0).tolist()),
                                        face_size=float(numpy.mean(sizes)))
        return shape

    def to_dict(self):
        return {"mean": [list(p) for p in self.mean], "face_offset": list(self.face_offset),
                "face_size": self.face_size}

    @classmethod
    def from_dict(cls, values):
        try:
            mean = numpy.asarray(values["mean"], dtype=numpy.float64)
            if mean.shape != (5, 2):
                raise ValueError(f"mean must be 5 x 2, got {mean.shape}")
            return cls(mean=tuple(map(tuple, mean.tolist())), face_offset=tuple(float(v) for v in values["face_offset"]),
                       face_size=float(values["face_size"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"FaceShape: unreadable {values!r} ({error})") from None


def _to_eye_frame(points, middle, across, distance):
    down = numpy.array([-across[1], across[0]])
    return (points - middle) @ numpy.stack([across, down], axis=1) / distance


def _similarity(source, target):
    """The least-squares similarity (scale, rotation, shift) taking points ``source`` (P, 2) onto
    ``target`` (P, 2), P >= 2, as a function of points (Umeyama 1991 without reflection)."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    a, b = source - source_mean, target - target_mean
    # In complex numbers a similarity is z -> c z + t; least squares gives c = sum(conj(a) b) / sum(|a|^2).
    za, zb = a[:, 0] + 1j * a[:, 1], b[:, 0] + 1j * b[:, 1]
    c = (numpy.conj(za) * zb).sum() / max((numpy.abs(za) ** 2).sum(), 1e-12)

    def transform(points):
        z = (points[:, 0] - source_mean[0]) + 1j * (points[:, 1] - source_mean[1])
        w = c * z
        return numpy.stack([w.real + target_mean[0], w.imag + target_mean[1]], axis=1)

    return transform


def complete_keypoints(points, found, shape, labels=None):
    """Fill in the missing key points: float64 ``(N, 5, 2)`` with every point finite.

    With two or more points found, the mean shape is aligned to them by a least-squares similarity
    and gives the others. With fewer, the mean shape is placed on the face region (every pixel
    not labelled background or hair) of ``labels`` ``(N, H, W)``; with no face region either, on
    the middle of the image, eye distance a quarter of its width (a last resort: nothing was found).
    """
    points = numpy.array(points, dtype=numpy.float64)
    found = numpy.asarray(found, dtype=bool)
    mean = numpy.asarray(shape.mean, dtype=numpy.float64)
    for n in numpy.flatnonzero(~found.all(axis=1)):
        known = found[n]
        if known.sum() >= 2:
            points[n, ~known] = _similarity(mean[known], points[n, known])(mean[~known])
            continue
        if labels is not None:
            rows, columns = numpy.nonzero(_IS_FACE[labels[n]])
            height, width = labels.shape[1:]
        else:
            rows = columns = numpy.array([])
            height = width = None
        if len(rows):
            distance = numpy.sqrt(len(rows)) / shape.face_size
            centre = numpy.array([columns.mean(), rows.mean()])
        elif labels is not None:
            distance, centre = width / 4, numpy.array([(width - 1) / 2, (height - 1) / 2])
        else:
            raise ValueError(f"complete_keypoints: face {n} has fewer than two key points and no label map "
                             "to place the mean shape on")
        guess = centre + distance * (mean - numpy.asarray(shape.face_offset))
        points[n, ~known] = guess[~known]
    return points


__all__ = ["keypoints_from_labels", "jitter_keypoints", "FaceShape", "complete_keypoints"]
