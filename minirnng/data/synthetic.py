"""Procedurally drawn faces with exact part labels: the data set minirnng ships with.

:class:`SyntheticFaces` draws each sample on the fly from nothing but NumPy, deterministically from
``(seed, index)``. A sample is a head in a face-centred coordinate frame ``(u, v)`` (``u`` to the
image's right and ``v`` down for an upright face, the head's half-width is 1) mapped to pixels by
a rotation, a horizontal squash (a cheap stand-in for yaw), a scale and a shift. Every part is a
region of that frame, painted back to front into a *part map*; the label map and the colours are
both read from the same part map, so labels are aligned with the drawn pixels by construction.
Only the camera effects applied last (blur, noise, JPEG-like block artefacts) smear colours
across part boundaries, as a real camera does.

What makes it hard on purpose: backgrounds are cluttered and textured and contain skin- and
hair-coloured shapes; clothes, necks and occluders (labelled background) may be skin-coloured;
lighting and colour casts change the colours of everything; hair comes in several styles and
colours, some close to the skin or the background. Colour alone does not separate the classes:
shape and context have to.

Pixel coordinates follow one convention throughout minirnng: pixel ``(row, column)`` has its
centre at ``(x, y) = (column, row)``.
"""

import functools

import numpy

from .classes import HELEN_CLASSES, HELEN_TO_LFW, LFW_CLASSES, class_list
from .datasets import Dataset

MULTI_FACE_SIZE = 512
_JPEG_BLOCK = 8

# ---------------------------------------------------------------------------------------------
# Parts: what gets painted, and the class each part is labelled with. A part is finer than a
# class where the picture needs it (an iris is drawn differently from the white of the eye but
# labelled "eye"; a neck or a shirt is drawn but labelled background).

_PARTS = (
    # name,            class
    ("cloth",          "background"),
    ("hair behind",    "hair"),
    ("neck",           "neck"),
    ("ear",            "neck"),
    ("skin",           "skin"),
    ("beard",          "hair"),
    ("nose",           "nose"),
    ("nose shadow",    "nose"),
    ("nostril",        "nose"),
    ("left sclera",    "left eye"),
    ("right sclera",   "right eye"),
    ("left iris",      "left eye"),
    ("right iris",     "right eye"),
    ("left pupil",     "left eye"),
    ("right pupil",    "right eye"),
    ("left brow",      "left brow"),
    ("right brow",     "right brow"),
    ("upper lip",      "upper lip"),
    ("lower lip",      "lower lip"),
    ("inner mouth",    "inner mouth"),
    ("teeth",          "inner mouth"),
    ("hair",           "hair"),
    ("occluder",       "background"),
)
# The neck and the ears are skin in LFW-PL's labels but background in HELEN's ("face skin
# (excluding ears and neck)"): they get a drawing class of their own (after the 11 HELEN classes),
# named for the neck, that each class list maps to its own convention.
_DRAWING_CLASSES = HELEN_CLASSES + ("neck",)
_DRAWING_TO_HELEN = numpy.append(numpy.arange(len(HELEN_CLASSES)),
                                 HELEN_CLASSES.index("background")).astype(numpy.uint8)
_DRAWING_TO_LFW = numpy.append(HELEN_TO_LFW, LFW_CLASSES.index("skin")).astype(numpy.uint8)
_PART = {name: index for index, (name, _) in enumerate(_PARTS)}
_PART_CLASS = numpy.array([_DRAWING_CLASSES.index(label) for _, label in _PARTS], dtype=numpy.uint8)
_UNPAINTED = -1
_HAIRY_PARTS = numpy.array([_PART[name] for name in ("hair behind", "beard", "hair", "left brow", "right brow")])

# Colour ranges, RGB in 0..1.
_SKIN_DARK, _SKIN_LIGHT = numpy.array([0.28, 0.18, 0.13]), numpy.array([0.96, 0.80, 0.70])
_HAIR_COLOURS = numpy.array([
    [0.05, 0.04, 0.04],  # black
    [0.20, 0.13, 0.08],  # dark brown
    [0.38, 0.25, 0.15],  # brown
    [0.75, 0.60, 0.36],  # blond
    [0.52, 0.24, 0.10],  # auburn
    [0.55, 0.55, 0.55],  # grey
    [0.85, 0.84, 0.80],  # white
])
_HAIR_WEIGHTS = numpy.array([0.30, 0.22, 0.17, 0.12, 0.07, 0.07, 0.05])
_IRIS_COLOURS = numpy.array([[0.25, 0.14, 0.07], [0.10, 0.07, 0.05], [0.25, 0.40, 0.60], [0.30, 0.40, 0.22]])
_HAIR_STYLES = ("short", "long", "fringe", "bald")
_HAIR_STYLE_WEIGHTS = (0.34, 0.30, 0.22, 0.14)


class SyntheticFaces(Dataset):
    """Synthetic face images with exact labels, generated on the fly.

    ``SyntheticFaces(n, size=128, n_classes=11, multi_face=False, seed=0)``: ``n`` samples, each a
    function of ``(seed, index)`` only. ``n_classes=11`` labels in ``HELEN_CLASSES``; ``n_classes=3``
    in ``LFW_CLASSES`` (every facial part is skin). With ``multi_face=False`` an image is
    ``size x size`` (a multiple of 4) with one roughly centred face, like LFW-PL; with
    ``multi_face=True`` it is 512x512 (``size`` is ignored) with 2 to 6 faces of varied sizes, some
    small and some cut by the border, like the paper's Multi-Face set (a small face placed near the
    border can fall outside the picture altogether: about 2% of the faces, which still have key
    points).

    ``ds[i]`` returns ``(image, labels)``: uint8 ``(H, W, 3)`` RGB and uint8 ``(H, W)``.
    ``ds.keypoints(i)`` returns the five key points the generator placed (see :meth:`keypoints`).

    Labelling conventions: beards are hair; clothes and occluders are background; the neck and the
    ears are skin with 3 classes (as LFW-PL labels them) and background with 11 (as HELEN does).
    """

    def __init__(self, n, size=128, n_classes=11, multi_face=False, seed=0):
        if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)) or n < 1:
            raise ValueError(f"SyntheticFaces: n must be a positive integer, got {n!r}")
        if isinstance(size, bool) or not isinstance(size, (int, numpy.integer)) or size < 32 or size % 4:
            raise ValueError(f"SyntheticFaces: size must be a multiple of 4 and at least 32, got {size!r}")
        # below 2**32: the generator reads (seed, index) as 32-bit words, so seed 2**32 would give
        # seed 0's faces shifted by one
        if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or not 0 <= seed < 2 ** 32:
            raise ValueError(f"SyntheticFaces: seed must be an integer in 0 .. 2**32 - 1, got {seed!r}")
        if not isinstance(multi_face, (bool, numpy.bool_)):
            raise TypeError(f"SyntheticFaces: multi_face must be True or False, got {multi_face!r}")
        self.classes = class_list(n_classes)
        self.n, self.n_classes, self.multi_face, self.seed = int(n), len(self.classes), bool(multi_face), int(seed)
        self.size = MULTI_FACE_SIZE if self.multi_face else int(size)

    def __len__(self):
        return self.n

    @functools.cached_property
    def _names(self):
        kind = "multi" if self.multi_face else "single"
        return tuple(f"synthetic_{kind}_s{self.seed}_{index:06d}" for index in range(self.n))

    def keypoints(self, index):
        """The five key points of sample ``index``, float64 ``(x, y)`` pixel coordinates.

        Order: left eye centre, right eye centre, nose tip, left mouth corner, right mouth corner
        (``minirnng.data.classes.KEYPOINT_NAMES``). "Left" is the side of the image: for an upright
        face the left eye has the smaller x, and it is the eye labelled "left eye". Pixel centres
        are at integer coordinates. Shape ``(5, 2)``, or ``(F, 5, 2)`` for ``multi_face=True`` with
        one row per face in drawing order (later faces may cover earlier ones; a point may lie
        outside the image when its face is cut by the border).
        """
        faces = self._faces(self._checked_index(index))
        points = numpy.stack([face.keypoints() for face in faces])
        return points if self.multi_face else points[0]

    def _faces(self, index):
        """The geometry and appearance of every face of sample ``index``, in drawing order."""
        rng = numpy.random.default_rng([self.seed, index, 0])
        if not self.multi_face:
            return [_Face.sample(rng, self.size, size_range=(0.19, 0.29), centre_jitter=0.06)]
        faces = [_Face.sample(rng, self.size, size_range=(0.025, 0.17), anywhere=True)
                 for _ in range(int(rng.integers(2, 7)))]
        return sorted(faces, key=lambda face: face.scale)  # larger faces are nearer: drawn last

    def _load(self, index):
        faces = self._faces(index)
        rng = numpy.random.default_rng([self.seed, index, 1])  # pixels: a stream apart from the geometry
        canvas = _Canvas(self.size)
        canvas.draw_background(rng)
        for face in faces:
            canvas.draw_face(face, rng)
        for face in faces:
            if rng.random() < 0.35:
                canvas.draw_occluder(face, rng)
        image = canvas.photograph(rng)
        to_classes = _DRAWING_TO_HELEN if self.classes == HELEN_CLASSES else _DRAWING_TO_LFW
        return image, to_classes[canvas.labels]


# ---------------------------------------------------------------------------------------------
# One face: where it is and what it looks like


class _Face:
    """A face's pose (face frame -> pixels) and every shape and colour parameter, all scalars.

    Face frame: ``u`` across (image-left is negative), ``v`` down, head half-width 1, origin near the
    middle of the nose. Pixels: ``x = cx + scale * (cos * squash * u - sin * v)``,
    ``y = cy + scale * (sin * squash * u + cos * v)``.
    """

    @classmethod
    def sample(cls, rng, image_size, size_range, centre_jitter=0.0, anywhere=False):
        face = cls()
        low, high = size_range
        face.scale = image_size * float(numpy.exp(rng.uniform(numpy.log(low), numpy.log(high))))
        if anywhere:
            face.cx = image_size * rng.uniform(-0.05, 1.05)
            face.cy = image_size * rng.uniform(0.0, 1.05)
        else:
            face.cx = image_size * (0.5 + rng.uniform(-centre_jitter, centre_jitter))
            face.cy = image_size * (0.47 + rng.uniform(-centre_jitter, centre_jitter * 1.3))
        face.angle = float(numpy.deg2rad(numpy.clip(rng.normal(0.0, 10.0), -30.0, 30.0)))
        face.squash = rng.uniform(0.78, 1.0)
        # A turned head shows its features shifted towards the side it turns to.
        face.turn = rng.uniform(-1.0, 1.0) * (1.0 - face.squash) * 0.9

        face.head_height = rng.uniform(1.22, 1.42)
        face.jaw = rng.uniform(0.15, 0.45)               # how much the head narrows towards the chin
        face.eye_x = rng.uniform(0.36, 0.45)
        face.eye_y = rng.uniform(-0.22, -0.08)
        face.eye_width = rng.uniform(0.17, 0.24)
        face.eye_open = rng.uniform(0.06, 0.12)
        face.gaze = rng.uniform(-0.3, 0.3)
        face.brow_gap = rng.uniform(0.17, 0.27)
        face.brow_width = rng.uniform(0.19, 0.27)
        face.brow_thickness = rng.uniform(0.045, 0.10)
        face.brow_arch = rng.uniform(0.0, 0.08)
        face.nose_y = rng.uniform(0.24, 0.38)
        face.nose_width = rng.uniform(0.13, 0.21)
        face.mouth_y = face.nose_y + rng.uniform(0.26, 0.38)
        face.mouth_width = rng.uniform(0.24, 0.38)
        face.smile = rng.uniform(-0.07, 0.04)            # negative: corners up
        face.upper_lip = rng.uniform(0.05, 0.10)
        face.lower_lip = rng.uniform(0.06, 0.13)
        face.mouth_open = 0.0 if rng.random() < 0.5 else rng.uniform(0.03, 0.20)
        face.teeth = rng.random() < 0.6

        face.hair_style = _HAIR_STYLES[rng.choice(len(_HAIR_STYLES), p=_HAIR_STYLE_WEIGHTS)]
        face.beard = rng.random() < (0.30 if face.hair_style in ("short", "bald") else 0.08)
        face.hair_volume = rng.uniform(0.08, 0.40)
        face.hair_side = rng.uniform(0.04, 0.22)
        face.hairline = rng.uniform(-0.95, -0.58)
        face.sideburn = rng.uniform(-0.15, 0.2)
        face.hair_length = rng.uniform(1.0, 3.2)
        face.hair_wave = (rng.uniform(2.0, 9.0), rng.uniform(0, 2 * numpy.pi), rng.uniform(0.0, 0.09))
        face.fringe_tilt = rng.uniform(-0.25, 0.25)
        face.strand_frequency = rng.uniform(25.0, 70.0)

        tone = rng.random()
        face.skin = (_SKIN_DARK + tone * (_SKIN_LIGHT - _SKIN_DARK)) * rng.uniform(0.92, 1.08, 3)
        face.hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS)] * rng.uniform(0.8, 1.2, 3)
        face.lip = face.skin * numpy.array([rng.uniform(0.78, 0.95), rng.uniform(0.48, 0.66), rng.uniform(0.50, 0.70)])
        if rng.random() < 0.15:  # lipstick
            face.lip = numpy.array([rng.uniform(0.5, 0.85), rng.uniform(0.02, 0.2), rng.uniform(0.1, 0.35)])
        face.iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * rng.uniform(0.8, 1.2, 3)
        face.cloth = rng.random(3) if rng.random() < 0.8 else face.skin * rng.uniform(0.9, 1.1, 3)
        face.nose_shade = rng.uniform(0.86, 1.04)
        light = numpy.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.7, 0.5), rng.uniform(0.5, 1.0)])
        face.light = light / numpy.linalg.norm(light)
        face.ambient = rng.uniform(0.35, 0.65)
        return face

    # -- geometry ------------------------------------------------------------------------------

    def to_pixels(self, u, v):
        """Pixel ``(x, y)`` of face-frame points ``(u, v)`` (scalars or arrays)."""
        cos, sin = numpy.cos(self.angle), numpy.sin(self.angle)
        u = numpy.asarray(u, dtype=numpy.float64) * self.squash
        return self.cx + self.scale * (cos * u - sin * v), self.cy + self.scale * (sin * u + cos * v)

    def keypoints(self):
        """float64 ``(5, 2)``: eye centres, nose tip, mouth corners (see SyntheticFaces.keypoints)."""
        corner_v = self.mouth_y + self.smile
        u = numpy.array([-self.eye_x + self.turn, self.eye_x + self.turn, 1.6 * self.turn,
                         -self.mouth_width + self.turn, self.mouth_width + self.turn])
        v = numpy.array([self.eye_y, self.eye_y, self.nose_y, corner_v, corner_v])
        return numpy.stack(self.to_pixels(u, v), axis=1)

    def frame(self, x, y):
        """Face-frame ``(u, v)`` float32 ``(h, w)`` of the pixel grid ``x`` ``(w,)`` by ``y`` ``(h,)``."""
        cos, sin = numpy.cos(self.angle), numpy.sin(self.angle)
        dx = (x - self.cx).astype(numpy.float32)[None, :]
        dy = (y - self.cy).astype(numpy.float32)[:, None]
        across_scale = self.scale * self.squash
        u = dx * numpy.float32(cos / across_scale) + dy * numpy.float32(sin / across_scale)
        v = (dy * numpy.float32(cos / self.scale)) - dx * numpy.float32(sin / self.scale)
        return u, v

    def pixel_box(self, u_range, v_range, height, width):
        """``(slice of rows, slice of columns)`` covering a face-frame rectangle, clipped to the image."""
        corners_u = numpy.array([u_range[0], u_range[1], u_range[0], u_range[1]])
        corners_v = numpy.array([v_range[0], v_range[0], v_range[1], v_range[1]])
        x, y = self.to_pixels(corners_u, corners_v)
        x0, x1 = max(int(numpy.floor(x.min())), 0), min(int(numpy.ceil(x.max())) + 1, width)
        y0, y1 = max(int(numpy.floor(y.min())), 0), min(int(numpy.ceil(y.max())) + 1, height)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


# ---------------------------------------------------------------------------------------------
# The canvas: background, faces, occluders, then the camera


class _Canvas:
    """An image being drawn: colours float32 ``(3, H, W)`` in 0..1 (channels first, so that
    per-pixel factors broadcast cheaply) and labels uint8 ``(H, W)`` in ``_DRAWING_CLASSES``."""

    def __init__(self, size):
        self.size = size
        self.colours = numpy.empty((3, size, size), dtype=numpy.float32)
        self.labels = numpy.zeros((size, size), dtype=numpy.uint8)
        self.x = self.y = _pixel_centres(size)

    # -- background ----------------------------------------------------------------------------

    def draw_background(self, rng):
        """A smooth colour field, a texture, and a clutter of flat and shaded shapes."""
        size = self.size
        # Muted colours, as in photographs: a grey level plus a little colour.
        grid = int(rng.integers(2, 6))
        grey = rng.uniform(0.1, 0.9, (1, grid, grid))
        base = _smooth_field(grey + rng.uniform(0.05, 0.35) * rng.uniform(-1.0, 1.0, (3, grid, grid)), size)
        texture_kind = rng.integers(4)
        if texture_kind == 0:  # stripes at any angle
            angle, frequency = rng.uniform(0, numpy.pi), rng.uniform(0.05, 0.6)
            phase = (numpy.cos(angle) * self.x[None, :] + numpy.sin(angle) * self.y[:, None]) * numpy.float32(frequency)
            texture = numpy.sin(phase) * numpy.float32(rng.uniform(0.05, 0.25))
        elif texture_kind == 1:  # blotches
            texture = _smooth_field(rng.uniform(-0.3, 0.3, (1, 12, 12)), size)[0]
        elif texture_kind == 2:  # fine grain
            texture = _smooth_field(rng.uniform(-0.2, 0.2, (1, 33, 33)), size)[0]
        else:
            texture = numpy.float32(0.0)
        numpy.multiply(base, 1.0 + texture, out=self.colours)
        for _ in range(int(rng.integers(2, 9))):
            self._draw_clutter(rng)

    def _draw_clutter(self, rng):
        """One background shape, often in a skin or hair colour, labelled background."""
        size = self.size
        choice = rng.random()
        if choice < 0.3:
            colour = (_SKIN_DARK + rng.random() * (_SKIN_LIGHT - _SKIN_DARK)) * rng.uniform(0.9, 1.1, 3)
        elif choice < 0.55:
            colour = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.2, 3)
        else:
            colour = rng.random(3)
        half_width, half_height = size * rng.uniform(0.04, 0.3, 2)
        box_radius = max(half_width, half_height)
        centre_x, centre_y = size * rng.uniform(-0.1, 1.1, 2)
        rows, columns = _box(centre_x, centre_y, box_radius, size)
        if rows.start >= rows.stop or columns.start >= columns.stop:
            return
        elliptic = rng.random() < 0.5
        along, across, inside = self._rotated_shape(rows, columns, (centre_x, centre_y), (half_width, half_height),
                                                    rng.uniform(0, numpy.pi), elliptic)
        if elliptic:  # a ball or a bowl, lit from the front
            shading = 1.0 - numpy.float32(rng.uniform(0.0, 0.4)) * (along * along + across * across)
        else:         # a board, lit from one side
            shading = 1.0 + numpy.float32(rng.uniform(-0.3, 0.3)) * along
        painted = colour.astype(numpy.float32)[:, None, None] * shading
        window = self.colours[:, rows, columns]
        numpy.copyto(window, painted, where=inside)

    def _rotated_shape(self, rows, columns, centre, half_sizes, angle, elliptic):
        """An ellipse or a rectangle turned by ``angle`` over the window ``rows, columns``:
        ``(along, across, inside)``, float32 ``(h, w)`` coordinates along and across its axes in
        units of its half sizes, and bool ``(h, w)``."""
        dx = self.x[columns][None, :] - numpy.float32(centre[0])
        dy = self.y[rows][:, None] - numpy.float32(centre[1])
        cos, sin = numpy.float32(numpy.cos(angle)), numpy.float32(numpy.sin(angle))
        along = (dx * cos + dy * sin) / numpy.float32(half_sizes[0])
        across = (dy * cos - dx * sin) / numpy.float32(half_sizes[1])
        if elliptic:
            return along, across, along * along + across * across < 1.0
        return along, across, (numpy.abs(along) < 1.0) & (numpy.abs(across) < 1.0)

    # -- faces ---------------------------------------------------------------------------------

    def draw_face(self, face, rng):
        """Paint one face's parts into a part map, then its colours and labels onto the canvas."""
        rows, columns = face.pixel_box((-2.9, 2.9), (-face.head_height - 0.7, 4.5), self.size, self.size)
        if rows.start >= rows.stop or columns.start >= columns.stop:
            return
        u, v = face.frame(self.x[columns], self.y[rows])
        parts = numpy.full(u.shape, _UNPAINTED, dtype=numpy.int8)
        painter = _PartPainter(face, u, v, parts, origin=(rows.start, columns.start), image_size=self.size)
        painter.paint_all()
        painted = parts != _UNPAINTED

        palette = _part_palette(face)                                  # (3, parts + 1)
        colours = numpy.take(palette, parts.astype(numpy.intp), axis=1)  # unpainted -> last column
        colours *= _shading(face, u, v)
        hairy = numpy.isin(parts, _HAIRY_PARTS)
        if hairy.any():
            strands = numpy.sin((u + 0.08 * numpy.sin(numpy.float32(3.0) * v)) * numpy.float32(face.strand_frequency))
            colours *= numpy.where(hairy, 1.0 + numpy.float32(0.22) * strands, numpy.float32(1.0))
        numpy.copyto(self.colours[:, rows, columns], colours, where=painted)
        self.labels[rows, columns][painted] = _PART_CLASS[parts[painted]]

    # -- occluders -----------------------------------------------------------------------------

    def draw_occluder(self, face, rng):
        """A bar or blob over part of a face (a hand, a microphone, a cup), labelled background."""
        size = self.size
        u0, v0 = rng.uniform(-1.2, 1.2), rng.uniform(-0.6, 1.6)
        centre_x, centre_y = face.to_pixels(u0, v0)
        half_long = face.scale * rng.uniform(0.3, 1.0)
        half_short = face.scale * rng.uniform(0.12, 0.35)
        rows, columns = _box(float(centre_x), float(centre_y), max(half_long, half_short), size)
        if rows.start >= rows.stop or columns.start >= columns.stop:
            return
        _, across, inside = self._rotated_shape(rows, columns, (centre_x, centre_y), (half_long, half_short),
                                                rng.uniform(0, numpy.pi), elliptic=rng.random() < 0.5)
        colour = face.skin * rng.uniform(0.85, 1.1, 3) if rng.random() < 0.35 else rng.random(3)
        shading = 1.0 - numpy.float32(rng.uniform(0.1, 0.5)) * across * across
        numpy.copyto(self.colours[:, rows, columns], colour.astype(numpy.float32)[:, None, None] * shading,
                     where=inside)
        self.labels[rows, columns][inside] = _PART_CLASS[_PART["occluder"]]

    # -- camera --------------------------------------------------------------------------------

    def photograph(self, rng):
        """Colour cast, uneven light, blur, sensor noise and JPEG-like blocks -> uint8 ``(H, W, 3)``."""
        colours = self.colours
        gradient_x, gradient_y = rng.uniform(-0.5, 0.5, 2) / self.size
        light = 1.0 + numpy.float32(gradient_x) * (self.x - self.size / 2)[None, :] \
            + numpy.float32(gradient_y) * (self.y - self.size / 2)[:, None]
        gain = (rng.uniform(0.6, 1.25) * rng.uniform(0.88, 1.12, 3)).astype(numpy.float32)
        colours *= light
        colours *= gain[:, None, None]
        for _ in range(rng.choice(3, p=(0.3, 0.45, 0.25))):
            _blur_121(colours)
        noise = rng.random((self.size, self.size), dtype=numpy.float32) - 0.5  # uniform: far cheaper than normal
        colours += noise * numpy.float32(rng.uniform(0.0, 0.12))
        colours *= 255.0
        if rng.random() < 0.6:
            _jpeg_like(colours, quality_step=rng.uniform(4.0, 28.0))
        numpy.clip(colours, 0.0, 255.0, out=colours)
        numpy.rint(colours, out=colours)
        return numpy.ascontiguousarray(colours.astype(numpy.uint8).transpose(1, 2, 0))


class _PartPainter:
    """Paints the parts of one face, back to front, into ``parts`` (int8 ``(h, w)``) over a
    window whose face-frame coordinates are ``u`` and ``v`` (float32 ``(h, w)``).

    The window's top-left pixel is ``origin`` (row, column) of an image ``image_size`` pixels
    square. Small parts are evaluated only on the sub-window that can contain them (``_region``).
    """

    def __init__(self, face, u, v, parts, origin, image_size):
        self.face, self.u, self.v, self.parts = face, u, v, parts
        self.origin, self.image_size = origin, image_size

    def paint_all(self):
        face = self.face
        if face.hair_style == "long":
            self.paint_long_hair()
        self.paint_neck_and_cloth()
        self.paint_head()
        if face.beard:
            self.paint_beard()
        self.paint_nose()
        for side in (-1, 1):
            self.paint_eye(side)
            self.paint_brow(side)
        self.paint_mouth()
        self.paint_front_hair()

    def _region(self, u_range, v_range):
        """``(rows, columns, u, v)`` of the part of the window that covers a face-frame rectangle."""
        height, width = self.parts.shape
        rows, columns = self.face.pixel_box(u_range, v_range, self.image_size, self.image_size)
        top, left = self.origin
        rows = slice(max(rows.start - top, 0), max(min(rows.stop - top, height), 0))
        columns = slice(max(columns.start - left, 0), max(min(columns.stop - left, width), 0))
        return rows, columns, self.u[rows, columns], self.v[rows, columns]

    def _paint(self, rows, columns, inside, part):
        self.parts[rows, columns][inside] = _PART[part]

    # -- the body and head ---------------------------------------------------------------------

    def paint_neck_and_cloth(self):
        """The neck covers long hair behind it; long hair stays in front of the shoulders."""
        face, u, v = self.face, self.u, self.v
        neck = (numpy.abs(u - face.turn * 0.5) < 0.48) & (v > 0.3) & (v < 2.4)
        self.parts[neck] = _PART["neck"]
        shoulder = 1.55 + 0.16 * u * u + 0.35 * numpy.maximum(0.0, 1.0 - numpy.abs(u) / 0.45)
        cloth = (v > shoulder) & (numpy.abs(u) < 2.7)
        if face.hair_style == "long":
            cloth &= (self.parts != _PART["hair behind"]) | (numpy.abs(u) < 0.5)
        self.parts[cloth] = _PART["cloth"]

    def paint_long_hair(self):
        face, u, v = self.face, self.u, self.v
        frequency, phase, amplitude = face.hair_wave
        half_width = (1.0 + face.hair_side + 0.05) * (1.0 + 0.12 * numpy.clip(v, 0.0, 3.0)) \
            + amplitude * numpy.sin(numpy.float32(frequency) * v + numpy.float32(phase))
        bottom = face.hair_length - 0.3 * (u / half_width) ** 2
        hair = (numpy.abs(u) < half_width) & (v > -0.2) & (v < bottom)
        self.parts[hair | self._hair_cap()] = _PART["hair behind"]

    def _hair_cap(self):
        """The volume of hair around the skull: an ellipse a little larger than the head."""
        face, u, v = self.face, self.u, self.v
        frequency, phase, amplitude = face.hair_wave
        across = u / (1.0 + face.hair_side)
        down = (v + 0.1) / (face.head_height + face.hair_volume)
        outline = 1.0 + amplitude * numpy.sin(numpy.float32(2.0 * frequency) * u + numpy.float32(phase))
        return across * across + down * down < outline

    def _head_inside(self, u, v, grow=0.0):
        face = self.face
        down = v / (face.head_height + grow)
        narrowing = 1.0 + grow - face.jaw * numpy.clip(down, 0.0, 1.0) ** 2
        return (u * u < narrowing * narrowing * (1.0 - down * down)) & (numpy.abs(down) < 1.0)

    def paint_head(self):
        face = self.face
        for side in (-1, 1):
            centre_u, centre_v = side * 0.97, face.eye_y + 0.13
            rows, columns, u, v = self._region((centre_u - 0.15, centre_u + 0.15), (centre_v - 0.27, centre_v + 0.27))
            ear = ((u - centre_u) / 0.14) ** 2 + ((v - centre_v) / 0.26) ** 2 < 1.0
            self._paint(rows, columns, ear, "ear")
        self.parts[self._head_inside(self.u, self.v)] = _PART["skin"]

    def paint_beard(self):
        face, u, v = self.face, self.u, self.v
        # Just above the upper lip in the middle (a moustache), rising to the sideburns at the sides.
        towards_side = numpy.clip((numpy.abs(u) - 0.35) / 0.6, 0.0, 1.0)
        top = (face.mouth_y - face.upper_lip - 0.1) + (face.sideburn - face.mouth_y) * towards_side
        beard = self._head_inside(u, v, grow=0.08) & (v > top)
        self.parts[beard] = _PART["beard"]

    def paint_front_hair(self):
        face, u, v = self.face, self.u, self.v
        style = face.hair_style
        if style == "bald":
            # A fringe of hair around the back of the head, or nothing at all.
            if face.hair_volume > 0.2:
                side = numpy.abs(u)
                top, bottom = numpy.maximum(-0.2 - 1.6 * (side - 0.75), -0.5), face.sideburn + 0.3 * (side - 0.8)
                sides = self._hair_cap() & (side > 0.7) & (v > top) & (v < bottom)
                self.parts[sides] = _PART["hair"]
            return
        across = numpy.clip(numpy.abs(u - 0.15 * face.fringe_tilt) / 0.95, 0.0, 1.0)
        if style == "fringe":
            brow_top = face.eye_y - face.brow_gap - face.brow_thickness
            ragged = 0.035 * numpy.sin(numpy.float32(face.strand_frequency * 0.5) * u)
            centre = brow_top - 0.04 + face.fringe_tilt * u + ragged
        else:
            centre = face.hairline
        hairline = centre + (face.sideburn - centre) * across ** 3
        hair = self._hair_cap() & (v < hairline)
        self.parts[hair] = _PART["hair"]

    # -- features ------------------------------------------------------------------------------

    def paint_eye(self, side):
        face = self.face
        centre_u = side * face.eye_x + face.turn
        width = face.eye_width * (1.0 - 0.6 * max(0.0, side * face.turn))  # the far eye looks narrower
        rows, columns, u, v = self._region((centre_u - width, centre_u + width),
                                           (face.eye_y - face.eye_open, face.eye_y + face.eye_open))
        across = (u - centre_u) / width
        lid = numpy.maximum(0.0, 1.0 - across * across)
        dv = v - face.eye_y
        eye = (dv > -face.eye_open * lid) & (dv < 0.8 * face.eye_open * lid)
        name = "left" if side < 0 else "right"
        self._paint(rows, columns, eye, f"{name} sclera")
        iris_u = centre_u + face.gaze * width * 0.4
        radius = 0.65 * face.eye_open + 0.03
        distance = (u - iris_u) ** 2 + dv * dv
        self._paint(rows, columns, eye & (distance < radius * radius), f"{name} iris")
        self._paint(rows, columns, eye & (distance < 0.2 * radius * radius), f"{name} pupil")

    def paint_brow(self, side):
        face = self.face
        centre_u = side * (face.eye_x + 0.03) + face.turn
        centre_v = face.eye_y - face.brow_gap
        width = face.brow_width * (1.0 - 0.6 * max(0.0, side * face.turn))
        top, bottom = centre_v - face.brow_arch - face.brow_thickness, centre_v + face.brow_thickness
        rows, columns, u, v = self._region((centre_u - width, centre_u + width), (top, bottom))
        across = (u - centre_u) / width
        middle = centre_v - face.brow_arch * (1.0 - across * across) + 0.02 * across * side
        thickness = face.brow_thickness * (1.0 - 0.45 * numpy.clip(across * side, 0.0, 1.0))  # thinner at the outer end
        brow = (numpy.abs(across) < 1.0) & (numpy.abs(v - middle) < 0.5 * thickness)
        self._paint(rows, columns, brow, f"{'left' if side < 0 else 'right'} brow")

    def paint_nose(self):
        face = self.face
        top, tip = face.eye_y + 0.05, face.nose_y
        tip_u = 1.6 * face.turn
        rows, columns, u, v = self._region((tip_u - 0.3, tip_u + 0.3), (top, tip + 0.1))
        along = numpy.clip((v - top) / (tip - top), 0.0, 1.0)
        centre = face.turn + along * (tip_u - face.turn)
        half_width = 0.06 + (face.nose_width - 0.06) * along * along
        nose = (v > top) & (v < tip) & (numpy.abs(u - centre) < half_width)
        bulb = ((u - tip_u) / face.nose_width) ** 2 + ((v - tip + 0.02) / 0.09) ** 2 < 1.0
        self._paint(rows, columns, nose | bulb, "nose")
        # The side of the nose away from the light is in shadow: what shows a nose in a photograph.
        shadow_side = -1.0 if face.light[0] > 0 else 1.0
        self._paint(rows, columns, nose & ((u - centre) * shadow_side > 0.35 * half_width), "nose shadow")
        for side in (-1, 1):
            nostril = ((u - tip_u - side * 0.065) / 0.045) ** 2 + ((v - tip - 0.03) / 0.024) ** 2 < 1.0
            self._paint(rows, columns, nostril, "nostril")

    def paint_mouth(self):
        face = self.face
        centre_u = face.turn
        width = face.mouth_width
        rows, columns, u, v = self._region((centre_u - width, centre_u + width),
                                           (face.mouth_y - 0.5 * face.mouth_open - face.upper_lip - 0.05
                                            + min(face.smile, 0.0),
                                            face.mouth_y + face.mouth_open + face.lower_lip + 0.05))
        across = (u - centre_u) / width
        within = numpy.abs(across) < 1.0
        envelope = numpy.sqrt(numpy.maximum(0.0, 1.0 - across * across))
        line = face.mouth_y + face.smile * across * across
        cupid = face.upper_lip * 0.35 * numpy.maximum(0.0, 1.0 - (across / 0.18) ** 2)
        gap = 0.5 * face.mouth_open * envelope
        # an open mouth parts the lips: the upper one moves up by half the opening, as the lower
        # one moves down, each keeping its thickness
        upper_top = line - gap - face.upper_lip * envelope + cupid
        lower_bottom = line + gap + face.lower_lip * envelope
        self._paint(rows, columns, within & (v > upper_top) & (v < line - gap), "upper lip")
        self._paint(rows, columns, within & (v >= line + gap) & (v < lower_bottom), "lower lip")
        if face.mouth_open > 0:
            inner = within & (v >= line - gap) & (v < line + gap)
            self._paint(rows, columns, inner, "inner mouth")
            if face.teeth:
                self._paint(rows, columns, inner & (v < line - 0.3 * gap), "teeth")  # the upper teeth


def _part_palette(face):
    """float32 ``(3, parts + 1)``: the colour of every part of ``face``; the last column is unused
    (it is where unpainted pixels, -1, index)."""
    skin = face.skin
    colours = {
        "cloth": face.cloth, "hair behind": face.hair * 0.8, "neck": skin * 0.78, "ear": skin * 0.95,
        "skin": skin, "beard": face.hair * 0.9, "nose": skin * face.nose_shade,
        "nose shadow": skin * face.nose_shade * 0.8, "nostril": skin * 0.35,
        "left sclera": (0.88, 0.86, 0.82), "right sclera": (0.88, 0.86, 0.82),
        "left iris": face.iris, "right iris": face.iris,
        "left pupil": (0.03, 0.03, 0.03), "right pupil": (0.03, 0.03, 0.03),
        "left brow": face.hair * 0.7 + 0.05 * skin, "right brow": face.hair * 0.7 + 0.05 * skin,
        "upper lip": face.lip * 0.92, "lower lip": face.lip, "inner mouth": (0.28, 0.07, 0.07),
        "teeth": (0.92, 0.9, 0.82), "hair": face.hair, "occluder": (0.0, 0.0, 0.0),
    }
    palette = numpy.zeros((3, len(_PARTS) + 1), dtype=numpy.float32)
    for name, index in _PART.items():
        palette[:, index] = colours[name]
    return palette


def _shading(face, u, v):
    """float32 ``(h, w)``: Lambertian light on the head treated as an ellipsoid (flat beyond it)."""
    across = u * numpy.float32(0.85)
    down = (v + numpy.float32(0.1)) / numpy.float32(face.head_height * 1.1)
    depth = numpy.sqrt(numpy.clip(1.0 - across * across - down * down, 0.04, 1.0))
    lx, ly, lz = (numpy.float32(component) for component in face.light)
    lambert = numpy.maximum(across * lx + down * ly + depth * lz, 0.0)
    return numpy.float32(face.ambient) + numpy.float32(1.0 - face.ambient) * lambert * numpy.float32(1.15)


# ---------------------------------------------------------------------------------------------
# Small image tools, all in place on float32 (3, H, W)


@functools.lru_cache(maxsize=None)
def _pixel_centres(size):
    centres = numpy.arange(size, dtype=numpy.float32)
    centres.flags.writeable = False
    return centres


@functools.lru_cache(maxsize=None)
def _interpolation(source, target):
    """Linear interpolation of ``source`` samples spread over ``target`` pixels: for each pixel the
    sample below it, int ``(target,)``, and the weight of the sample above it, float32 ``(target,)``."""
    position = numpy.linspace(0.0, source - 1.0, target)
    below = numpy.minimum(numpy.floor(position).astype(numpy.intp), source - 2)
    weight = (position - below).astype(numpy.float32)
    below.flags.writeable = weight.flags.writeable = False
    return below, weight


def _smooth_field(grid, size):
    """Bilinear upsampling of ``grid`` float ``(C, g, g)`` to float32 ``(C, size, size)``.

    Done with gathers rather than matrix products: a product with a ``size``-long output is big
    enough for a multithreaded BLAS to split across cores, which costs far more than it saves on
    a machine whose other cores are busy.
    """
    below, weight = _interpolation(grid.shape[1], size)
    grid = grid.astype(numpy.float32)
    rows = grid[:, below, :] * (1.0 - weight)[:, None] + grid[:, below + 1, :] * weight[:, None]  # (C, size, g)
    return rows[:, :, below] * (1.0 - weight) + rows[:, :, below + 1] * weight


def _box(centre_x, centre_y, radius, size):
    x0, x1 = max(int(centre_x - radius), 0), min(int(centre_x + radius) + 2, size)
    y0, y1 = max(int(centre_y - radius), 0), min(int(centre_y + radius) + 2, size)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _blur_121(colours):
    """Blur float32 ``(3, H, W)`` in place with the separable kernel [1, 2, 1] / 4 (edges kept)."""
    for axis in (1, 2):
        inner = [slice(None)] * 3
        before, after = list(inner), list(inner)
        inner[axis], before[axis], after[axis] = slice(1, -1), slice(None, -2), slice(2, None)
        blurred = colours[tuple(before)] + colours[tuple(after)]
        blurred += 2.0 * colours[tuple(inner)]
        blurred *= 0.25
        colours[tuple(inner)] = blurred


@functools.lru_cache(maxsize=None)
def _dct_matrix():
    """float32 ``(8, 8)`` orthonormal DCT-II matrix: ``D @ block @ D.T`` is the block's spectrum."""
    k = numpy.arange(_JPEG_BLOCK)[:, None]
    n = numpy.arange(_JPEG_BLOCK)[None, :]
    matrix = numpy.cos(numpy.pi * (2 * n + 1) * k / (2 * _JPEG_BLOCK)) * numpy.sqrt(2.0 / _JPEG_BLOCK)
    matrix[0] /= numpy.sqrt(2.0)
    return matrix.astype(numpy.float32)


@functools.lru_cache(maxsize=None)
def _quantisation_steps():
    """float32 ``(8, 8)``: relative quantisation step per frequency, growing with frequency as in JPEG."""
    k = numpy.arange(_JPEG_BLOCK)
    return (1.0 + 0.6 * (k[:, None] + k[None, :])).astype(numpy.float32)


def _jpeg_like(colours, quality_step):
    """JPEG-like loss on float32 ``(3, H, W)`` in 0..255, in place: every 8x8 block of every channel
    is taken to the DCT domain, quantised (coarser at high frequencies) and back, which leaves
    JPEG's block edges and ringing. Channels are compressed separately (no chroma subsampling);
    a border narrower than a block is left as it is."""
    channels, height, width = colours.shape
    blocks_y, blocks_x = height // _JPEG_BLOCK, width // _JPEG_BLOCK
    view = colours[:, :blocks_y * _JPEG_BLOCK, :blocks_x * _JPEG_BLOCK]
    dct = _dct_matrix()
    # The step of every coefficient, laid out as the spectrum below: (row frequency, block column
    # x column frequency).
    steps = numpy.tile(_quantisation_steps() * numpy.float32(quality_step), (1, blocks_x))
    # Transform the 8 rows of each block with one matrix product per block row, then the 8 columns
    # of each block with one product over all of them: ``dct @ block @ dct.T`` for every block.
    by_rows = dct @ view.reshape(channels, blocks_y, _JPEG_BLOCK, -1)
    spectrum = (by_rows.reshape(-1, _JPEG_BLOCK) @ dct.T).reshape(by_rows.shape)
    spectrum /= steps
    numpy.rint(spectrum, out=spectrum)
    spectrum *= steps
    by_rows = (spectrum.reshape(-1, _JPEG_BLOCK) @ dct).reshape(spectrum.shape)
    view[...] = (dct.T @ by_rows).reshape(view.shape)
