"""Optional face detection, for parsing photographs with several faces one face at a time.

With the extra ``detect`` (``pip install '.[detect]'`` in minirnng's folder, OpenCV), faces are found with
OpenCV's Viola-Jones (Haar cascade) detector, the frontal-face cascade that ships inside the
``opencv-python-headless`` package. Each detection is widened to LFW's framing (LFW images are
centred on a Viola-Jones detection about 2.2 times smaller than the picture), so that the crop
looks like what the pretrained parser saw in training. Without OpenCV, :func:`detector_available`
is False and callers treat the whole image as one face.
"""

import numpy

from .data.pipeline import check_image

#: side of the LFW crop relative to the side of the detected face box
LFW_FRAME_SCALE = 2.2
CASCADE_FILE = "haarcascade_frontalface_default.xml"


def detector_available():
    """True when OpenCV with its Haar cascades can be imported."""
    try:
        import cv2
        return hasattr(cv2, "CascadeClassifier") and hasattr(cv2, "data")
    except ImportError:
        return False


def detect_faces(image, min_size=24, max_side=2048):
    """Face boxes ``(x, y, width, height)`` (int array (F, 4)) in a uint8 (H, W, 3) RGB image
    (greyscale (H, W) and RGBA are taken as :func:`~minirnng.data.pipeline.check_image` takes them;
    another dtype or shape is a one-line ValueError, not OpenCV's).

    An image whose longer side exceeds ``max_side`` (``math.inf``: none) is searched at
    ``max_side`` (the boxes scaled back): OpenCV's detector needs about 60 bytes a pixel, 3 GB for a 50-megapixel photograph,
    and a face the parser can use is still found there (only faces narrower than ``min_size``
    pixels of the reduced image are missed). ``min_size`` counts pixels of the image searched.
    """
    image = check_image(image, "detect_faces")
    for name, value in (("min_size", min_size), ("max_side", max_side)):
        # a bad setting would reach OpenCV as a failure blamed on the image, or a division by zero
        never_reduce = name == "max_side" and value == float("inf")
        if not never_reduce and (isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1):
            raise ValueError(f"detect_faces: {name} must be a positive whole number of pixels, got {value!r}"
                             + (" (or math.inf: never reduce the image)" if name == "max_side" else ""))
    try:
        import cv2
    except ImportError:
        raise RuntimeError("face detection needs OpenCV: pip install '.[detect]' in minirnng's folder "
                           "(opencv-python-headless)") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError(f"this OpenCV ({cv2.__version__}) has no CascadeClassifier; "
                           "install opencv-python-headless<5")
    detector = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE_FILE)
    if detector.empty():
        raise RuntimeError(f"OpenCV could not load its cascade {cv2.data.haarcascades + CASCADE_FILE}")
    height, width = image.shape[:2]
    try:
        grey = cv2.cvtColor(numpy.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        factor = max(height, width) / max_side
        if factor > 1:
            size = (max(1, round(width / factor)), max(1, round(height / factor)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        boxes = detector.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    except cv2.error as error:
        # OpenCV's own exception would reach the user as a traceback from inside the library
        if "Insufficient memory" in str(error):
            raise MemoryError(f"face detection on a {width}x{height} image ran out of memory") from None
        raise ValueError(f"face detection failed on a {width}x{height} image: {str(error).strip()}") from None
    boxes = numpy.asarray(boxes, dtype=float).reshape(-1, 4)
    if factor > 1:
        boxes = boxes * factor
    return numpy.round(boxes).astype(int)


def lfw_frame(box, scale=LFW_FRAME_SCALE):
    """The square crop ``(x0, y0, side)`` around a face box in LFW's framing (may leave the image)."""
    x, y, width, height = box
    side = int(round(max(width, height) * scale))
    centre_x, centre_y = x + width / 2, y + height / 2
    return int(round(centre_x - side / 2)), int(round(centre_y - side / 2)), side


def crop_square(image, x0, y0, side):
    """The ``side x side`` window of ``image`` at (x0, y0), zero-filled where it leaves the image."""
    height, width = image.shape[:2]
    crop = numpy.zeros((side, side) + image.shape[2:], dtype=image.dtype)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + side, height), min(x0 + side, width)
    if bottom > top and right > left:
        crop[top - y0:bottom - y0, left - x0:right - x0] = image[top:bottom, left:right]
    return crop


def parse_faces(image, parse_face, whole_image, background=0):
    """Detect the faces of ``image``, parse each in LFW framing, paste the results back:
    ``(labels, boxes)``, what :func:`minirnng.parser.parse_detected_faces` returns.

    image : uint8 (H, W, 3); parse_face(crop) -> ``(labels (s, s), certainty (s, s))`` for a square
    crop, the certainty being how sure each pixel is not ``background``; whole_image(image) ->
    labels (H, W), used without OpenCV or when no face is found (``boxes`` is then empty). Where
    crops overlap, a pixel takes the labels of the face that is most certain it is not background.
    labels : uint8 (H, W); boxes : int (F, 4) face detections ``(x, y, width, height)``.
    """
    boxes = detect_faces(image) if detector_available() else numpy.zeros((0, 4), dtype=int)
    if len(boxes) == 0:
        return whole_image(image), boxes
    height, width = image.shape[:2]
    labels = numpy.full((height, width), background, dtype=numpy.uint8)
    certainty = numpy.zeros((height, width), dtype=numpy.float32)  # that of the pixel's owner
    for box in boxes:
        x0, y0, side = lfw_frame(box)
        face_labels, face_certainty = parse_face(crop_square(image, x0, y0, side))
        top, left = max(y0, 0), max(x0, 0)
        bottom, right = min(y0 + side, height), min(x0 + side, width)
        window = (slice(top - y0, bottom - y0), slice(left - x0, right - x0))
        better = face_certainty[window] > certainty[top:bottom, left:right]
        labels[top:bottom, left:right][better] = face_labels[window][better]
        certainty[top:bottom, left:right][better] = face_certainty[window][better]
    return labels, boxes

