"""The robust-sft command line: the fast paths import no torch, errors are one line with exit code 1 or 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from robust_sft.cli import build_parser, main


def test_env_json(capsys, embedded_home):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packages"]["trl"].startswith("1.")
    assert report["device"] in ("cpu", "cuda")
    assert report["embedded_model"] == "SmolLM2-135M-Instruct"
    assert report["embedded_model_cache"].startswith(embedded_home)


def test_env_text(capsys):
    assert main(["env"]) == 0
    assert "transformers" in capsys.readouterr().out


def test_env_torch_agrees_with_nvidia_smi(capsys):
    import torch

    assert main(["env", "--json", "--torch"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device_source"] == "torch" and report["cpu_threads"] == torch.get_num_threads()
    assert main(["env", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert len(fast["cuda_devices"]) == torch.cuda.device_count()


def _console_script() -> str:
    # The script sits next to the interpreter of the environment the package is installed in.
    beside = os.path.join(os.path.dirname(sys.executable), "robust-sft")
    executable = beside if os.path.isfile(beside) else shutil.which("robust-sft")
    assert executable, "the robust-sft console script is not installed (pip install -e .)"
    return executable


def test_console_script_is_installed():
    result = subprocess.run([_console_script(), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("train", "demo", "env", "realign", "eval"))


# Runs in a fresh interpreter: the test process itself has torch loaded already.
NO_TORCH = """
import contextlib, io, sys
from robust_sft.cli import main
assert "torch" not in sys.modules, "import robust_sft.cli"
for argv in (["--help"], ["train", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 0, (argv, stop.code)
    assert "torch" not in sys.modules, argv
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["env", "--json"]) == 0
print(sorted(name for name in ("torch", "transformers", "trl", "datasets", "peft") if name in sys.modules))
"""


def test_help_and_env_import_no_torch():
    result = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"  # nor transformers, trl, datasets or peft


def test_train_lists_the_registered_methods(capsys):
    from robust_sft.methods import METHODS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    listing = capsys.readouterr().out
    for name, method in METHODS.items():
        assert (f"    {name} " in listing) == method.trainable_from_cli, name


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    for argv in (["nope"], ["env", "--bogus"], ["train"], ["train", "realign", "--bogus", "8"]):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(argv) if argv[0] == "nope" else main(argv)
        assert stop.value.code == 2, argv
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "error:" in error, (argv, error)


def test_usage_error_found_after_parsing_is_exit_code_2(capsys):
    assert main(["eval", "--task", "piqa"]) == 2
    assert capsys.readouterr().err.startswith("robust-sft: error: --task piqa needs --data")
    for command in (["train", "realign"], ["realign"]):  # `robust-sft realign` is an alias
        assert main([*command, "--dataset_name", "p.jsonl", "--output_dir", "out"]) == 2
        assert capsys.readouterr().err == (
            "robust-sft: error: Give exactly one of --finetuned_model (full mode) or --finetuned_adapter "
            "(LoRA mode).\n"
        )


def test_data_error_is_one_line_with_exit_code_1_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    argv = ["train", "sft", "--output_dir", str(tmp_path / "out"), "--dataset_name", missing]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"robust-sft: error: Data file {missing} does not exist.\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", *argv])


def test_bad_rows_and_output_dir_are_reported_before_the_model_loads(tmp_path, capsys):
    # The model folder does not exist: an error about it (or a "Loading weights" bar) would mean it was loaded first.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2+2?", "answer": "4"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "2+2?", "completion": "4"}\n')
    no_model = ["--model_name_or_path", str(tmp_path / "no-model")]
    assert main(["train", "sft", "--output_dir", str(tmp_path / "out"), "--dataset_name", str(bad), *no_model]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("robust-sft: error: ") and "question" in error, error
    (tmp_path / "file").write_text("")
    assert main(["train", "sft", "--output_dir", str(tmp_path / "file"), "--dataset_name", str(good), *no_model]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a file, not a folder" in error, error


def test_exit_codes_of_the_console_script(tmp_path):
    unknown = subprocess.run([_console_script(), "env", "--bogus"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    missing = [_console_script(), "build-cache", "--queries", str(tmp_path / "q.jsonl"), "--output", "x.jsonl"]
    error = subprocess.run(missing, capture_output=True, text=True, timeout=300)
    assert error.returncode == 1
    assert error.stderr.splitlines()[-1] == f"robust-sft: error: Data file {tmp_path / 'q.jsonl'} does not exist."


def test_debug_before_the_sub_command_is_ours_after_it_the_sub_command_s(tmp_path, capsys):
    from robust_sft.cli.train import parse_args

    missing = str(tmp_path / "missing.jsonl")
    argv = ["train", "sft", "--output_dir", str(tmp_path / "out"), "--dataset_name", missing]
    # After the sub-command, `--debug` is TrainingArguments' option: passed through, the error stays one line.
    assert main([*argv, "--debug", "underflow_overflow"]) == 1
    assert capsys.readouterr().err == f"robust-sft: error: Data file {missing} does not exist.\n"
    training_args = parse_args("sft", argv[2:] + ["--debug", "underflow_overflow"])[1]
    assert [option.value for option in training_args.debug] == ["underflow_overflow"]
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])


def test_method_help_names_the_docs_page_in_the_repository(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "taia", "--help"])
    assert stop.value.code == 0
    assert "docs/trainers/taia.md in the docs/ folder of the robust_sft repository" in " ".join(
        capsys.readouterr().out.split()
    )
