"""The robust-sft command line."""

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


def test_console_script_is_installed():
    # The script sits next to the interpreter of the environment the package is installed in.
    beside = os.path.join(os.path.dirname(sys.executable), "robust-sft")
    executable = beside if os.path.isfile(beside) else shutil.which("robust-sft")
    assert executable, "the robust-sft console script is not installed (pip install -e .)"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "demo" in result.stdout and "env" in result.stdout


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])
