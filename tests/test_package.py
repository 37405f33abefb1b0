"""The public API: `robust_sft.__all__` is the registry's classes plus the lazy helpers, and every name imports."""

import re
import subprocess
import sys
from pathlib import Path

import robust_sft
from robust_sft.methods import METHODS

README = Path(__file__).resolve().parent.parent / "README.md"
# Public names that are not in a method's entry: the registry itself and the version.
REGISTRY_NAMES = {"METHODS", "get_method", "register_method", "__version__"}


def test_every_public_name_imports():
    # In a fresh interpreter, so that no earlier test has imported the submodules: `from robust_sft import name` for
    # every name of `__all__` (an entry without a module behind it fails here), then the star import binds them all.
    code = (
        "import robust_sft\n"
        "failed = []\n"
        "for name in robust_sft.__all__:\n"
        "    try:\n"
        "        exec(f'from robust_sft import {name}')\n"
        "    except Exception as error:\n"
        "        failed.append(f'{name}: {type(error).__name__}: {error}')\n"
        "namespace = {}\n"
        "exec('from robust_sft import *', namespace)\n"
        "failed += [f'{name}: not bound by the star import' for name in robust_sft.__all__ if name not in namespace]\n"
        "print(failed)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]
    for name in robust_sft.__all__:
        assert getattr(robust_sft, name) is not None, name


def test_all_is_the_registry_plus_the_lazy_names():
    classes = {name for method in METHODS.values() for name in method.class_names}
    assert set(robust_sft.__all__) == classes | set(robust_sft._LAZY) | REGISTRY_NAMES
    assert len(robust_sft.__all__) == len(set(robust_sft.__all__))


def test_registry_classes_are_the_classes_their_entries_name():
    for method in METHODS.values():
        trainer, config = method.trainer_class(), method.config_class()
        assert getattr(robust_sft, trainer.__name__) is trainer and getattr(robust_sft, config.__name__) is config
        for alias, target in method.aliases.items():  # documented aliases: the same class, not a copy
            assert getattr(robust_sft, alias) is getattr(robust_sft, target)
        if method.paper is not None:  # the model card's paper comes from the registry
            assert trainer._paper == method.paper.as_trl_paper()
            assert trainer._paper["title"] == method.paper.title
        assert set(method.tags) <= set(trainer._tag_names)


def test_every_trainer_and_config_named_in_the_readme_imports():
    import peft
    import trl

    names = set(re.findall(r"\b([A-Z][A-Za-z]*(?:Trainer|Config))\b", README.read_text()))
    names = {name for name in names if not hasattr(trl, name) and not hasattr(peft, name)}  # TRL's and PEFT's own
    assert {"ANITTrainer", "DELIATrainer", "TAIATrainer"} <= names
    missing = [name for name in sorted(names) if not hasattr(robust_sft, name)]
    assert not missing, f"README.md names {missing}, which robust_sft does not export"


def test_import_robust_sft_imports_no_torch():
    code = "import sys, robust_sft; robust_sft.METHODS; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
