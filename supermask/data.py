"""Datasets held in memory as tensors; batches are slices, not per-sample PIL transforms.

``load(name, data_dir)`` returns a ``Dataset`` with normalised float32 tensors for train, a held-out
validation split taken from the training set (for early stopping) and test. MNIST-sized sets fit
in a few hundred MB, so every epoch is a permutation and a loop of index slices.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic", "imagenet")
STREAMED = ("imagenet",)  # read from disk batch by batch (ImageFolderData), not held in memory
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_STATS = {  # per-channel mean and std of the training images
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class Dataset:
    """An in-memory dataset: float32 images (N, C, H, W), normalised, and int64 labels, split into train, val (held
    out from the training set) and test."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool = False  # random crop + flip (CIFAR)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape (C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])


@dataclass
class ImageFolderData:
    """A dataset too large for memory (ImageNet): torchvision ImageFolder datasets read through a
    DataLoader with workers. train (augmented), val (held out from DATA_DIR/train, evaluation
    transform) and test (DATA_DIR/val) are torch Datasets of (image tensor, label)."""
    name: str
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    input_shape: tuple
    workers: int = 8
    augment: bool = True
    streaming: bool = True


def load_image_folder(name: str, data_dir: str | os.PathLike, val_size: int = 5000, workers: int = 8,
                      image_size: int = 224) -> ImageFolderData:
    """The standard ImageFolder layout: data_dir/train/<class>/*.JPEG and data_dir/val/<class>/*.

    Training images: RandomResizedCrop(image_size) + horizontal flip; evaluation: Resize(image_size
    * 8/7, i.e. 256 for 224) + CenterCrop(image_size); both normalised with ImageNet's statistics.
    val_size training images (a fixed random choice) are held out for validation.
    """
    import copy  # noqa: PLC0415

    from torchvision import datasets, transforms  # noqa: PLC0415

    root = Path(data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{name}: no folder {root / split}; expected the ImageFolder layout "
                            f"{root}/train/<class>/*.JPEG and {root}/val/<class>/* (pass --data-dir)")
    mean, std = _STATS.get(name, _STATS["imagenet"])
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *norm])
    eval_tf = transforms.Compose([transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                                  *norm])
    try:
        train_all = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        test = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{name}: cannot read {root}: {e}") from None
    if test.classes != train_all.classes:
        raise DataError(f"{name}: {root / 'val'} and {root / 'train'} hold different class folders")
    if not 0 <= val_size < len(train_all):
        raise DataError(f"--val-size must be in [0, {len(train_all) - 1}], got {val_size}")
    eval_all = copy.copy(train_all)  # the same file list (scanned once), the evaluation transform
    eval_all.transform = eval_tf
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0))
    subset = torch.utils.data.Subset
    return ImageFolderData(name, subset(train_all, order[val_size:].tolist()),
                           subset(eval_all, order[:val_size].tolist()), test, len(train_all.classes),
                           (3, image_size, image_size), workers)


MAX_IDX_BYTES = 1 << 30  # the most values one IDX file may declare (MNIST's training images: 47 MB)


def read_idx(path: Path, ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file (MNIST's format), gzip-compressed or not, as a uint8 tensor. DataError, one
    line naming the file, when it cannot be read: bad gzip (truncated, corrupted, not gzip at all),
    wrong IDX magic, not ndim dimensions (when given), a declared size over MAX_IDX_BYTES, or fewer
    or more bytes than its shape. Read (and decompressed) incrementally: never more than the size its
    header declares plus one byte, so a gzip that inflates far past it costs no memory."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            shape = _idx_header(path, f, ndim)
            n = math.prod(shape)
            data = bytearray(n)
            got = f.readinto(memoryview(data)) if n else 0
            while 0 < got < n:  # gzip returns what one block held
                more = f.readinto(memoryview(data)[got:])
                if not more:
                    break
                got += more
            extra = len(f.read(1))
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        why = "truncated" if isinstance(e, EOFError) else " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: bad gzip file ({why}); download it again") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if got != n or extra:
        raise DataError(f"{path} is truncated or too long: its header says {n} values, "
                        f"it holds {got if got != n else 'more'}")
    return torch.frombuffer(data, dtype=torch.uint8).reshape(shape) if n else torch.empty(shape, dtype=torch.uint8)


def _idx_header(path: Path, f, ndim: int | None) -> tuple[int, ...]:
    """The shape an open IDX file's header declares (read from f); DataError when it is not one."""
    magic = f.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: not an IDX file ({len(magic)} bytes{', empty' if not magic else ''})")
    zero, dtype, dims = struct.unpack(">HBB", magic)
    if zero != 0 or dtype != 0x08 or dims == 0:
        raise DataError(f"{path}: wrong IDX magic {magic.hex()} (not an unsigned-byte IDX file)")
    if ndim is not None and dims != ndim:
        what = {1: "labels", 3: "images"}.get(ndim, f"{ndim}-dimensional data")
        raise DataError(f"{path}: wrong dimensions: {dims}-dimensional data where {what} "
                        f"({ndim} dimensions) belong")
    raw = f.read(4 * dims)
    if len(raw) < 4 * dims:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{dims}I", raw)
    if math.prod(shape) > MAX_IDX_BYTES:
        raise DataError(f"{path}: its header declares {math.prod(shape)} values (shape {shape}), more than the "
                        f"{MAX_IDX_BYTES} an IDX dataset of this tool may hold")
    return shape


def _check_idx_dataset(files, tensors, num_classes: int = 10):
    """Images (N, 28, 28) and labels (N,) of equal counts, labels in [0, num_classes): DataError
    naming the file otherwise."""
    (train_img, train_lab, test_img, test_lab), (tx, ty, sx, sy) = files, tensors
    for img_path, lab_path, x, y in ((train_img, train_lab, tx, ty), (test_img, test_lab, sx, sy)):
        if tuple(x.shape[1:]) != (28, 28):
            raise DataError(f"{img_path}: wrong dimensions: images of {tuple(x.shape[1:])}, expected 28x28")
        if len(x) != len(y):
            raise DataError(f"{img_path} holds {len(x)} images but {lab_path} {len(y)} labels: the counts differ")
        if len(y) == 0:
            raise DataError(f"{img_path}: no images")
        if int(y.max()) >= num_classes:
            raise DataError(f"{lab_path}: label {int(y.max())} is out of range (expected 0..{num_classes - 1})")
    return tensors


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path):
    """The four IDX files in folder (plain or .gz), or None."""
    found = []
    for stem in _IDX_FILES:
        hits = [folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found


# What the training labels of each IDX dataset are, byte for byte: the SHA-256 of Fashion-MNIST's
# decompressed train-labels-idx1-ubyte (Zalando's file, as Debian's dataset-fashion-mnist ships it)
# and the MD5 of MNIST's train-labels-idx1-ubyte.gz (LeCun's file, as torchvision's MNIST.resources
# lists it). A file of one dataset used as the other is refused.
KNOWN_TRAIN_LABELS = {"fashion-mnist": ("sha256", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
                      "mnist": ("md5-gz", "d53e105ee54ea40749a09fcbcd1e9432")}


def _check_which_dataset(name: str, labels_file: Path) -> None:
    """DataError when labels_file is known to be another IDX dataset's training labels than name's."""
    raw = labels_file.read_bytes()
    plain = gzip.decompress(raw) if str(labels_file).endswith(".gz") else raw
    digests = {"sha256": hashlib.sha256(plain).hexdigest(), "md5-gz": hashlib.md5(raw).hexdigest()}  # noqa: S324
    for other, (kind, digest) in KNOWN_TRAIN_LABELS.items():
        if other != name and digests[kind] == digest:
            raise DataError(f"{labels_file} holds {other}'s training labels, not {name}'s: point --data-dir at "
                            f"{name}'s files, or pass --dataset {other}")


def _read_idx_files(files):
    return _check_idx_dataset(files, [read_idx(f, ndim) for f, ndim in zip(files, (3, 1, 3, 1))])


def _load_idx_dataset(name: str, data_dir: Path, download: bool):
    torchvision_name = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    candidates = [data_dir / torchvision_name / "raw", data_dir / name, data_dir]
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        files = _find_idx(folder)
        if files and folder == DEBIAN_FASHION_MNIST and not data_dir.exists() and data_dir != Path("data"):
            raise DataError(f"--data-dir {data_dir} does not exist (misspelled?); {name} is also installed at "
                            f"{folder}: leave --data-dir out to use that copy, or name a folder that holds it")
        if files:
            tensors = _read_idx_files(files)  # (read first: a damaged file is named as such)
            _check_which_dataset(name, files[1])
            return tensors
    if download:
        import torchvision  # noqa: PLC0415 (only needed to download)
        cls = getattr(torchvision.datasets, torchvision_name)
        made = [d for d in (data_dir, data_dir / torchvision_name, candidates[0]) if not d.exists()]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints every mirror it tries
                for train in (True, False):
                    cls(str(data_dir), train=train, download=True)
        except Exception as e:  # noqa: BLE001 (offline: any network error)
            reason = "no network?" if isinstance(e, RuntimeError | OSError) else type(e).__name__
            _remove_empty(made)
            tried = ", ".join(str(c) for c in candidates)
            hint = ("install Debian's package (apt-get install dataset-fashion-mnist) or copy the four IDX "
                    f"files into {data_dir / name}" if name == "fashion-mnist" else
                    f"copy the four IDX files ({', '.join(s + '.gz' for s in _IDX_FILES)}) into {data_dir / name}, "
                    "or train offline on Fashion-MNIST: apt-get install dataset-fashion-mnist, "
                    "then --dataset fashion-mnist")
            raise DataError(f"{name} not found in {tried} and the download failed ({reason}); {hint}") from None
        files = _find_idx(candidates[0])
        if files:
            return _read_idx_files(files)
    raise DataError(f"{name} not found in {', '.join(str(c) for c in candidates)} (downloads disabled)")


def _remove_empty(folders: list[Path]):
    """Remove the folders a failed download created (deepest first) if they are still empty:
    a failed command leaves nothing behind."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty, or already gone
            folder.rmdir()


def _load_cifar(name: str, data_dir: Path, download: bool):
    import torchvision  # noqa: PLC0415
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    made = [] if data_dir.exists() else [data_dir]
    try:
        train, test = (cls(str(data_dir), train=t, download=download) for t in (True, False))
    except Exception as e:  # noqa: BLE001
        _remove_empty(made)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name} not found in {data_dir} and could not be downloaded ({reason}); "
                        f"on a machine with internet run once with --data-dir {data_dir} to fetch it") from None
    as_tensor = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return (as_tensor(train), torch.tensor(train.targets, dtype=torch.uint8 if name == "cifar10" else torch.int64),
            as_tensor(test), torch.tensor(test.targets))


def synthetic(n_train: int = 3000, n_test: int = 1000, shape=(1, 28, 28), num_classes: int = 10, seed: int = 0):
    """A small deterministic learnable task: each class is a fixed random image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *shape), generator=g)

    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = prototypes[y] + 0.5 * torch.randn((n, *shape), generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return (*draw(n_train), *draw(n_test))


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    if images.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
        images = images.unsqueeze(1)
    x = images.to(torch.float32).div_(255)
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def load(name: str, data_dir: str | os.PathLike = "data", val_size: int = 5000, download: bool = True,
         **streamed) -> Dataset | ImageFolderData:
    """Load a dataset into memory. The validation split is the same for every run (fixed seed).
    Datasets in STREAMED (imagenet) are not loaded but opened for reading (load_image_folder,
    which takes the keyword arguments workers and image_size)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name in STREAMED:
        return load_image_folder(name, data_dir, val_size, **streamed)
    data_dir = Path(data_dir)
    if name == "synthetic":
        train_x, train_y, test_x, test_y = synthetic()
        mean, std = (0.5,), (0.5,)
        val_size = min(val_size, 500)
    elif name in ("mnist", "fashion-mnist"):
        train_x, train_y, test_x, test_y = _load_idx_dataset(name, data_dir, download)
        mean, std = _STATS[name]
    else:
        train_x, train_y, test_x, test_y = _load_cifar(name, data_dir, download)
        mean, std = _STATS[name]
    if not 0 <= val_size < len(train_y):
        raise DataError(f"--val-size must be in [0, {len(train_y) - 1}], got {val_size}")
    train_x, test_x = _normalise(train_x, mean, std), _normalise(test_x, mean, std)
    train_y, test_y = train_y.long(), test_y.long()
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = order[:val_size], order[val_size:]
    num_classes = 100 if name == "cifar100" else 10
    return Dataset(name, train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                   test_x, test_y, num_classes, augment=name.startswith("cifar"))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch; depends only on (seed, epoch), so resume is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch at once."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    out = padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None = None,
            generator: torch.Generator | None = None, augment: bool = False):
    """Yield (x, y) slices of batch_size in the given order (None: in order, for evaluation)."""
    n = len(y)
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:  # index_select: a plain gather, cheaper than advanced indexing
            idx = order[start:start + batch_size]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        if augment:
            xb = augment_batch(xb, generator)
        yield xb, yb
