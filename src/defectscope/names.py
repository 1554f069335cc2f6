"""Names and bounds the command line shows before it loads the library (which imports PyTorch): kept here,
imported by the modules that use them, so `defectscope --help` answers at once."""

from __future__ import annotations

GOOD_ONLY_MODELS = ("augmented_autoencoder", "autoencoder", "knn", "ocsvm", "padim", "patchcore", "pca",
                    "pretrained_autoencoder", "vae")  # the registry's good-only models (a test keeps them equal)
LABEL_FORMATS = ("yolo", "yolo-seg", "coco", "masks")
TOKEN_ENV = "DEFECTSCOPE_TOKEN"
DEFECT_LIKE = 1.5  # a false alarm worth teaching scores near the threshold; one at 1.5x it looks like a defect
