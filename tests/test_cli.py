import subprocess
import sys

import pytest

from ctperf.cli import build_parser, main

HEAVY = ("torch", "matplotlib", "SimpleITK", "pydicom", "nibabel", "scipy")


def test_help_imports_no_heavy_library():
    # --help must be instant: building the parser may not import the scientific stack.
    code = ("import sys; from ctperf.cli import build_parser; build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_subcommand_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name in sub.choices:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: ctperf " + name in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """``ctperf info STUDY | head -1``: the reader leaves early; no traceback follows."""
    import nibabel as nib
    import numpy as np

    data = np.full((8, 8, 2, 5), -1000.0, np.float32)
    data[2:6, 2:6] = 30.0
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((1, 1, 1, 1.0))
    nib.save(img, tmp_path / "s.nii.gz")
    proc = subprocess.Popen([sys.executable, "-m", "ctperf", "info", str(tmp_path / "s.nii.gz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                                  # before ctperf has printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_scheduler_without_a_cohort_is_refused(tmp_path, capsys):
    """--scheduler runs a cohort's studies; with one study it had been ignored in silence."""
    study = tmp_path / "study.nii.gz"
    study.write_bytes(b"never read")
    assert main(["maps", str(study), str(tmp_path / "out"), "--scheduler",
                 "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler runs a cohort's studies" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_memory_running_out_is_one_line(tmp_path, capsys, monkeypatch):
    """Sizes too large for the machine end in one line, exit 2 (NumPy's MemoryError, PyTorch's
    CPU allocator's RuntimeError), not a traceback; other RuntimeErrors still raise."""
    from ctperf.commands import info

    study = tmp_path / "study.nii.gz"
    study.write_bytes(b"never read")
    for error in (MemoryError("Unable to allocate 4.37 TiB for an array"),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 3520000000000 bytes")):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(info, "run", fail)
        assert main(["info", str(study)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ctperf info: error: out of memory (") and err.count("\n") == 1

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", str(study)])


def test_the_neural_demo_refuses_the_model_based_demos_options(tmp_path, capsys):
    """--size, --method, --motion (and --overwrite) had been ignored by --neural in silence;
    refused in one line, nothing written."""
    out = tmp_path / "neural"
    assert main(["demo", str(out), "--neural", "--size", "128", "--method", "bsvd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--size, --method do not apply to --neural" in err[0]
    assert not out.exists()
