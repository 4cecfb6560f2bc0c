"""rpq-fx convert --calibration: text lines through a Hugging Face model's own tokenizer, a folder of
images through timm's preprocessing; the checkpoint equals rpq_fx.convert on the same inputs."""

import pytest
import torch

from rpq_fx import cli

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")
safetensors_torch = pytest.importorskip("safetensors.torch")

import rpq_fx  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow big small red blue".split()
LINES = ["the cat sat on the mat", "", "the dog ran fast", "a big red cat sat", "blue dog", "the mat"] * 2
FLAGS = ["--num-codes", "16", "--init", "kmeans", "--quiet", "--no-graph"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BertModel saved with a WordPiece tokenizer built offline from a word list."""
    folder = tmp_path_factory.mktemp("bert")
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = transformers.BertTokenizer(vocab=vocab)  # reason: transformers 5 ignores vocab_file= (all [UNK])
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                                     vocab_size=len(WORDS) + 5, max_position_embeddings=64, architectures=["BertModel"])
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "lines.txt").write_text("\n".join(LINES) + "\n")
    return folder


class Seen(list):
    skip_fit = False


@pytest.fixture
def fits(monkeypatch):
    """Every ``calibration=`` the command line passes to ``rpq_fx.convert`` (which then runs as usual)."""
    seen = Seen()
    real = rpq_fx.convert

    def convert(model, *args, calibration=None, **kwargs):
        seen.append(calibration)
        if seen.skip_fit:  # reason: a calibrated fit of a whole CNN takes a minute; the batches are what is tested
            return real(model, *args, **{**kwargs, "init": "random"})
        return real(model, *args, calibration=calibration, **kwargs)

    monkeypatch.setattr(rpq_fx, "convert", convert)
    return seen


def filled(checkpoint) -> set[str]:
    return {layer["filled"] for layer in rpq_fx.checkpoint_info(checkpoint)["layers"] if layer.get("filled")}


def test_text_lines_are_tokenised_by_the_models_tokenizer(bert, tmp_path, capsys, fits):
    out = tmp_path / "out"
    status = cli.main(["convert", f"hf:{bert}", "--calibration", str(bert / "lines.txt"), "--eval", *FLAGS,
                       "--codebook-dim", "8", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    assert filled(out / "model.safetensors") == {"kmeans+calibration"}, "every layer was fitted to the data"

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert))
    lines = [line for line in LINES if line]  # empty lines are skipped
    expected = [tokenizer(lines[i:i + 8], padding=True, truncation=True, max_length=64, return_tensors="pt")
                for i in range(0, len(lines), 8)]
    (given,) = fits
    assert [sorted(batch) for batch in given] == [sorted(batch) for batch in expected]
    for batch, reference in zip(given, expected):
        assert all(torch.equal(batch[key], reference[key]) for key in reference)
    assert given[0]["input_ids"][0, :4].tolist() == [2, 5 + WORDS.index("the"), 5 + WORDS.index("cat"),
                                                     5 + WORDS.index("sat")], "the words, not [UNK]"


def test_a_folder_of_images_is_preprocessed_as_timm_evaluates_the_model(tmp_path, capsys, fits):
    images = tmp_path / "images"
    images.mkdir()
    pixels = torch.Generator().manual_seed(0)
    for i, size in enumerate([(200, 180), (160, 240), (90, 90)]):
        array = torch.randint(0, 256, (*size, 3), generator=pixels, dtype=torch.uint8).numpy()
        Image.fromarray(array).save(images / f"img{i}.png")
    (images / "notes.txt").write_text("not an image: skipped")
    out = tmp_path / "out"
    fits.skip_fit = True
    status = cli.main(["convert", "timm:test_efficientnet", "--calibration", str(images), "--eval", *FLAGS,
                       "--codebook-dim", "16", "--out", str(out)])
    assert status == 0, capsys.readouterr().err

    model = timm.create_model("test_efficientnet", pretrained=False)
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    batch = torch.stack([transform(Image.open(images / f"img{i}.png").convert("RGB")) for i in range(3)])
    (given,) = fits
    assert len(given) == 1 and given[0].shape == (3, *config["input_size"]) == batch.shape
    assert torch.equal(given[0], batch)


@pytest.mark.parametrize("case, message", [
    ("no kmeans", "--calibration makes the k-means fit data-aware: add --init kmeans"),
    ("folder for hf", "a Hugging Face model takes a text file"),
    ("empty file", "no non-empty line to calibrate on"),
    ("not utf-8", "not UTF-8 text"),
    ("no tokenizer", "no tokenizer in"),
    ("wrong tokenizer", "maps every word to its unknown token"),
    ("file for timm", "a timm model takes a folder of images"),
    ("broken image", "cannot read the image"),
    ("no images", "no image file in it"),
    ("module spec", "reads text for hf: models and images for timm: models"),
])
def test_unusable_calibration_data_is_one_line_naming_it(bert, tmp_path, capsys, case, message):
    text = tmp_path / "lines.txt"
    text.write_text("the cat\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    spec, data, extra = f"hf:{bert}", text, ["--init", "kmeans"]
    if case == "no kmeans":
        extra = []
    elif case == "folder for hf":
        data = folder
    elif case == "empty file":
        text.write_text("\n  \n")
    elif case == "not utf-8":
        text.write_bytes(b"\xff\xfe\xfa cat\n")
    elif case == "no tokenizer":
        bare = tmp_path / "bare"
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                vocab_size=300, architectures=["BertModel"]).save_pretrained(bare)
        spec = f"hf:{bare}"
    elif case == "wrong tokenizer":
        text.write_text("zebra giraffe\nokapi\n")
    elif case == "file for timm":
        spec = "timm:test_efficientnet"
    elif case in ("broken image", "no images"):
        spec, data = "timm:test_efficientnet", folder
        if case == "broken image":
            (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "module spec":
        spec = "torch.nn:Identity"
    status = cli.main(["convert", spec, "--calibration", str(data), *extra, "--quiet", "--no-graph",
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("rpq-fx: error: ") and message in line, line
    if case not in ("no kmeans", "module spec"):
        assert str(data if case != "no tokenizer" else tmp_path / "bare") in line, "the message names the data"
