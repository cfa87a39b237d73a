"""Datasets as in-memory uint8 tensors, augmented per batch on the training device.

Every datamodule keeps the whole dataset as ``uint8`` tensors (Fashion-MNIST: 47 MB, CIFAR-10: 180 MB), so a
batch is one indexing operation; conversion to float, the thesis augmentation (4-pixel reflect pad, random
crop, horizontal flip) and per-channel normalisation with training-split statistics run on the batch after
it reaches the device (``on_after_batch_transfer``), where they are cheap.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_nas.arch import DataShape

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


class DataError(Exception):
    """The data cannot be used; the message names the file or directory and what is wrong."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the message says how to get it."""


class DataFileError(DataError, ValueError):
    """A data file is truncated, corrupt or inconsistent with its companion (images vs labels)."""


def check_split(name: str, x: Tensor, y: Tensor, shape: DataShape, source: str) -> None:
    """Raise :class:`DataFileError` naming the split and ``source`` unless the split fits ``shape``.

    Checked where the data is read, before any training: a test label out of range would otherwise fail
    only after the whole fit.

    Args:
        name: the split (``FashionMNISTDataModule test set``).
        x: images ``(N, C, H, W)``.
        y: integer labels ``(N,)``.
        shape: what the network is built for.
        source: the files or function the split came from.
    """
    check_pairs(name, x, y, source)
    expected = (shape.in_channels, shape.input_size, shape.input_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise DataFileError(
            f"{name}: images of shape {tuple(x.shape[1:])} (C, H, W), but the network is built for "
            f"{expected} ({source})"
        )
    if x.is_floating_point() and not bool(x.isfinite().all()):
        bad = int((~x.isfinite()).flatten(1).any(1).nonzero()[0])
        raise DataFileError(f"{name}: image {bad} holds NaN or infinite pixels ({source})")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DataFileError(f"{name}: labels must be integers; got {y.dtype} ({source})")
    out = (y < 0) | (y >= shape.num_classes)
    if bool(out.any()):
        i = int(out.nonzero()[0])
        raise DataFileError(
            f"{name}: label {int(y[i])} of sample {i} is outside [0, {shape.num_classes}) "
            f"({int(out.sum())} such labels; {source})"
        )


def check_pairs(name: str, x: Tensor, y: Tensor, source: str) -> None:
    """Raise :class:`DataFileError` unless ``x`` and ``y`` hold the same, nonzero number of samples."""
    if len(x) != len(y):
        raise DataFileError(f"{name}: {len(x)} images but {len(y)} labels ({source})")
    if len(y) == 0:
        raise DataFileError(f"{name}: no samples ({source})")


# -- batch transforms (pure functions) ------------------------------------------------------------------
def random_crop_flip(
    x: Tensor, pad: int, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Reflect-pad by ``pad``, crop back to the input size at a random offset per image, random h-flip.

    Args:
        x: images ``(B, C, H, W)``, any dtype.
        pad: padding on each side (the thesis: 4).
        flip: also flip each image horizontally with probability 1/2.
        generator: random source (defaults to torch's global one).
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
        oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if flip:
        mask = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 images to float, standardised per channel: ``(x / 255 - mean) / std``."""
    return (x.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class _InMemory(Dataset):
    """uint8 images and labels; ``__getitems__`` returns a whole batch with one indexing operation."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(idx, device=self.x.device)  # the images may live on the training device
        return self.x[t], self.y[t]

    def to(self, device: torch.device) -> _InMemory:
        """The same images and labels on ``device`` (one copy)."""
        return _InMemory(self.x.to(device), self.y.to(device))


def data_device(on_device: bool | None, root: torch.device | None) -> torch.device | None:
    """Where a datamodule keeps its images: ``root`` (the training device) or ``None`` (host memory).

    Args:
        on_device: ``True`` on the training device, ``False`` in host memory, ``None`` on the training
            device when it is a CUDA one (the datasets fit there many times over, and a step then copies
            no image from the host).
        root: the trainer's root device, ``None`` without a trainer.
    """
    if root is None or on_device is False:
        return None
    if on_device or root.type == "cuda":
        return root
    return None


class EpochShuffle(Sampler[int]):
    """Random order that depends only on ``(seed, epoch)``.

    A run resumed at an epoch boundary sees exactly the batches an uninterrupted run would. Lightning
    calls :meth:`set_epoch` every epoch.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _mix(*ints: int) -> int:
    h = 0
    for i in ints:
        h = (h * 1_000_003 + i) % (2**63 - 1)
    return h


def _as_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch  # __getitems__ already stacked the batch


class ImageDataModule(L.LightningDataModule):
    """Base datamodule: train/val split of the training set, a separate test set, on-device augmentation.

    Subclasses define ``SHAPE`` (or override :attr:`data_shape`) and :meth:`load_arrays`.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``2 * batch_size``).
        val_size: images held out of the training set for validation (fixed seed).
        holdout_size: images held out of the training set for a search's own choices (NetAdapt picks its
            candidates on them), never trained on, never used for model selection (fixed seed, disjoint
            from validation); 0: none.
        split_seed: seed of the train/val/holdout split (fixed across runs).
        seed: seed of the shuffling and augmentation, combined with the epoch number; ``None`` takes
            ``torch.initial_seed()`` at setup, i.e. the run's ``seed_everything`` value.
        augment: random crop (reflect pad ``crop_pad``) and horizontal flip on training batches.
        crop_pad: padding of the random crop.
        num_workers: DataLoader workers (0 is right: batches are single indexing operations).
        on_device: keep the images on the training device (``True``), in host memory (``False``), or on
            it when it is a CUDA device (``None``): the datasets go there once, augmentation runs there,
            and a step copies no image from the host. Needs ``num_workers: 0``.
    """

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        holdout_size: int = 0,
        split_seed: int = 0,
        seed: int | None = None,
        augment: bool = True,
        crop_pad: int = 4,
        num_workers: int = 0,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"val_size must be an integer >= 0; got {val_size!r}")
        if isinstance(crop_pad, bool) or not isinstance(crop_pad, int) or crop_pad < 0:
            raise ValueError(f"crop_pad must be an integer >= 0; got {crop_pad!r}")
        # reflect padding needs the padding smaller than the image (and a crop that large is no crop)
        side = getattr(type(self), "SHAPE", None)
        if side is not None and augment and crop_pad >= side.input_size:
            raise ValueError(
                f"crop_pad={crop_pad} must be smaller than the images ({side.input_size} pixels a side)"
            )
        if not isinstance(holdout_size, int) or holdout_size < 0:
            raise ValueError(f"holdout_size must be an integer >= 0; got {holdout_size!r}")
        self.batch_size = batch_size
        self.holdout_size = holdout_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.seed = seed
        self._seed = 0  # the seed in use: ``seed``, or the run's seed, resolved in setup()
        self._aug: tuple[int, torch.Generator] | None = None  # (epoch, generator) of the augmentation
        self.augment = augment
        self.crop_pad = crop_pad
        self.num_workers = num_workers
        self.on_device = on_device
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self._splits: dict[str, _InMemory] = {}
        self._arrays: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # read by prepare_data

    SHAPE: DataShape

    @property
    def data_shape(self) -> DataShape:
        """Shape of the images and number of classes (known before any data is read)."""
        return self.SHAPE

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``train_x, train_y, test_x, test_y``: uint8 ``(N, C, H, W)`` images and int64 labels."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Find (or download) and read the data, so a missing or corrupt file fails before any run files.

        Lightning calls this before the loggers create their run directories; the arrays are kept for
        :meth:`setup` (other processes under DDP read them in ``setup``).
        """
        if not self._splits and self._arrays is None:
            self._arrays = self._checked_arrays()

    def _checked_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        train_x, train_y, test_x, test_y = self.load_arrays()
        source = self.source()
        check_split(f"{type(self).__name__} training set", train_x, train_y, self.data_shape, source)
        check_split(f"{type(self).__name__} test set", test_x, test_y, self.data_shape, source)
        held = self.val_size + self.holdout_size
        if held >= len(train_y):
            raise DataFileError(
                f"val_size={self.val_size} + holdout_size={self.holdout_size} leaves no training data: the "
                f"training set ({source}) has {len(train_y)} images"
            )
        return train_x, train_y, test_x, test_y

    def source(self) -> str:
        """Where the arrays come from, for messages (the files' directory, or ``load_arrays``)."""
        where = getattr(self, "found_in", None) or getattr(self, "root", None)
        return str(where) if where else f"{type(self).__name__}.load_arrays"

    def setup(self, stage: str | None = None) -> None:
        """Load once, split train/val with a fixed seed, compute the normalisation statistics."""
        if self._splits:
            return
        arrays, self._arrays = self._arrays or self._checked_arrays(), None
        train_x, train_y, test_x, test_y = arrays
        held = self.val_size + self.holdout_size  # checked against the data in _checked_arrays
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.split_seed))
        # the holdout comes after validation, so holdout_size: 0 keeps every earlier run's splits
        val_idx, hold_idx, tr_idx = perm[: self.val_size], perm[self.val_size : held], perm[held:]
        self._splits = {
            "train": _InMemory(train_x[tr_idx], train_y[tr_idx]),
            "val": _InMemory(train_x[val_idx], train_y[val_idx]),
            "holdout": _InMemory(train_x[hold_idx], train_y[hold_idx]),
            "test": _InMemory(test_x, test_y),
        }
        self._seed = torch.initial_seed() if self.seed is None else self.seed
        tr = self._splits["train"].x.float().div_(255)
        self.mean = tr.mean(dim=(0, 2, 3))
        self.std = tr.std(dim=(0, 2, 3)).clamp_min(1e-6)
        trainer = self.trainer  # None when set up by hand: host memory
        device = data_device(self.on_device, trainer.strategy.root_device if trainer is not None else None)
        if device is not None and device.type != "cpu":
            if self.num_workers:
                raise ValueError(
                    f"on_device keeps the images on {device}, where DataLoader workers cannot index them; "
                    f"set num_workers: 0 (got {self.num_workers}) or on_device: false"
                )
            self._splits = {k: ds.to(device) for k, ds in self._splits.items()}
            self.mean, self.std = self.mean.to(device), self.std.to(device)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self._splits[split]
        return DataLoader(
            ds,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochShuffle(len(ds), self._seed) if shuffle else None,
            drop_last=split == "train" and len(ds) > self.batch_size,
            collate_fn=_as_batch,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test", shuffle=False)

    def criterion_batches(self, num_batches: int, batch_size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        """Distinct training images for a pruning criterion: normalised, not augmented.

        They lie where the data is kept (host memory, or the training device with ``on_device``). Drawn
        without replacement from the training split by a generator seeded with ``(seed, run seed)``, so every
        rank (and a resumed run) draws the same images, and the training order and augmentation are left
        untouched.
        """
        if self.mean is None or self.std is None:
            raise RuntimeError("call setup() before criterion_batches(): the data is not loaded")
        ds = self._splits["train"]
        n = num_batches * batch_size
        if n > len(ds):
            raise ValueError(
                f"{num_batches} criterion batches of {batch_size} need {n} images; the training split has "
                f"{len(ds)}"
            )
        g = torch.Generator().manual_seed(_mix(self._seed, seed, 2))
        idx = torch.randperm(len(ds), generator=g)[:n].view(num_batches, batch_size)
        return [self.prepare_batch(ds.__getitems__(i.tolist()), train=False) for i in idx]

    def holdout_batches(self, batch_size: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """The held-out split (``holdout_size`` images), normalised, in a fixed order, where the data lies."""
        if self.mean is None or self.std is None:
            raise RuntimeError("call setup() before holdout_batches(): the data is not loaded")
        ds = self._splits["holdout"]
        if len(ds) == 0:
            raise ValueError("the datamodule holds no images out (holdout_size: 0); set data holdout_size")
        n = batch_size or self.eval_batch_size
        return [
            self.prepare_batch(ds.__getitems__(list(range(i, min(i + n, len(ds))))), train=False)
            for i in range(0, len(ds), n)
        ]

    def prepare_batch(
        self, batch: tuple[Tensor, Tensor], train: bool, epoch: int = 0, rank: int = 0
    ) -> tuple[Tensor, Tensor]:
        """uint8 batch on the device -> augmented (if ``train``) and normalised float batch.

        The augmentation draws from a generator seeded by ``(seed, epoch, rank)`` and advanced batch by
        batch, so it does not depend on anything else that used the global random state, and a run
        resumed at an epoch boundary augments exactly as an uninterrupted one.
        """
        x, y = batch
        if self.mean is None or self.std is None:
            raise RuntimeError("call setup() before prepare_batch(): normalisation statistics are unknown")
        if train and self.augment:
            if self._aug is None or self._aug[0] != epoch or self._aug[1].device != x.device:
                gen = torch.Generator(device=x.device).manual_seed(_mix(self._seed, epoch, rank, 1))
                self._aug = (epoch, gen)
            x = random_crop_flip(x, self.crop_pad, generator=self._aug[1])
        return normalize(x, self.mean.to(x.device), self.std.to(x.device)), y

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        """Augment and normalise on the training device."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return self.prepare_batch(batch, train=False)
        return self.prepare_batch(batch, train=True, epoch=trainer.current_epoch, rank=trainer.global_rank)


# -- Fashion-MNIST ----------------------------------------------------------------------------------------
def read_idx(path: Path) -> Tensor:
    """Read an IDX file (MNIST format), gzipped or not, into a uint8 tensor.

    Raises:
        DataFileError: naming the file, when it is empty, truncated (also a truncated ``.gz``), not a uint8
            IDX file, or longer than its header says.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as err:  # a truncated or damaged .gz
        raise DataFileError(
            f"{path}: cannot be decompressed ({err or type(err).__name__}); the file is "
            "truncated or corrupt: fetch it again"
        ) from err
    if len(data) < 4:
        raise DataFileError(f"{path}: {len(data)} bytes, too short for an IDX header (empty or truncated)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim == 0:
        raise DataFileError(f"{path} is not a uint8 IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(f"{path}: header truncated ({len(data)} bytes, {header} needed for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataFileError(
            f"{path}: {what}: header dims {list(dims)} need {expected:,} bytes, the file has {len(data):,}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (60k train, 10k test, 1x28x28, 10 classes).

    Looked up in this order: ``root`` (IDX files, gzipped or not, directly inside it or in torchvision's
    ``FashionMNIST/raw`` layout), Debian's ``dataset-fashion-mnist`` package
    (``/usr/share/datasets/fashion-mnist``), then a torchvision download into ``root`` if ``download``.

    Args:
        root: directory holding the dataset (or where to download it).
        download: allow downloading with torchvision when it is not found locally.
        **kwargs: see :class:`ImageDataModule`.
    """

    SHAPE = DataShape(1, 28, 10)

    def __init__(self, root: str | None = None, download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if root and not download and not Path(root).is_dir():
            raise DatasetNotFoundError(
                f"Fashion-MNIST root {root!r} is not a directory; give the directory holding the four IDX "
                f"files, or leave root unset to use the system copy ({DEBIAN_FASHION_MNIST})"
            )
        self.root = root
        self.download = download

    def _candidates(self) -> list[Path]:
        # an explicit root is the only place looked in: falling back to another copy would hide a mistake
        if self.root:
            return [Path(self.root), Path(self.root) / "FashionMNIST" / "raw"]
        return [DEBIAN_FASHION_MNIST]

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # noqa: D102
        for d in self._candidates():
            files = {k: _find_idx(d, stem) for k, stem in FASHION_FILES.items()}
            if all(files.values()):
                t = {k: read_idx(p) for k, p in files.items()}  # type: ignore[arg-type]
                for split in ("train", "test"):
                    x, y = files[f"{split}_x"], files[f"{split}_y"]
                    if t[f"{split}_x"].dim() != 3 or t[f"{split}_y"].dim() != 1:
                        raise DataFileError(
                            f"{x} / {y}: expected images (N, 28, 28) and labels (N,); got "
                            f"{list(t[f'{split}_x'].shape)} and {list(t[f'{split}_y'].shape)}"
                        )
                    check_pairs(f"Fashion-MNIST {split} split", t[f"{split}_x"], t[f"{split}_y"], f"{x}, {y}")
                self.found_in = d
                return t["train_x"][:, None], t["train_y"].long(), t["test_x"][:, None], t["test_y"].long()
        if self.download and self.root:
            from torchvision.datasets import FashionMNIST

            try:
                tr = FashionMNIST(self.root, train=True, download=True)
                te = FashionMNIST(self.root, train=False, download=True)
            except Exception as err:  # network errors come in many types
                raise DatasetNotFoundError(f"{self._missing_message()} The download failed: {err}") from err
            return tr.data[:, None], tr.targets.long(), te.data[:, None], te.targets.long()
        raise DatasetNotFoundError(self._missing_message())

    def _missing_message(self) -> str:
        where = ", ".join(str(d) for d in self._candidates())
        return (
            f"Fashion-MNIST not found (looked in: {where}). Get it with `apt-get install "
            "dataset-fashion-mnist` (Debian/Ubuntu, offline), or put the four IDX files "
            f"({', '.join(FASHION_FILES.values())}, optionally .gz) in a directory and pass "
            "--data.init_args.root DIR, or pass --data.init_args.download true with a root to download them."
        )


# -- CIFAR-10 -----------------------------------------------------------------------------------------------
class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 through torchvision (50k train split 45k/5k, 10k test, 3x32x32), thesis augmentation.

    Args:
        root: torchvision root (holds ``cifar-10-batches-py``).
        download: let torchvision download it when it is not in ``root``.
        **kwargs: see :class:`ImageDataModule`.
    """

    SHAPE = DataShape(3, 32, 10)

    def __init__(self, root: str = "data", download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # noqa: D102
        from torchvision.datasets import CIFAR10

        folder = Path(self.root) / CIFAR10.base_folder
        present = all((folder / name).is_file() for name, _ in CIFAR10.train_list + CIFAR10.test_list)
        try:
            tr = CIFAR10(self.root, train=True, download=self.download and not present)
            te = CIFAR10(self.root, train=False, download=False)
        except Exception as err:  # torchvision raises RuntimeError when missing, URLError etc. offline
            if present:  # the files are there: one is corrupt (MD5, unpickling, sizes)
                raise DataFileError(f"CIFAR-10 in {folder}: {_bad_cifar_file(folder)}") from err
            reason = "not downloaded (download: false)" if not self.download else type(err).__name__
            raise DatasetNotFoundError(
                f"CIFAR-10 not found in {str(folder)!r} ({reason}; this machine may be offline). Extract "
                "cifar-10-python.tar.gz under a root and pass --data.init_args.root DIR, or train on the "
                "Fashion-MNIST twin of the config (NAME_fast.yaml), or override the data with --data "
                "lit_nas.data.FashionMNISTDataModule --data.root null --data.download false."
            ) from None

        def to_tensor(ds: CIFAR10) -> tuple[Tensor, Tensor]:
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, uint8
            return x, torch.as_tensor(ds.targets, dtype=torch.long)

        arrays = (*to_tensor(tr), *to_tensor(te))
        if len(arrays[0]) != len(arrays[1]) or len(arrays[2]) != len(arrays[3]):
            raise DataFileError(f"CIFAR-10 in {folder}: {_bad_cifar_file(folder)}")
        return arrays


#: the only globals a CIFAR-10 batch pickle refers to (a numpy array, and Python 2 strings as bytes)
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds and nothing else.

    Any other global (a function a crafted file would call, such as ``os.system``) is refused before it is
    looked up.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict:
    """The contents of one CIFAR-10 batch file, read without running any code the file may carry.

    Raises:
        pickle.UnpicklingError: the file refers to anything but a numpy array and strings.
    """
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="latin1").load()


def _bad_cifar_file(folder: Path) -> str:
    """Which CIFAR-10 batch file is unreadable or inconsistent, and how.

    These files failed torchvision's checks, so they are read by :func:`read_cifar_batch` alone, never by a
    plain unpickler.
    """
    from torchvision.datasets import CIFAR10

    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        path = folder / name
        try:
            entry = read_cifar_batch(path)
            images, labels = entry["data"], entry.get("labels", entry.get("fine_labels"))
        except Exception as err:
            return f"{path} is corrupt or truncated ({type(err).__name__}: {err}); extract it again"
        if labels is None or len(images) != len(labels) or images.size != len(labels) * 3 * 32 * 32:
            count = None if labels is None else len(labels)
            return f"{path}: {images.size} values for {count} labels (expected 3072 per image)"
    return "the batch files fail torchvision's integrity (MD5) check; extract cifar-10-python.tar.gz again"


# -- synthetic ----------------------------------------------------------------------------------------------
class SyntheticDataModule(ImageDataModule):
    """Random but learnable images for fast tests: each class is a fixed random template plus noise.

    Args:
        num_train: training images (before the validation split).
        num_test: test images.
        in_channels: image channels.
        input_size: image side.
        num_classes: classes.
        noise: standard deviation of the per-pixel noise, in uint8 units.
        data_seed: seed of the templates and noise (the images themselves).
        val_size: images held out for validation; ``None``: 10% of ``num_train``.
        augment: random crop and flip (off: shifted random templates would be unlearnable).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        num_train: int = 512,
        num_test: int = 256,
        in_channels: int = 3,
        input_size: int = 32,
        num_classes: int = 10,
        noise: float = 40.0,
        data_seed: int = 0,
        val_size: int | None = None,
        augment: bool = False,
        **kwargs,
    ) -> None:
        # explicit parameters, not kwargs.setdefault: the CLI only sees defaults in the signature
        val = num_train // 10 if val_size is None else val_size
        super().__init__(val_size=val, augment=augment, **kwargs)
        self.num_train, self.num_test, self.noise, self.data_seed = num_train, num_test, noise, data_seed
        self._shape = DataShape(in_channels, input_size, num_classes)

    @property
    def data_shape(self) -> DataShape:  # noqa: D102
        return self._shape

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # noqa: D102
        g = torch.Generator().manual_seed(self.data_seed)
        s = self._shape
        templates = torch.rand(s.num_classes, s.in_channels, s.input_size, s.input_size, generator=g) * 255

        def draw(n: int) -> tuple[Tensor, Tensor]:
            y = torch.randint(0, s.num_classes, (n,), generator=g)
            x = templates[y] + self.noise * torch.randn(n, *templates.shape[1:], generator=g)
            return x.clamp(0, 255).to(torch.uint8), y

        return (*draw(self.num_train), *draw(self.num_test))
