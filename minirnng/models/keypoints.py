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
  it is within ``GATE`` eye distances, else the prediction stands in;
- with one eye found, the mean shape is placed on that eye, upright, its eye distance predicted by
  the size of the face region, and the gate is ``ONE_EYE_GATE`` (that size is a rougher ruler).

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
#: GATE for a face with one eye found, whose mean shape is placed on that eye and sized by the face region:
#: that size predicts the eye distance only roughly (5th to 95th percentile 0.74 to 1.24 times it on the
#: synthetic faces' ground truth, 0.73 to 1.55 on stage-1 maps), which moves the predicted mouth by half an
#: eye distance or more. A lip blob where the other eye should be, or the mouth seen from an eye given the
#: wrong side, is about an eye distance off. (On the 150 validation faces of the small Table 3 run, gates of
#: 0.35 to 0.6 score within 0.1 of each other; 0.5 leaves room for the ruler's error.)
ONE_EYE_GATE = 0.5
#: How far beyond the gate (in eye distances) a part's region may reach: the search window.
SEARCH_REACH = 0.6
#: How many of the largest eye regions are weighed as pairs when a face shape guides the search.
_EYE_CANDIDATES = 6
#: 8-connectivity within each face of a batch (N, H, W), none across faces
_EIGHT_NEIGHBOURS_IN_A_FACE = numpy.zeros((3, 3, 3), dtype=bool)
_EIGHT_NEIGHBOURS_IN_A_FACE[1] = True

_EYES = [HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("right eye")]
#: key point indices: the eye centres and the mouth corners (all but the nose tip)
_EYES_AND_CORNERS = [0, 1, 3, 4]


def _member_table(*names):
    """bool ``(256,)``: ``table[labels]`` is the mask of those classes (a lookup is cheaper than isin)."""
    table = numpy.zeros(256, dtype=bool)
    table[[HELEN_CLASSES.index(name) for name in names]] = True
    return table


_IS_FACE = ~_member_table("background", "hair")
#: ``_PART[labels]``: in one lookup for all the parts, the part of each pixel (uint8): one of
#: ``_EYE``, ``_NOSE``, ``_MOUTH``, or ``_OTHER`` for the rest of the face, 0 outside the face
_EYE, _NOSE, _MOUTH, _OTHER = 1, 2, 3, 4
_PART = numpy.where(_IS_FACE, _OTHER, 0).astype(numpy.uint8)
_PART[_member_table("left eye", "right eye")] = _EYE
_PART[_member_table("nose")] = _NOSE
_PART[_member_table("upper lip", "inner mouth", "lower lip")] = _MOUTH


class _Regions:
    """The 8-connected regions of one part in a batch of masks, labelled in one pass for all faces.

    masks : bool ``(N, H, W)``; windows : optional int ``(N, 4)`` ``(top, bottom, left, right)``,
    one per face: only the pixels inside a face's window count, so a region is cut at its edge
    (as if the window had been cut out and labelled alone). One ``ndimage.label`` call for the
    batch instead of one per face and part, and the regions' sizes, centroids and pixel lists from
    a few array operations instead of a few per region (with the other batch-wide steps of
    :func:`_read_keypoints`: key points of 16 faces in 2.7 ms instead of 5.6). ``ndimage.label``
    numbers the regions in raster order, so face ``n``'s regions are a run of consecutive numbers,
    in the order labelling face ``n`` alone gives them: the choices below are the same.

    Per region (its number ``r``): ``sizes[r]`` pixels, ``centroids[r]`` ``(x, y)`` float64;
    :meth:`largest` lists a face's regions, :meth:`pixels` gives one region's pixel centres.
    """

    def __init__(self, masks, windows=None):
        n, height, width = masks.shape
        if windows is not None:
            rows, columns = numpy.arange(height), numpy.arange(width)
            top, bottom, left, right = (windows[:, k, None] for k in range(4))
            masks = (masks & ((rows >= top) & (rows < bottom))[:, :, None]
                     & ((columns >= left) & (columns < right))[:, None, :])
        # Labelling costs per pixel, and most of a mask is empty: label only the box that holds
        # the pixels of every face (at least one pixel, so that an empty batch labels too).
        rows = numpy.flatnonzero(masks.any(axis=(0, 2)))
        columns = numpy.flatnonzero(masks.any(axis=(0, 1)))
        top, left = (int(rows[0]), int(columns[0])) if len(rows) else (0, 0)
        bottom, right = (int(rows[-1]) + 1, int(columns[-1]) + 1) if len(rows) else (1, 1)
        box = masks[:, top:bottom, left:right]
        labelled, count = ndimage.label(box, structure=_EIGHT_NEIGHBOURS_IN_A_FACE)
        box_height, box_width = box.shape[1:]
        flat = labelled.ravel()
        # The foreground grouped by region, raster order within each: the pixels of region r
        # are positions[start[r]:start[r + 1]] (region 0, the background, is empty here).
        foreground = numpy.flatnonzero(box)
        region_of = flat[foreground]
        order = numpy.argsort(region_of, kind="stable")
        positions = foreground[order]
        self.sizes = numpy.bincount(region_of, minlength=count + 1)
        self.start = numpy.concatenate([[0], numpy.cumsum(self.sizes)])
        self.points = numpy.stack([positions % box_width + left, positions // box_width % box_height + top],
                                  axis=1).astype(numpy.float64)                    # (x, y), region by region
        # Sums of integer coordinates are exact in float64, so these are the regions' exact means,
        # the same numbers as ``pixels(r).mean(axis=0)``.
        region_sorted = region_of[order]
        sums = numpy.stack([numpy.bincount(region_sorted, weights=self.points[:, k], minlength=count + 1)
                            for k in range(2)], axis=1)
        self.centroids = sums / numpy.maximum(self.sizes, 1)[:, None]
        # The regions of at least MINIMUM_PIXELS pixels, by face, largest first, equal sizes in
        # raster order of their first pixel: face n's are ranked[bounds[n]:bounds[n + 1]]. The
        # numbering runs face by face, so a region's face follows from the last number of each.
        last = numpy.maximum.accumulate(labelled.reshape(n, -1).max(axis=1))
        big_enough = numpy.flatnonzero(self.sizes >= MINIMUM_PIXELS)
        face_of = numpy.searchsorted(last, big_enough)
        order = numpy.lexsort((big_enough, -self.sizes[big_enough], face_of))
        self.ranked = big_enough[order]
        self.bounds = numpy.searchsorted(face_of[order], numpy.arange(n + 1))

    def largest(self, face, keep=None):
        """Region numbers of ``face`` with at least ``MINIMUM_PIXELS`` pixels, largest first
        (equal sizes in raster order of their first pixel), at most ``keep`` (all if None)."""
        return self.ranked[self.bounds[face]:self.bounds[face + 1]][:keep]

    def pixels(self, region):
        """float64 ``(P, 2)``: the ``(x, y)`` centres of a region's pixels, in raster order."""
        return self.points[self.start[region]:self.start[region + 1]]


def _window(centre, half, shape):
    """``(top, bottom, left, right)`` of the square of half size ``half`` around ``centre`` (x, y),
    cut to an image of ``shape`` (H, W)."""
    (x, y), (height, width) = centre, shape
    top, left = max(int(y - half), 0), max(int(x - half), 0)
    return top, min(max(int(y + half) + 1, top), height), left, min(max(int(x + half) + 1, left), width)


def _eye_centres(eyes, face, labels, face_area, shape=None):
    """(left, right) eye centres of ``face``, each an (x, y) array or None.

    eyes : the :class:`_Regions` of the eye classes of the batch; labels : the face's label map
    (H, W); face_area : its number of face pixels (every class but background and hair). Without
    ``shape``: the two largest eye regions. With a :class:`FaceShape`: the pair of eye regions with
    the most pixels among the plausible pairs, whose distance is within a factor 2 of the eye
    distance the face region's size predicts and whose line is less than 45 degrees from the
    image's x axis; failing that, the largest region alone.
    """
    regions = eyes.largest(face, keep=2 if shape is None else _EYE_CANDIDATES)
    if shape is not None and len(regions) >= 2:
        expected = numpy.sqrt(face_area) / shape.face_size
        best, best_pixels = None, 0
        for i in range(len(regions)):
            for j in range(i + 1, len(regions)):
                offset = eyes.centroids[regions[j]] - eyes.centroids[regions[i]]
                pixels = eyes.sizes[regions[i]] + eyes.sizes[regions[j]]
                plausible = (0.5 * expected <= numpy.linalg.norm(offset) <= 2.0 * expected
                             and abs(offset[1]) < abs(offset[0]))
                if plausible and pixels > best_pixels:
                    best, best_pixels = [regions[i], regions[j]], pixels
        regions = best if best is not None else regions[:1]
    centres = [eyes.centroids[region] for region in regions]
    if len(centres) == 2:
        left, right = sorted(centres, key=lambda centre: centre[0])
        return left, right
    if len(centres) == 1:  # one eye: its own label says which
        region = eyes.pixels(regions[0]).astype(numpy.int64)
        values = labels[region[:, 1], region[:, 0]]
        if (values == _EYES[0]).sum() >= (values == _EYES[1]).sum():
            return centres[0], None
        return None, centres[0]
    return None, None


def _centroid(points):
    """The mean of points ``(P, 2)``: their sum over P (numpy's ``mean`` is this sum and division,
    with more overhead per call than the sum on these few points)."""
    return points.sum(axis=0) / len(points)


def _mouth_corners(region, across):
    """Left and right corners of a mouth region (P, 2) along the unit vector ``across``."""
    along = region @ across
    # A pixel reaches half a pixel beyond its centre: so does the mouth.
    left = _centroid(region[along <= along.min() + CORNER_BAND]) - 0.5 * across
    right = _centroid(region[along >= along.max() - CORNER_BAND]) + 0.5 * across
    return left, right


def _nose_tip(region, down):
    """The tip of a nose region (P, 2): the centroid of its lowest part along the unit vector ``down``."""
    height = region @ down
    return _centroid(region[height >= height.max() - TIP_FRACTION * (height.max() - height.min())])


def _nearest(candidates, prediction, radius):
    """``(candidate, distance)``: the candidate nearest to ``prediction`` (of equal distances, the
    last) if within ``radius``; else ``(None, inf)``.

    candidates : a list of arrays of points (..., 2), each of the shape of ``prediction``; the
    distance is the root-mean-square distance of their points.
    """
    if not candidates:
        return None, numpy.inf
    offsets = numpy.stack(candidates) - prediction                      # (Q, ..., 2)
    squared = (offsets ** 2).sum(axis=-1).reshape(len(candidates), -1)   # (Q, points per candidate)
    distances = numpy.sqrt(squared.sum(axis=1) / squared.shape[1])
    best = len(distances) - 1 - numpy.argmin(distances[::-1])
    return (candidates[best], distances[best]) if distances[best] <= radius else (None, numpy.inf)


def _place_on_one_eye(face, points, candidates, placements, radius, mean, predicted):
    """The mouth of a face with one eye found, and which eye that is; updates ``points`` and ``predicted``.

    placements (2, 5, 2): the mean shape placed on the eye as the image-left and as the image-right
    eye. The mouth region nearest the mouth either placement predicts, within ``radius``, is taken,
    and that placement's side for the eye (stage 1's side for it may be wrong); with no region
    within ``radius`` of either, the region nearest the mouth of either placement, however far (the
    face region's size is a rough ruler, and a missing mouth would be guessed from it alone), and
    stage 1's side unless the other placement's is more than 1.5 times nearer. The prediction for
    the nose is then the mean shape aligned to the eye and the mouth corners.
    """
    eye = 0 if numpy.isfinite(points[face, 0, 0]) else 1
    (corners, left_distance), (right_corners, right_distance) = (_nearest(candidates, placed[3:], radius)
                                                                 for placed in placements)
    side = eye
    if right_distance < left_distance:
        corners, side = right_corners, 1
    elif corners is not None:
        side = 0
    elif candidates:  # none within the gate: the face region misjudged the face's size
        # The nearer placement's side, if clearly nearer (stage 1's side of the eye when in doubt).
        nearest = [_nearest(candidates, placed[3:], numpy.inf) for placed in placements]
        side = 1 - eye if nearest[eye][1] > 1.5 * nearest[1 - eye][1] else eye
        corners = nearest[side][0]
    if corners is None:
        return
    found_eye = points[face, eye].copy()
    points[face, 1 - side] = numpy.nan
    points[face, side] = found_eye
    points[face, 3:] = corners
    known = [side, 3, 4]
    predicted[face] = _similarity(mean[known], points[face, known])(mean)


def _read_keypoints(labels, shape=None):
    """float64 ``(N, 5, 2)`` points (NaN where missing) of label maps ``(N, H, W)``.

    Without ``shape``, each part is its largest region. With a :class:`FaceShape`, in each face
    with an eye found, the mouth and then the nose are checked against the positions the mean
    shape predicts from the points found so far: of their regions in a window ``GATE +
    SEARCH_REACH`` eye distances around the prediction, the one whose point is nearest the
    prediction is taken if it lies within ``GATE`` eye distances of it (stray blobs of a weak
    stage 1 are ignored). With one eye the mean shape is placed on it, upright, scaled by the face
    region's size, and the gate is ``ONE_EYE_GATE``; once the mouth is found, it is realigned to
    the eye and the mouth corners.

    One step per part, eyes, then mouth, then nose (a part's search window depends on the points
    found before it): each labels the part's regions in all faces at once (:class:`_Regions`),
    then a loop over the faces chooses among them.
    """
    n, height, width = labels.shape
    points = numpy.full((n, 5, 2), numpy.nan)
    parts = _PART[labels]
    face_areas = numpy.count_nonzero(parts, axis=(1, 2))

    eyes = _Regions(parts == _EYE)
    across = numpy.tile([1.0, 0.0], (n, 1))        # per face: along the eyes (the image's x axis without them)
    eye_distance = numpy.full(n, numpy.nan)
    for face in range(n):
        left, right = _eye_centres(eyes, face, labels[face], face_areas[face], shape)
        if left is not None:
            points[face, 0] = left
        if right is not None:
            points[face, 1] = right
        if left is not None and right is not None and numpy.linalg.norm(right - left) > 1e-6:
            eye_distance[face] = numpy.linalg.norm(right - left)
            across[face] = (right - left) / eye_distance[face]
    down = numpy.stack([-across[:, 1], across[:, 0]], axis=1)
    # (Without a shape no face is guided, and the mean shape is not used.)
    mean = numpy.asarray(shape.mean, dtype=numpy.float64) if shape is not None else numpy.zeros((5, 2))
    both_eyes = numpy.flatnonzero(numpy.isfinite(eye_distance)) if shape is not None else []
    # The mean shape aligned to the eyes of every face with both: (F, 5, 2) at once.
    predicted = dict(zip(both_eyes, _similarity(mean[:2], points[both_eyes, :2])(mean)))
    # With one eye, one point cannot give a similarity: the mean shape is placed on that eye, upright,
    # with the eye distance that the size of the face region predicts (FaceShape.face_size), once as
    # the image-left eye and once as the image-right one. Stage 1 may give an eye the wrong side; the
    # mouth decides which placement holds (below).
    one_eye = {}  # face -> the two placements (2, 5, 2)
    if shape is not None:
        for face in numpy.flatnonzero(numpy.isfinite(points[:, :2, 0]).sum(axis=1) == 1):
            if face_areas[face]:
                eye = 0 if numpy.isfinite(points[face, 0, 0]) else 1
                eye_distance[face] = numpy.sqrt(face_areas[face]) / shape.face_size
                one_eye[face] = points[face, eye] + eye_distance[face] * (mean[None] - mean[:2, None])
                predicted[face] = one_eye[face][eye]
    guided = numpy.isfinite(eye_distance) & (shape is not None)
    radius = GATE * eye_distance
    for face in one_eye:
        radius[face] = ONE_EYE_GATE * eye_distance[face]
    reach = radius + SEARCH_REACH * eye_distance
    # Unguided faces search the whole image, and so do those with one eye (two placements to try);
    # the others a window around the predicted part.
    windows = numpy.tile([0, height, 0, width], (n, 1))

    with_mouth = []  # the faces with both eyes whose mouth corners are found
    for face, prediction in predicted.items():
        if face not in one_eye:
            windows[face] = _window((prediction[3] + prediction[4]) / 2, reach[face], (height, width))
    mouths = _Regions(parts == _MOUTH, windows)
    for face in range(n):
        if not guided[face]:
            regions = mouths.largest(face, keep=1)
            if len(regions):
                points[face, 3], points[face, 4] = _mouth_corners(mouths.pixels(regions[0]), across[face])
            continue
        candidates = [numpy.stack(_mouth_corners(mouths.pixels(region), across[face]))
                      for region in mouths.largest(face)]
        if face in one_eye:
            _place_on_one_eye(face, points, candidates, one_eye[face], radius[face], mean, predicted)
            continue
        corners, _ = _nearest(candidates, predicted[face][3:], radius[face])
        if corners is not None:
            points[face, 3:] = corners
            with_mouth.append(face)
    # Realigned to the eyes and mouth corners where those were found.
    realigned = _similarity(mean[_EYES_AND_CORNERS], points[with_mouth][:, _EYES_AND_CORNERS])(mean)
    predicted.update(zip(with_mouth, realigned))

    for face, prediction in predicted.items():
        windows[face] = _window(prediction[2], reach[face], (height, width))
    noses = _Regions(parts == _NOSE, windows)
    for face in range(n):
        if not guided[face]:
            regions = noses.largest(face, keep=1)
            if len(regions):
                points[face, 2] = _nose_tip(noses.pixels(regions[0]), down[face])
            continue
        tip, _ = _nearest([_nose_tip(noses.pixels(region), down[face]) for region in noses.largest(face)],
                          predicted[face][2], radius[face])
        if tip is not None:
            points[face, 2] = tip
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
    if len(labels) == 0:  # no maps: no points
        points, found = numpy.zeros((0, 5, 2)), numpy.zeros((0, 5), dtype=bool)
        return points, found
    if 0 in labels.shape[1:]:
        raise ValueError(f"keypoints_from_labels: a label map of {labels.shape[1]}x{labels.shape[2]} pixels holds no "
                         "face to read key points off")
    if labels.size and (labels.min() < 0 or labels.max() >= len(HELEN_CLASSES)):
        raise ValueError(f"keypoints_from_labels: labels must be HELEN classes 0..{len(HELEN_CLASSES) - 1}, "
                         f"got values from {labels.min()} to {labels.max()}")
    points = _read_keypoints(labels, shape)
    found = numpy.isfinite(points).all(axis=2)
    if shape is not None:
        points = complete_keypoints(points, found, shape, labels)
    return (points[0], found[0]) if single else (points, found)


def jitter_keypoints(points, sigma, rng):
    """Training augmentation: each point moved by a normal draw of ``sigma`` times its face's eye
    distance (per coordinate). points float ``(N, 5, 2)`` -> float64 ``(N, 5, 2)``; rng : a
    ``numpy.random.Generator`` or a seed."""
    points = numpy.asarray(points, dtype=numpy.float64)
    if points.ndim != 3 or points.shape[1:] != (5, 2):
        raise ValueError(f"jitter_keypoints: points must be (N, 5, 2), got {points.shape} (for one face, add "
                         "the batch axis: points[None])")
    rng = numpy.random.default_rng(rng)  # a Generator is returned as it is
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
    face_offset: tuple = (0.0, 0.41)
    face_size: float = 2.13

    @classmethod
    def fit(cls, points, labels=None):
        """The mean shape of key points float ``(N, 5, 2)`` (all found); with their label maps
        ``(N, H, W)`` also the face region's placement."""
        points = numpy.asarray(points, dtype=numpy.float64)
        if points.ndim != 3 or points.shape[1:] != (5, 2):
            raise ValueError(f"FaceShape.fit: points must be (N, 5, 2), got {points.shape} (for one face, add "
                             "the batch axis: points[None])")
        if not numpy.isfinite(points).all():
            # a NaN would become the mean shape, saved with a checkpoint and placed on every face
            faces = numpy.flatnonzero(~numpy.isfinite(points).all(axis=(1, 2)))
            raise ValueError(f"FaceShape.fit: the key points of {len(faces)} face(s) are not finite (first: face "
                             f"{faces[0]}); fit on found points only, or complete them first")
        if labels is not None:
            labels = _checked_label_maps(labels, len(points), "FaceShape.fit")
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
            offset = numpy.asarray(values["face_offset"], dtype=numpy.float64)
            size = float(values["face_size"])
            if not numpy.isfinite(mean).all():
                raise ValueError("mean must be finite")
            if offset.shape != (2,) or not numpy.isfinite(offset).all():
                raise ValueError(f"face_offset must be two finite numbers, got {values['face_offset']!r}")
            if not (numpy.isfinite(size) and size > 0):
                raise ValueError(f"face_size must be a positive number, got {size}")
            return cls(mean=tuple(map(tuple, mean.tolist())), face_offset=tuple(offset.tolist()), face_size=size)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"FaceShape: unreadable {values!r} ({error})") from None


def _to_eye_frame(points, middle, across, distance):
    down = numpy.array([-across[1], across[0]])
    return (points - middle) @ numpy.stack([across, down], axis=1) / distance


def _similarity(source, target):
    """The least-squares similarity (scale, rotation, shift) taking points ``source`` (..., P, 2)
    onto ``target`` (..., P, 2), P >= 2, as a function of points (..., Q, 2) (Umeyama 1991 without
    reflection). Leading axes are faces: one similarity per face, all computed at once."""
    source_mean, target_mean = source.mean(axis=-2), target.mean(axis=-2)
    a, b = source - source_mean[..., None, :], target - target_mean[..., None, :]
    # In complex numbers a similarity is z -> c z + t; least squares gives c = sum(conj(a) b) / sum(|a|^2).
    za, zb = a[..., 0] + 1j * a[..., 1], b[..., 0] + 1j * b[..., 1]
    c = (numpy.conj(za) * zb).sum(axis=-1) / numpy.maximum((numpy.abs(za) ** 2).sum(axis=-1), 1e-12)

    def transform(points):
        z = (points[..., 0] - source_mean[..., None, 0]) + 1j * (points[..., 1] - source_mean[..., None, 1])
        w = c[..., None] * z
        return numpy.stack([w.real + target_mean[..., None, 0], w.imag + target_mean[..., None, 1]], axis=-1)

    return transform


def _checked_label_maps(labels, faces, owner):
    """``labels`` as integer (N, H, W) HELEN class maps, one per face, or a clear error."""
    labels = numpy.asarray(labels)
    if labels.ndim != 3 or len(labels) != faces or labels.dtype.kind not in "iu":
        raise ValueError(f"{owner}: labels must be integer (N, H, W) with N = {faces}, got {labels.dtype} "
                         f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(_IS_FACE)):
        raise ValueError(f"{owner}: labels range over {labels.min()} .. {labels.max()}; expected the "
                         f"{len(_IS_FACE)} HELEN classes 0 .. {len(_IS_FACE) - 1}")
    return labels


def complete_keypoints(points, found, shape, labels=None):
    """Fill in the missing key points: float64 ``(N, 5, 2)`` with every point finite.

    With two or more points found, the mean shape is aligned to them by a least-squares similarity
    and gives the others. With fewer, the mean shape is placed on the face region (every pixel
    not labelled background or hair) of ``labels`` ``(N, H, W)``, upright, its eye distance
    predicted by the region's size (``FaceShape.face_size``), and moved onto the one point found if
    there is one; with no face region either, on the middle of the image, eye distance a quarter of
    its width (a last resort).
    """
    points = numpy.array(points, dtype=numpy.float64)
    found = numpy.asarray(found, dtype=bool)
    if points.ndim != 3 or points.shape[1:] != (5, 2) or found.shape != points.shape[:2]:
        raise ValueError(f"complete_keypoints: points must be (N, 5, 2) and found (N, 5), got {points.shape} and "
                         f"{found.shape} (for one face, add the batch axis: points[None], found[None])")
    if labels is not None:
        labels = _checked_label_maps(labels, len(points), "complete_keypoints")
    if not numpy.isfinite(points[found]).all():
        raise ValueError("complete_keypoints: a key point marked found is not finite; mark it not found")
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
        if known.any():  # one point found: the guess is moved onto it, which beats the face region's centre
            guess += points[n, known] - guess[known]
        points[n, ~known] = guess[~known]
    return points


__all__ = ["keypoints_from_labels", "jitter_keypoints", "FaceShape", "complete_keypoints"]
