"""Calibration data for ``rpq-fx convert --calibration``: lines of text tokenised with a Hugging Face
model's own tokenizer, or a folder of images preprocessed with timm's data config for the model.

Every file is read as untrusted: empty input, undecodable text, unreadable or oversized images and a
folder without a tokenizer each give one error naming the file.
"""

import warnings
from pathlib import Path

from ._optional import require

__all__ = ["CalibrationDataError", "read_lines", "image_files", "text_batches", "image_batches", "BATCH_SIZE",
           "MAX_TOKENS"]

BATCH_SIZE = 8
MAX_TOKENS = 512  # the longest calibration sequence, whatever the tokenizer allows
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


class CalibrationDataError(ValueError):
    """A calibration file or folder that cannot be used; the message names it."""


def read_lines(path: Path, samples: int) -> list[str]:
    """The first ``samples`` non-empty lines of the UTF-8 text file ``path``."""
    if not path.is_file():
        raise CalibrationDataError(f"--calibration {path}: a Hugging Face model takes a text file (one example "
                                   "per line), and this is not a file")
    lines = []
    try:
        with path.open(encoding="utf-8") as file:
            for line in file:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                    if len(lines) == samples:
                        break
    except UnicodeDecodeError as error:
        raise CalibrationDataError(f"--calibration {path}: not UTF-8 text ({error})") from None
    if not lines:
        raise CalibrationDataError(f"--calibration {path}: no non-empty line to calibrate on")
    return lines


def text_batches(path: Path, lines: list[str], folder: Path, model) -> list[dict]:
    """``lines`` (read from ``path``), tokenised by the tokenizer saved in ``folder`` (the hf: model's
    folder) in batches of ``BATCH_SIZE``, as dicts of keyword inputs."""
    import torch

    transformers = require("transformers", "hf", "--calibration with hf: models")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # reason: transformers 5 then builds a tokenizer of special tokens only, every word unknown
        raise CalibrationDataError(f"--calibration: no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}); "
                                   "save the model's tokenizer there with tokenizer.save_pretrained")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CalibrationDataError(f"--calibration: no usable tokenizer in {folder} (save the model's tokenizer "
                                   f"there with tokenizer.save_pretrained): {error}") from None
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or MAX_TOKENS
    longest = min(MAX_TOKENS, tokenizer.model_max_length, positions)
    # reason: a tokenizer without a pad token (GPT-2's) cannot pad a batch; one line per call needs none
    size = BATCH_SIZE if tokenizer.pad_token is not None else 1
    batches = []
    for start in range(0, len(lines), size):
        encoded = tokenizer(lines[start:start + size], padding=size > 1, truncation=True, max_length=longest,
                            return_tensors="pt")
        batches.append(dict(encoded))
    ids = torch.cat([b["input_ids"].flatten() for b in batches])
    markers = [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id]  # [CLS], [PAD], ...
    words = ids[~torch.isin(ids, torch.tensor(markers, dtype=ids.dtype))]
    if words.numel() and tokenizer.unk_token_id is not None and bool((words == tokenizer.unk_token_id).all()):
        raise CalibrationDataError(f"--calibration {path}: the tokenizer in {folder} maps every word to its unknown "
                                   f"token {tokenizer.unk_token!r}: it is not this text's tokenizer")
    return batches


def image_files(folder: Path, samples: int) -> list[Path]:
    """The first ``samples`` image files of ``folder`` (by name; PIL's extensions)."""
    from PIL import Image

    if not folder.is_dir():
        raise CalibrationDataError(f"--calibration {folder}: a timm model takes a folder of images, and this is "
                                   "not a folder")
    suffixes = {s.lower() for s in Image.registered_extensions()}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())[:samples]
    if not files:
        raise CalibrationDataError(f"--calibration {folder}: no image file in it (looked for "
                                   f"{', '.join(sorted(suffixes)[:8])}, ...)")
    return files


def image_batches(files: list[Path], model) -> list:
    """The images ``files``, preprocessed as timm evaluates ``model`` (``resolve_data_config`` +
    ``create_transform``), in batches of ``BATCH_SIZE``."""
    import torch

    timm_data = require("timm", "timm", "--calibration with timm: models").data
    from PIL import Image, UnidentifiedImageError

    data_config = timm_data.resolve_data_config({}, model=model)
    transform = timm_data.create_transform(**data_config)
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    tensors = []
    for file in files:
        try:
            with warnings.catch_warnings():
                # reason: PIL only warns about an image large enough to be a decompression bomb
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    tensors.append(transform(image.convert(mode)))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError,
                ValueError) as error:
            raise CalibrationDataError(f"--calibration: cannot read the image {file}: {error}") from None
    return [torch.stack(tensors[i:i + BATCH_SIZE]) for i in range(0, len(tensors), BATCH_SIZE)]
