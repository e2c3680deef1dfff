"""The command line: help texts, the model table (and the README's copy of it), convert, errors."""

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqvision
from seqvision.checkpoint_meta import read_checkpoint
from seqvision.cli import COMMANDS, get_parser, main
from seqvision.commands.common import (
    image_size,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    positive_int_list,
)
from seqvision.commands.models import models_table
from seqvision.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys):
    parser, _ = get_parser(command)
    text = parser.format_help()
    assert parser.description and "example" in text.lower()
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_documented_examples_parse(command):
    # Every `seqvision <command> ...` line of its --help and of the README parses (optional parts written
    # as "[--json]" dropped); the train examples are also resolved into configs in test_train.
    parser, _ = get_parser(command)
    text = parser.format_help() + "\n" + (ROOT / "README.md").read_text()
    pattern = rf"^\s*(?:torchrun .*?-m )?seqvision {re.escape(command)}(?=\s|$)(.*?)(?:\s+#.*)?$"
    lines = [line for line in re.findall(pattern, text, re.M) if not line.strip().startswith("/")]
    assert lines, f"no example of seqvision {command}"
    for line in lines:
        parser.parse_args(shlex.split(re.sub(r"\s\[--[^\]]*\]", "", line).replace("\\", "")))


def test_main_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_readme_model_table_is_current():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- models-table:start -->\n(.*?)\n<!-- models-table:end -->", readme, re.S)
    assert block, "README lost its model table markers"
    assert block.group(1).strip() == models_table(flops=True).strip()


def test_models_command(capsys):
    assert main(["models", "sequencer2d_[sm]", "--flops"]) == 0
    out = capsys.readouterr().out
    assert "| sequencer2d_s | 27,651,688 | 8.33 | 4.94 |" in out
    assert "| sequencer2d_m | 38,307,688 | 11.05 | 6.52 |" in out
    assert main(["models", "nothing*"]) == 2


def test_info_command(capsys):
    assert main(["info", "sequencer2d_l_392"]) == 0
    out = capsys.readouterr().out
    assert "54,298,216" in out and "50.49 G with LSTMs" in out and "56x56x192" in out and "crop_pct 1.0" in out


def test_unknown_model_is_one_line_error(capsys):
    assert main(["info", "sequencer3d"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqvision info: error: unknown model 'sequencer3d'") and "\n" not in err


def test_convert_command(tmp_path, capsys):
    model = seqvision.create_model("sequencer2d_s", num_classes=10)
    src = tmp_path / "a.safetensors"
    save_weights(model, src)
    assert main(["convert", str(src), str(tmp_path / "b.pth"), "--to", "authors"]) == 0
    assert "sequencer2d_s" in capsys.readouterr().out
    sd, _ = read_checkpoint(tmp_path / "b.pth")
    assert torch.equal(sd["blocks.0.4.down.weight"], model.stages[1].downsample.down.weight)
    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "c.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_number_argument_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    assert positive_float("0.5") == 0.5 and non_negative_float("0") == 0.0
    assert positive_int_list("1, 8,32,") == [1, 8, 32]
    assert image_size("4096") == 4096
    bad = [
        (image_size, "0"), (image_size, "100000"), (positive_float, "inf"),
        (positive_int, "0"), (positive_int, "-2"), (positive_int, "1.5"), (positive_int, "x"),
        (non_negative_int, "-1"), (positive_float, "0"), (positive_float, "nan"), (non_negative_float, "-0.1"),
        (positive_int_list, "1,0"), (positive_int_list, ","), (positive_int_list, "8,x"),
    ]  # fmt: skip
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(text)


# Zero or negative counts used to reach torch or the DataLoader and come back as a traceback (or, for --topk 0
# and demo --epochs 0, to be ignored); now every command refuses them while parsing, in one line.
@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--batch", "0"],
        ["bench", "--batch", "1,x"],
        ["bench", "--iters", "0"],
        ["bench", "--threads", "-1"],
        ["predict", "a.png", "--topk", "0"],
        ["predict", "a.png", "--batch-size", "0"],
        ["validate", "--data-dir", "digits", "--batch-size", "0"],
        ["validate", "--data-dir", "digits", "--workers", "-1"],
        ["validate", "--data-dir", "digits", "--crop-pct", "0"],
        ["adversarial", "--data-dir", "digits", "--eps", "-1"],
        ["adversarial", "--data-dir", "digits", "--steps", "0"],
        ["resolution-sweep", "--data-dir", "digits", "--scales", "0.5", "-1"],
        ["erf", "--data-dir", "digits", "--max-images", "0"],
        ["export", "m.onnx", "--format", "onnx", "--img-size", "0"],
        ["validate", "--data-dir", "digits", "--img-size", "100000"],
        ["erf", "--data-dir", "digits", "--img-size", "100000"],
        ["demo", "--epochs", "0"],
        ["models", "--img-size", "-224"],
    ],
)
def test_bad_numbers_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    assert err[-1].startswith(f"seqvision {argv[0]}: error: argument {flag}: must be "), err
    assert "Traceback" not in "\n".join(err)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "seqvision", "models"], capture_output=True, text=True, check=True)
    assert "v_sequencer_s_pe" in out.stdout
