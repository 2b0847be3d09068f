"""Everything that feeds the networks: datasets, synthetic faces and the input pipeline.

Imports only NumPy, SciPy and Pillow (never a model, layer or the training code).
"""

from .classes import (BACKGROUND, COMPONENT_GROUPS, HELEN_CLASSES, HELEN_TO_LFW, KEYPOINT_MIRROR_ORDER,
                      KEYPOINT_NAMES, LFW_CLASSES, class_list, mirror_permutation)
from .datasets import (CelebAMaskHQ, Dataset, Helen, LFWPL, MalformedDataError, MissingDataError,
                       decode_colour_labels)
from .synthetic import SyntheticFaces
from .catalog import DATASETS, load_split, open_dataset
from .pipeline import (DEFAULT_INPUT_SIZE, INPUT_RANGE, MULTI_FACE_CANVAS, Augmentation, Letterbox,
                       PreloadedDataset, affine_matrix, batches, denormalize, is_mirroring, letterbox,
                       make_batch, normalize, preload, resize, resize_image, resize_labels, stack_samples,
                       warp, warp_keypoints)
