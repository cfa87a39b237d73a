"""Small datasets written in the real on-disk formats: CIFAR-10 (``cifar-10-batches-py``) and IDX."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def write_tiny_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Each file holds ``per_batch`` images, pickled exactly as the real dataset (bytes keys, rows of
    3072 uint8 in channel-major order). Returns the arrays written, for comparison."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in FILES:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        # the official files are Python 2 pickles whose str keys load as str with encoding="latin1"
        batch = {"batch_label": name, "labels": labels, "data": data, "filenames": []}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data, np.array(labels))
    meta = {"label_names": "airplane automobile bird cat deer dog frog horse ship truck".split()}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def skip_md5(monkeypatch) -> None:
    """The real loader verifies the official files' MD5 sums; generated files can only pass an
    existence check. Everything else (unpickling, reshaping, labels, meta) runs torchvision's own code."""
    import os

    monkeypatch.setattr(
        "torchvision.datasets.cifar.check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Write ``array`` as a uint8 IDX file (the MNIST / Fashion-MNIST format), gzipped if ``gz``."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)
