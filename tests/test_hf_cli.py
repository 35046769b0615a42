"""The command line on a Hugging Face folder: in memory with ``--calib-text``, the HTML report, progress bars.

The folder is a small BERT built from a config, saved with ``save_pretrained``, with a WordPiece
tokenizer whose vocabulary the test writes (no download). Its weights are random: the tests check
structure, exactness and the routing between the in-memory and streamed paths, never quality.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cli_checks import one_line_error
from tests.skips import NO_BROWSER, chromium, require

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.huggingface import load_pretrained, tokenizer_of  # noqa: E402
from lowrank_ir import Decompose  # noqa: E402
from lowrank_ir.hf import load_decomposed  # noqa: E402
from tools.cli import main  # noqa: E402
from tools.hf_cli import calibration_batches, read_sentences  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue green house tree sun moon star sky "
         "under over near far").split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT folder (config.json, model.safetensors, tokenizer files) beside ``sentences.txt``."""
    root = tmp_path_factory.mktemp("hf")
    model_dir = root / "bert"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=64)
    transformers.BertModel(config).eval().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    draw = random.Random(0)
    lines = [" ".join(draw.choice(WORDS) for _ in range(draw.randint(3, 14))) for _ in range(24)]
    (root / "sentences.txt").write_text("\n".join(lines[:12]) + "\n\n" + "\n".join(lines[12:]) + "\n")
    return model_dir


def _sentences(folder: Path) -> str:
    return str(folder.parent / "sentences.txt")


def _hidden(model: Any, batch: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_sentences_are_read_one_a_line_and_batched_with_padding(folder: Path) -> None:
    sentences = read_sentences(_sentences(folder))
    assert len(sentences) == 24 and all(sentence == sentence.strip() and sentence for sentence in sentences)
    batches = calibration_batches(tokenizer_of(folder), sentences, max_length=8, batch_size=5)
    assert [int(batch["input_ids"].shape[0]) for batch in batches] == [5, 5, 5, 5, 4]
    assert all(int(batch["input_ids"].shape[1]) <= 8 for batch in batches)
    assert any(int(batch["attention_mask"].min()) == 0 for batch in batches)  # padded


def test_decompose_a_folder_with_calibration_text(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["decompose", str(folder), "-o", str(out), "--calib-text", _sentences(folder), "--batch-size", "5",
                 "--max-length", "16", "--divisor", "8", "--ratio", "0.5"]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    assert {"config.json", "decompose_config.json", "decomposed.safetensors", "report.json", "tokenizer.json",
            "tokenizer_config.json"} <= {path.name for path in out.iterdir()}
    # the same decomposition in Python, on the same padded batches
    tokenizer = tokenizer_of(folder)
    batches = calibration_batches(tokenizer, read_sentences(_sentences(folder)), 16, 5)
    decomposer = Decompose(load_pretrained(folder)).from_ratio(0.5, divisor=8)
    expected = decomposer.decompose_network(datasets=batches)
    loaded = load_decomposed(out)
    for batch in batches:
        assert float((_hidden(loaded, batch) - _hidden(expected, batch)).abs().max()) <= 1e-6
    assert json.loads((out / "decompose_config.json").read_text()) == decomposer.decompose_config
    report = json.loads((out / "report.json").read_text())
    assert report["tool"] == "lowrank-ir" and report["version"] == __import__("lowrank_ir").__version__
    created = datetime.datetime.fromisoformat(report["created"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600
    assert report["policy"] == {"kind": "ratio", "value": 0.5, "divisor": 8, "excludes": None,
                                "calib_text": _sentences(folder), "max_length": 16, "batch_size": 5}
    assert report["data_aware"] is True and report["totals"] == decomposer.report.totals()
    spectra = report["spectra"]
    assert set(spectra) == set(decomposer.decompose_config)
    query = spectra["encoder.layer.0.attention.self.query"]
    assert query["whitened"] and query["values"][0] == 1.0 and query["rank"] == 16 and query["count"] == 64
    assert query["values"] == sorted(query["values"], reverse=True) and 0 < query["kept_energy"] <= 1
    assert not spectra["embeddings.word_embeddings"]["whitened"]  # an embedding's spectrum is its weight's


def test_padding_is_left_out_so_batch_size_does_not_change_the_result(folder: Path, tmp_path: Path, capsys) -> None:
    """Padded batches of 6 decompose as one sentence per batch does; with --count-padding they do not.

    (Not to the last bit: float32 activations of a padded batch differ in the last digits, and this
    random model's tiny errors are sensitive to them; the padding's own effect is several times larger.)
    """
    models, errors = [], []
    for extra in (["--batch-size", "1"], ["--batch-size", "6"], ["--batch-size", "6", "--count-padding"]):
        out = tmp_path / f"out{len(models)}"
        assert main(["decompose", str(folder), "-o", str(out), "--calib-text", _sentences(folder), "--divisor", "8",
                     *extra]) == 0
        models.append(load_decomposed(out))
        report = json.loads((out / "report.json").read_text())
        errors.append({layer["name"]: layer["error"] for layer in report["layers"] if layer["form"]})
    capsys.readouterr()
    last = "encoder.layer.1.output.dense"
    assert errors[1][last] == pytest.approx(errors[0][last], rel=0.05)
    assert errors[2][last] > 2 * errors[0][last]
    batch = calibration_batches(tokenizer_of(folder), read_sentences(_sentences(folder)), 16, 24)[0]
    one, padded, counted = (_hidden(model, batch) for model in models)
    assert float((padded - one).norm()) < 0.25 * float((counted - one).norm())


def test_inspect_a_folder(folder: Path, capsys) -> None:
    assert main(["inspect", str(folder), "--divisor", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = Decompose(load_pretrained(folder)).from_ratio(0.5, divisor=8).report.to_dict()
    assert printed == json.loads(json.dumps(expected))
    assert main(["inspect", str(folder), "--divisor", "8", "--budget-params", "0.5", "--calib-text",
                 _sentences(folder), "--batch-size", "8"]) == 0
    assert "TOTAL" in capsys.readouterr().out


def test_a_folder_is_streamed_without_calibration_and_loaded_in_memory_on_request(folder: Path, tmp_path: Path,
                                                                                   capsys) -> None:
    streamed, in_memory = tmp_path / "streamed", tmp_path / "memory"
    assert main(["decompose", str(folder), "-o", str(streamed), "--divisor", "8"]) == 0
    names = {path.name for path in streamed.iterdir()}
    assert "model.safetensors" in names and "decomposed.safetensors" not in names  # the input's layout
    assert main(["decompose", str(folder), "-o", str(in_memory), "--divisor", "8", "--in-memory"]) == 0
    capsys.readouterr()
    loaded = load_decomposed(in_memory)
    expected = Decompose(load_pretrained(folder)).from_ratio(0.5, divisor=8).decompose_network()
    batch = calibration_batches(tokenizer_of(folder), read_sentences(_sentences(folder))[:4], 16, 4)[0]
    assert float((_hidden(loaded, batch) - _hidden(expected, batch)).abs().max()) <= 1e-6


def test_bad_input_is_one_line_and_nothing_is_written(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, no_tokenizer / name)
    sentences = _sentences(folder)
    cases = [
        (["decompose", str(folder), "-o", str(out), "--calib-text", str(tmp_path / "none.txt")], "does not exist"),
        (["decompose", str(folder), "-o", str(out), "--calib-text", str(empty)], "holds no sentence"),
        (["decompose", str(folder), "-o", str(out), "--calib-text", str(latin)], "is not UTF-8 text"),
        (["decompose", str(folder), "-o", str(out), "--max-length", "8"], "give --calib-text"),
        (["decompose", str(folder), "-o", str(out), "--calib-text", sentences, "--batch-size", "0"],
         "--batch-size must be at least 1"),
        (["decompose", str(no_tokenizer), "-o", str(out), "--calib-text", sentences], "holds none"),
        (["decompose", str(folder), "-o", str(folder / "inside"), "--calib-text", sentences], "must be outside"),
        (["decompose", "tests.models:resnet50", "-o", str(out), "--calib-text", sentences],
         "apply to Hugging Face model folders"),
        (["inspect", "tests.models:resnet50", "--calib-text", sentences], "apply to Hugging Face model folders"),
        (["decompose", str(folder), "-o", str(out), "--in-memory", "--nproc", "2"], "cannot be used with"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        one_line_error(capsys, message)
    assert not out.exists() and not (folder / "inside").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["decompose", str(folder), "-o", str(foreign), "--calib-text", sentences, "--force"]) == 2
    one_line_error(capsys, "did not write")
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_an_earlier_output_is_replaced_only_with_force(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["decompose", str(folder), "-o", str(out), "--in-memory", "--divisor", "8"]
    assert main(argv) == 0
    assert main([*argv, "--fixed", "8"]) == 2
    one_line_error(capsys, "--force")
    assert main([*argv, "--fixed", "8", "--force"]) == 0
    assert set(json.loads((out / "decompose_config.json").read_text()).values()) == {8}


# ------------------------------------------------------------------------------------ progress

def test_progress_bars_on_request_and_not_otherwise(folder: Path, tmp_path: Path, capsys) -> None:
    argv = ["decompose", str(folder), "--calib-text", _sentences(folder), "--batch-size", "6", "--divisor", "8"]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    assert "calibrating" not in capsys.readouterr().err  # stderr is not a terminal here
    assert main([*argv, "-o", str(tmp_path / "b"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "calibrating (batches)" in err and "4/4" in err
    assert "decomposing (layers)" in err and "15/15" in err
    assert "Loading weights" not in err  # transformers' own bar is not drawn


def test_the_library_reports_every_phase_to_one_callback(folder: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    model = load_pretrained(folder)
    batches = calibration_batches(tokenizer_of(folder), read_sentences(_sentences(folder)), 16, 6)
    decomposer = Decompose(model, progress=lambda phase, done, total, item: calls.append((phase, done, total)))
    decomposer.from_budget(params=0.5, divisor=8, datasets=batches)
    decomposer.decompose_network(datasets=batches)
    phases = [phase for phase, _, _ in calls]
    order = [phase for index, phase in enumerate(phases) if index == 0 or phases[index - 1] != phase]
    assert order == ["calibration", "sensitivity", "rewrite"]  # decompose_network reuses the statistics
    for phase, total in (("calibration", 4), ("sensitivity", len(decomposer.sensitivities)), ("rewrite", None)):
        counts = [(done, of) for name, done, of in calls if name == phase]
        assert [done for done, _ in counts] == list(range(1, len(counts) + 1))
        assert counts[-1][0] == counts[-1][1] == (total or len(decomposer.decompose_config))
    with pytest.raises(TypeError, match="progress must be a callable"):
        Decompose(model, progress="bars")


# ------------------------------------------------------------------------------------ the visual report

@pytest.fixture(scope="module")
def html_report(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``decompose --report report.html`` of the folder under a measured budget (sensitivities drawn)."""
    require("matplotlib")
    root = tmp_path_factory.mktemp("report")
    assert main(["decompose", str(folder), "-o", str(root / "out"), "--calib-text", _sentences(folder),
                 "--batch-size", "6", "--divisor", "8", "--budget-params", "0.5",
                 "--report", str(root / "report.html")]) == 0
    return root


def test_the_html_report_is_one_self_contained_page(html_report: Path, capsys) -> None:
    page = (html_report / "report.html").read_text()
    document = json.loads((html_report / "out" / "report.json").read_text())
    assert document["sensitivities"] and document["policy"]["kind"] == "budget_params"
    assert page.count('<img src="data:image/png;base64,') == 4  # totals, per layer, spectra, sensitivities
    assert "http://" not in page and "https://" not in page  # nothing fetched
    for name in document["decompose_config"]:
        assert name in page
    # the same document drawn again by `lowrank report` gives the same page
    again = html_report / "again.html"
    assert main(["report", str(html_report / "out" / "report.json"), "-o", str(again)]) == 0
    assert again.read_text() == page
    assert main(["report", str(html_report / "out" / "report.json"), "-o", str(again)]) == 2
    one_line_error(capsys, "--force")


def test_report_command_bad_input(tmp_path: Path, capsys) -> None:
    (tmp_path / "no_layers.json").write_text('{"totals": {}}')
    (tmp_path / "list.json").write_text("[1, 2]")
    cases = [([str(tmp_path / "none.json"), "-o", str(tmp_path / "r.html")], "does not exist"),
             ([str(tmp_path / "no_layers.json"), "-o", str(tmp_path / "r.txt")], "ending in .html"),
             ([str(tmp_path / "no_layers.json"), "-o", str(tmp_path / "r.html")], "no list of layers"),
             ([str(tmp_path / "list.json"), "-o", str(tmp_path / "r.html")], "list.json")]
    for argv, message in cases:
        assert main(["report", *argv]) == 2
        one_line_error(capsys, message)
    assert not (tmp_path / "r.html").exists()


PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.title = "probe:" + JSON.stringify(images.map(image => [image.complete, image.naturalWidth,
                                                                   image.naturalHeight]));
});
</script>"""


def _chromium() -> str:
    found = chromium()
    if found is None:
        pytest.skip(NO_BROWSER)
    return found


def test_the_html_report_in_a_headless_browser(html_report: Path, tmp_path: Path) -> None:
    import re

    import numpy as np
    from PIL import Image

    browser = _chromium()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    probed = tmp_path / "probed.html"
    probed.write_text((html_report / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    images = json.loads(re.search(r"<title>probe:(.*?)</title>", dom).group(1))
    assert len(images) == 4
    assert all(complete and width > 100 and height > 50 for complete, width, height in images), images
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2400", (html_report / "report.html").as_uri()],
                   capture_output=True, check=True, timeout=300)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    assert (pixels < 250).any(axis=2).mean() > 0.02  # drawn, not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # plots and text, not a flat colour
