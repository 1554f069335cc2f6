"""Names and bounds the command line shows before it loads the library (which imports PyTorch), and the rule for
names that become file or folder names: kept here, imported by the modules that use them, so `defectscope --help`
answers at once and the service does not load the experiment machinery for a name check."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from defectscope.errors import DefectscopeError, SettingsError

GOOD_ONLY_MODELS = ("augmented_autoencoder", "autoencoder", "knn", "ocsvm", "padim", "patchcore", "pca",
                    "pretrained_autoencoder", "vae")  # the registry's good-only models (a test keeps them equal)
MASK_MODELS = ("detector", "segmenter")  # the registry's models that learn from masks (the same test keeps them equal)
LABEL_FORMATS = ("yolo", "yolo-seg", "coco", "masks")
TOKEN_ENV = "DEFECTSCOPE_TOKEN"  # the service's engineer token
OPERATOR_TOKEN_ENV = "DEFECTSCOPE_OPERATOR_TOKEN"
DEFECT_LIKE = 1.5  # a false alarm worth teaching scores near the threshold; one at 1.5x it looks like a defect
MODEL_SUFFIX = ".dsmodel"  # a model file
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # names that become file or folder names
VERSION_DIGITS = 12  # a model file's version: the first hex digits of its sha256
MQTT_TOPIC = "defectscope/verdicts"  # where verdicts are published unless --mqtt-topic says
KEPT_VERDICTS = "defective,error"  # whose images serve --keep-images keeps unless --keep-verdicts says
KEPT_MB = 1024.0  # megabytes those images take at most unless --keep-images-mb says
RAY_WORKERS = 2  # Ray actors of `score --ray` unless --workers says
MAX_THREADS = 256  # threads one engine, fit or Ray task may be given: beyond the cores of any machine it runs on


def check_threads(threads: object) -> None:
    """Raise unless `threads` is None (the default) or a whole number from 1 to MAX_THREADS (each may be an OS
    thread: a typo of 100000 would exhaust the machine's processes)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise SettingsError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")


def as_text(text: str) -> str:
    """`text` as any UTF-8 file, database or Parquet column takes it: the bytes of a file name that are not UTF-8
    (which Python reads as lone surrogates) spelled \\xNN, so that a camera's Latin-1 name stays readable."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate no file name holds (from JSON, say)
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def map_nested(data: object, leaf: Callable[[object], object]) -> object:
    """A copy of nested dicts, lists and tuples (as lists) with `leaf` applied to every other value, dict keys too."""
    if isinstance(data, dict):
        return {map_nested(key, leaf): map_nested(value, leaf) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [map_nested(value, leaf) for value in data]
    return leaf(data)


def as_texts(data: object) -> object:
    """A copy of nested dicts and lists with every string (keys too) as `as_text` gives it."""
    return map_nested(data, lambda value: as_text(value) if isinstance(value, str) else value)


def few(items: Sequence[object], limit: int = 3) -> str:
    """The first `limit` items for a message, ', ...' after them when there are more."""
    return ", ".join(str(item) for item in items[:limit]) + (", ..." if len(items) > limit else "")


def version_of(sha256: str) -> str:
    """A model file's version: its sha256's first VERSION_DIGITS hex digits."""
    return sha256[:VERSION_DIGITS]


def check_name(name: object, what: str) -> str:
    """A name that is safe as one folder name (letters, digits, '.', '_', '-'; no path separators)."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise DefectscopeError(f"{what} name {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                               "letter or digit (it becomes a folder name)")
    return name
