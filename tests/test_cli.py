"""The `rstar` command dispatches without importing heavy dependencies."""

from __future__ import annotations

import subprocess
import sys

from rstar.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand():
    from rstar.cli import build_parser

    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in text


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    assert "SUBCOMMAND" in capsys.readouterr().out


def test_import_rstar_is_light():
    code = (
        "import sys, rstar, rstar.cli, rstar.config\n"
        "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
