"""Every script reads its options the same way (runtime.ArgumentParser): spelled as the config key
they mean, the dashed spelling of earlier versions still read (hidden from --help), renamed options
under their earlier names too; and a mistake is one line with exit code 2."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime import ArgumentParser, run_cli


def parser():
    p = ArgumentParser(prog="x")
    p.add_argument("--batch_size", type=int, default=1, help="windows per batch")
    p.add_argument("--kron_factors", type=int, default=1, help="k")
    p.add_renamed("--factors", "kron_factors", type=int)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("plan").add_argument("--kron_shape", type=int, nargs=2)
    return p


def test_config_key_spelling_dashed_spelling_and_earlier_names_are_one_option():
    p = parser()
    for argv in (["--batch_size", "3"], ["--batch-size", "3"], ["--batch-size=3"], ["--batch_size=3"]):
        assert p.parse_args(argv).batch_size == 3
    assert p.parse_args(["--factors", "4"]).kron_factors == 4 == p.parse_args(["--kron_factors", "4"]).kron_factors
    assert p.parse_args(["plan", "--kron-shape", "2", "3"]).kron_shape == [2, 3]        # in a sub-command too
    assert p.parse_args([]).kron_factors == 1                                          # the default is the key's
    help_text = p.format_help()
    assert "--batch_size" in help_text and "--batch-size" not in help_text and "--factors" not in help_text


def test_an_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--batch-sizes=3"])
    assert e.value.code == 2 and "unrecognized arguments: --batch-sizes" in capsys.readouterr().err


def test_run_cli_turns_a_mistake_into_one_line(capsys):
    def main():
        raise ValueError("--kron_factors must be a positive integer,\n  got 0")
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --kron_factors must be a positive integer, got 0\n"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sizes.py plan", "sizes.py plan-rank", "sizes.py count", "compare_init.py",
                                     "eval_ppl.py", "sample.py", "export_hf.py", "prepare_owt.py", "bench.py"])
def test_every_option_of_every_script_is_spelled_as_a_key_and_explained(command):
    out = subprocess.run([sys.executable, *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    options = [w.strip(",[]") for w in out.split() if w.lstrip("[").startswith("--") and w.strip(",[]") != "--help"]
    assert options, out
    assert not [o for o in options if "-" in o[2:].split("=")[0]], f"{command}: dashed options in --help"
    # every option has a line of help: the text after the option's own line is not empty
    lines = out.splitlines()
    entries = [i for i, line in enumerate(lines) if re.match(r"  --\w", line) and not line.startswith("  --help")]
    assert entries, out
    for i in entries:              # argparse puts the help on the option's line or indents it on the next
        on_line = len(lines[i].strip().split("  ", 1)) == 2
        below = i + 1 < len(lines) and re.match(r" {20,}\S", lines[i + 1])
        assert on_line or below, f"{command}: {lines[i].strip()} has no help text"
