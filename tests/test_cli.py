"""`mhc-compile` as a user runs it."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from mhc_compile import cli


def test_report_example_gpt_prints_the_table(capsys, tmp_path):
    assert cli.main(["report", "--example", "gpt", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "blocks rewritten" in out and "blocks.0" in out and "rewritten" in out
    blocks = json.loads((tmp_path / "r.json").read_text())["blocks"]
    assert len(blocks) == 8 and {b["status"] for b in blocks} == {"rewritten"}


def test_report_counts_the_bytes_of_the_chosen_stream_dtype(tmp_path):
    """--stream-dtype bfloat16 on the float32 example: 2-byte stream elements in the estimate."""
    from hand_mhc import fused_forward_bytes

    for flags, element_bytes in (([], 4), (["--stream-dtype", "bfloat16"], 2)):
        path = tmp_path / f"{element_bytes}.json"
        assert cli.main(["report", "--example", "gpt", "--json", str(path), *flags]) == 0
        blocks = json.loads(path.read_text())["blocks"]
        assert blocks and all(
            b["extra_bytes_per_token"] == fused_forward_bytes(4, b["shape"][-1], element_bytes)
            for b in blocks
        )


def test_report_file_factory(tmp_path, capsys):
    target = tmp_path / "mymodel.py"
    target.write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 6)

            def forward(self, x):
                return x + self.fc(x)

        def build():
            return Net(), (torch.randn(2, 6),)
    '''))
    assert cli.main(["report", f"{target}:build", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "mHC n=2 (sinkhorn): 1 block rewritten in 1 chain" in out


def test_bad_targets_and_options_are_clear_errors(tmp_path, capsys):
    assert cli.main(["report", "no_such_module_xyz:build"]) == 2
    assert "cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing.py") + ":build"]) == 2
    assert "no such file" in capsys.readouterr().err
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def build():\n    return 3\n")
    assert cli.main(["report", f"{wrong}:build"]) == 2
    assert "must return (model, example_args), got int" in capsys.readouterr().err
    assert cli.main(["report", f"{wrong}:missing"]) == 2
    assert "has no callable named 'missing'" in capsys.readouterr().err
    assert cli.main(["report", "nocolon"]) == 2
    assert "TARGET must look like" in capsys.readouterr().err
    assert cli.main(["report", "--example", "gpt", "--n", "0"]) == 2
    assert "mhc option n must be >= 1, got 0" in capsys.readouterr().err


def test_console_script_is_installed():
    """The `mhc-compile` script pip installed beside this interpreter (pyproject's
    [project.scripts]), not the module run through python -m."""
    script = Path(sys.executable).parent / "mhc-compile"
    assert script.is_file(), f"no console script at {script}: install the package (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "report" in result.stdout and "train" in result.stdout


def test_autotune_without_cuda_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["autotune", "--C", "1024"]) == 2
    triton = "installed" if importlib.util.find_spec("triton") else "missing"
    assert capsys.readouterr().err == (
        "mhc-compile: error: autotune needs a CUDA GPU and Triton: kernels are tuned by timing them "
        f"on the GPU they will run on (torch.cuda.is_available() is False, Triton {triton})\n"
    )
