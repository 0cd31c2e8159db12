"""Outputs never destroy data ctperf did not make: checks before a run, markers, temporaries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctperf.cli import main
from ctperf.errors import InputError
from ctperf.io import atomic_dir, atomic_file, check_output, write_series_nifti
from ctperf.io.atomic import MARKER, STALE_AFTER_S, TEMP_PREFIX, remove_stale_temporaries
from dicom_factory import write_fake_study


def _tree(folder):
    """Every file under ``folder`` with its bytes (to show that nothing changed)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def dicom_study(tmp_path, rng):
    """A patient folder ``P`` holding ``P/dicom`` (a tiny DICOM study) and a note."""
    patient = tmp_path / "P"
    study = write_fake_study(patient / "dicom", rng, n_frames=5, n_slices=3, nested=False)
    (patient / "report.txt").write_text("radiology report")
    return patient, study.folder


@pytest.fixture
def nifti_study(tmp_path, small_series):
    return write_series_nifti(small_series, tmp_path / "in" / "study.nii.gz")


# --- the output is, holds or lies inside an input ----------------------------------------------

def test_maps_out_equal_to_the_input_folder_is_refused(dicom_study, capsys):
    patient, dicom = dicom_study
    before = _tree(patient)
    assert main(["maps", str(dicom), str(dicom)]) == 2
    _one_error_line(capsys, str(dicom), "is the input")
    assert _tree(patient) == before  # the study is untouched


@pytest.mark.parametrize("argv", [
    ["maps", "{d}", "{d}"], ["preprocess", "{d}", "{d}"], ["convert", "{d}", "{d}"],
    ["predict", "{d}", "{d}", "--model", "{p}/m.pt"], ["train", "{d}", "{d}"],
    ["cv", "{d}", "{d}"], ["maps", "{d}", "{p}"], ["predict", "{d}", "{p}/out", "--model",
                                                 "{p}/out/m.pt", "--overwrite"]],
    ids=lambda argv: " ".join(argv[:1] + [a.replace("{d}", "D").replace("{p}", "P")
                                          for a in argv[1:]]))
def test_every_command_refuses_to_write_over_its_inputs(dicom_study, capsys, argv):
    patient, dicom = dicom_study
    (patient / "out").mkdir()
    (patient / "out" / "m.pt").write_bytes(b"weights")
    before = _tree(patient)
    argv = [a.replace("{d}", str(dicom)).replace("{p}", str(patient)) for a in argv]
    assert main(argv) == 2
    _one_error_line(capsys, "input")
    assert _tree(patient) == before


def test_convert_out_holding_the_input_is_refused_even_with_overwrite(dicom_study, capsys):
    patient, dicom = dicom_study
    before = _tree(patient)
    assert main(["convert", str(dicom), str(patient), "--overwrite"]) == 2
    _one_error_line(capsys, str(patient), "contains the input")
    assert _tree(patient) == before


def test_out_inside_the_input_is_refused(dicom_study, capsys):
    _, dicom = dicom_study
    assert main(["preprocess", str(dicom), str(dicom / "pre")]) == 2
    _one_error_line(capsys, "lies inside the input")
    assert not (dicom / "pre").exists()


def test_out_holding_a_mask_input_is_refused(nifti_study, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "aif.nii.gz").write_bytes(b"mask")
    assert main(["maps", str(nifti_study), str(out), "--aif-mask", str(out / "aif.nii.gz"),
                 "--overwrite"]) == 2
    _one_error_line(capsys, "contains the input")
    assert (out / "aif.nii.gz").read_bytes() == b"mask"


def test_symlinked_out_pointing_at_the_input_is_refused(dicom_study, tmp_path, capsys):
    patient, dicom = dicom_study
    link = tmp_path / "link"
    link.symlink_to(dicom, target_is_directory=True)
    before = _tree(patient)
    assert main(["maps", str(dicom), str(link), "--overwrite"]) == 2
    _one_error_line(capsys, "is the input")
    assert _tree(patient) == before


def test_nifti_out_whose_sidecar_is_the_inputs_is_refused(tmp_path, small_series, capsys):
    src = write_series_nifti(small_series, tmp_path / "s.nii")
    before = (tmp_path / "s.json").read_bytes()
    assert main(["convert", str(src), str(tmp_path / "s.nii.gz")]) == 2
    _one_error_line(capsys, "s.json", "is the input")
    assert (tmp_path / "s.json").read_bytes() == before
    assert not (tmp_path / "s.nii.gz").exists()


# --- files, folders, cwd, root, parents --------------------------------------------------------

def test_out_that_is_a_file_is_refused_and_kept(nifti_study, tmp_path, capsys):
    f = tmp_path / "F"
    f.write_text("keep me")
    assert main(["maps", str(nifti_study), str(f)]) == 2
    _one_error_line(capsys, "is a file")
    assert f.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F", "in"]  # no .F.old


@pytest.mark.parametrize("command, name", [("convert", "x.nrrd"), ("convert", "x.nii.gzz"),
                                           ("convert", "x.mgz"), ("maps", "cbf.nii.gz"),
                                           ("preprocess", "noise.nii.gz")])
def test_a_folder_output_named_like_a_file_is_refused(nifti_study, tmp_path, capsys, command,
                                                      name):
    """`convert x.nrrd` wrote a DICOM folder named x.nrrd (a format ctperf does not write, or a
    typo of .nii.gz), exit 0; maps and preprocess made folders named like NIfTI files."""
    assert main([command, str(nifti_study), str(tmp_path / name)]) == 2
    _one_error_line(capsys, name, "ends like a file")
    assert not (tmp_path / name).exists()


def test_nifti_out_that_is_a_folder_is_refused(dicom_study, tmp_path, capsys):
    _, dicom = dicom_study
    (tmp_path / "x.nii.gz").mkdir()
    assert main(["convert", str(dicom), str(tmp_path / "x.nii.gz")]) == 2
    _one_error_line(capsys, "is a folder")


def test_existing_nifti_file_needs_overwrite(dicom_study, tmp_path, capsys):
    _, dicom = dicom_study
    nii = tmp_path / "study.nii.gz"
    nii.write_bytes(b"someone else's file")
    assert main(["convert", str(dicom), str(nii)]) == 2
    _one_error_line(capsys, "exists", "--overwrite")
    assert nii.read_bytes() == b"someone else's file"
    assert main(["convert", str(dicom), str(nii), "--overwrite"]) == 0
    assert nii.read_bytes()[:2] == b"\x1f\x8b"  # now a gzip NIfTI


def test_current_folder_and_root_are_refused(nifti_study, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("x")
    monkeypatch.chdir(work)
    assert main(["maps", str(nifti_study), ".", "--overwrite"]) == 2
    _one_error_line(capsys, "current folder")
    assert main(["maps", str(nifti_study), "..", "--overwrite"]) == 2  # holds the cwd
    _one_error_line(capsys, "current folder")
    assert main(["preprocess", str(nifti_study), "/", "--overwrite"]) == 2
    _one_error_line(capsys, "filesystem root")
    assert (work / "mine.txt").read_text() == "x"


def test_parent_that_is_a_file_is_refused(nifti_study, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["maps", str(nifti_study), str(tmp_path / "f" / "out")]) == 2
    _one_error_line(capsys, "cannot be created")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs a user without write permission (root writes anywhere)")
def test_unwritable_parent_is_refused(nifti_study, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["maps", str(nifti_study), str(locked / "out")]) == 2
        _one_error_line(capsys, "no write permission")
    finally:
        locked.chmod(0o755)


# --- foreign folders, --overwrite, ctperf's own outputs ----------------------------------------

def test_foreign_folder_is_refused_and_untouched(nifti_study, tmp_path, capsys):
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "data.csv").write_text("1,2")
    before = _tree(out)
    for argv in (["maps", str(nifti_study), str(out)],
                 ["preprocess", str(nifti_study), str(out)],
                 ["convert", str(nifti_study), str(out)]):
        assert main(argv) == 2
        _one_error_line(capsys, str(out), "did not write", "--overwrite")
        assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "results"]  # no temporaries


def test_overwrite_replaces_a_foreign_folder(nifti_study, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(["convert", str(nifti_study), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    assert len(list(out.glob("*.dcm"))) == 12 * 3 and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "results"]


def test_previous_ctperf_output_is_replaced_without_overwrite(nifti_study, tmp_path):
    out = tmp_path / "pre"
    argv = ["preprocess", str(nifti_study), str(out), "--no-register", "--no-filter"]
    assert main(argv) == 0
    assert (out / MARKER).is_file()
    assert main(argv) == 0
    assert (out / "study.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "pre"]


def test_files_added_to_a_ctperf_output_are_not_deleted(nifti_study, tmp_path, capsys):
    out = tmp_path / "pre"
    argv = ["preprocess", str(nifti_study), str(out), "--no-register", "--no-filter"]
    assert main(argv) == 0
    (out / "notes.txt").write_text("the user's own notes")
    (out / "qc").mkdir(exist_ok=True)
    (out / "qc" / "edited.png").write_bytes(b"not ctperf's")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "did not write" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main([*argv, "--overwrite"]) == 0           # asked for: replaced
    assert not (out / "notes.txt").exists()


def test_another_commands_output_is_not_replaced(nifti_study, tmp_path, capsys):
    """`ctperf convert` into the folder `ctperf preprocess` wrote: refused (it would replace
    that output whole), unless --overwrite; the same command again replaces its own."""
    out = tmp_path / "pre"
    assert main(["preprocess", str(nifti_study), str(out), "--no-register", "--no-filter"]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["convert", str(nifti_study), str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds the output of `ctperf preprocess`" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["preprocess", str(nifti_study), str(out), "--no-register", "--no-filter"]) == 0
    assert main(["convert", str(nifti_study), str(out), "--overwrite"]) == 0


def test_an_output_without_an_inventory_is_replaced_only_when_asked(nifti_study, tmp_path,
                                                                    capsys):
    """A marker that lists nothing (an older version's output) cannot tell ctperf's files from
    a user's: the folder is replaced with --overwrite only."""
    out = tmp_path / "old"
    out.mkdir()
    (out / MARKER).write_text("This folder was written by ctperf.\n")
    (out / "cbf.nii.gz").write_bytes(b"an earlier ctperf's output")
    args = ["preprocess", str(nifti_study), str(out), "--no-register", "--no-filter"]
    assert main(args) == 2
    assert "no list of what ctperf wrote" in capsys.readouterr().err
    assert (out / "cbf.nii.gz").is_file()
    assert main([*args, "--overwrite"]) == 0
    assert (out / "study.nii.gz").is_file() and not (out / "cbf.nii.gz").exists()


def test_a_folder_written_file_by_file_is_never_replaced_whole(nifti_study, tmp_path, capsys):
    """A probe's training run, cohort or cohort of maps (marked by mark_output, no inventory)
    given as the output of a single-output command had been replaced whole, exit 0: model,
    checkpoints, a subject's study and truth, and a user's notes gone."""
    from ctperf.io.atomic import check_output, mark_output, set_writer

    run = tmp_path / "run"
    set_writer("ctperf train")
    try:
        mark_output(run)
    finally:
        set_writer(None)
    assert "# command: ctperf train" in (run / MARKER).read_text()
    for name in ("model.pt", "log.csv", "notes.txt"):
        (run / name).write_text(name)
    for command in (["maps", str(nifti_study), str(run)],
                    ["preprocess", str(nifti_study), str(run), "--no-register", "--no-filter"],
                    ["convert", str(nifti_study), str(run)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "holds the output of `ctperf train`" in err and err.count("\n") == 1
        assert sorted(p.name for p in run.iterdir()) == [MARKER, "log.csv", "model.pt",
                                                         "notes.txt"]
    # and a folder written file by file is not written into a single output, nor another
    # command's: the files would mix
    single = tmp_path / "maps"
    assert main(["preprocess", str(nifti_study), str(single), "--no-register",
                 "--no-filter"]) == 0
    with pytest.raises(InputError, match="holds the output of `ctperf preprocess`"):
        check_output(single, kind="extend")
    set_writer("ctperf phantom")
    try:
        with pytest.raises(InputError, match="holds the output of `ctperf train`"):
            check_output(run, kind="extend")
    finally:
        set_writer(None)
    set_writer("ctperf train")
    try:
        assert check_output(run, kind="extend") == run  # its own, to resume
    finally:
        set_writer(None)


def test_an_output_written_from_python_and_a_commands_are_not_confused(nifti_study, tmp_path,
                                                                         capsys):
    """A second review: a subject written from Python (its marker names no command) was
    replaced whole by `ctperf maps --cohort`, and a command's output from Python, exit 0."""
    from ctperf.io.atomic import atomic_dir

    python_made = tmp_path / "from_python"
    with atomic_dir(python_made) as tmp:
        (tmp / "study.nii.gz").write_text("a subject")
    assert main(["preprocess", str(nifti_study), str(python_made), "--no-register",
                 "--no-filter"]) == 2
    assert "names no command" in capsys.readouterr().err
    assert (python_made / "study.nii.gz").read_text() == "a subject"
    with atomic_dir(python_made) as tmp:  # Python rewrites its own
        (tmp / "study.nii.gz").write_text("again")
    command_made = tmp_path / "from_command"
    assert main(["preprocess", str(nifti_study), str(command_made), "--no-register",
                 "--no-filter"]) == 0
    with pytest.raises(InputError, match="holds the output of `ctperf preprocess`, which this "
                                         "call would replace"), atomic_dir(command_made):
        pass
    assert (command_made / "study.nii.gz").is_file()


def test_empty_existing_folder_is_used(nifti_study, tmp_path):
    out = tmp_path / "made_by_hand"
    out.mkdir()
    assert main(["convert", str(nifti_study), str(out)]) == 0
    assert any(out.glob("*.dcm"))


def test_atomic_dir_rules(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a").write_text("a")
    with pytest.raises(InputError, match="did not write"), atomic_dir(foreign):
        pass
    assert (foreign / "a").read_text() == "a"
    with atomic_dir(foreign, overwrite=True) as tmp:
        (tmp / "b").write_text("b")
    assert sorted(p.name for p in foreign.iterdir()) == [MARKER, "b"]
    with atomic_dir(foreign) as tmp:  # now marked: replaced without overwrite
        (tmp / "c").write_text("c")
    assert sorted(p.name for p in foreign.iterdir()) == [MARKER, "c"]
    (tmp_path / "file").write_text("f")
    with pytest.raises(InputError, match="is a file"), atomic_dir(tmp_path / "file",
                                                                    overwrite=True):
        pass
    (tmp_path / "link").symlink_to(foreign, target_is_directory=True)
    with pytest.raises(InputError, match="symbolic link"), atomic_dir(tmp_path / "link"):
        pass
    with pytest.raises(InputError, match="is a folder"), atomic_file(foreign):
        pass
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new") as tmp:
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "foreign", "link"]


def test_check_output_is_silent_for_a_good_output(tmp_path):
    (tmp_path / "study.nii.gz").write_bytes(b"x")
    out = check_output(tmp_path / "a" / "b" / "out", inputs=(tmp_path / "study.nii.gz", None))
    assert out == tmp_path / "a" / "b" / "out" and not (tmp_path / "a").exists()


# --- temporaries of killed runs ----------------------------------------------------------------

def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_stale_temporaries_are_removed_and_nothing_else(nifti_study, tmp_path):
    from ctperf.io import atomic as atomic_module

    host = atomic_module._HOST
    parent = tmp_path / "runs"
    parent.mkdir()
    dead = parent / f"{TEMP_PREFIX}{host}.{_dead_pid()}.abcd1234.out"  # killed run, this host
    dead.mkdir()
    (dead / "cbf.nii.gz").write_bytes(b"half")
    dead_file = parent / f"{TEMP_PREFIX}{host}.{_dead_pid()}.efgh5678.study.nii.gz"
    dead_file.write_bytes(b"half")
    live = parent / f"{TEMP_PREFIX}{host}.{os.getppid()}.ijkl9012.out"  # a running process
    live.mkdir()
    remote_new = parent / f"{TEMP_PREFIX}otherhost.123.mnop3456.out"  # another machine, fresh
    remote_new.mkdir()
    remote_old = parent / f"{TEMP_PREFIX}otherhost.456.qrst7890.out"  # another machine, old
    remote_old.mkdir()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(remote_old, (old, old))
    lookalike = parent / ".ctperf-tmpfoo"  # not ours: no host/pid fields
    lookalike.mkdir()
    user_hidden = parent / ".out.x1y2"  # a user's hidden folder, even if named like old temps
    user_hidden.mkdir()
    (parent / "keep.txt").write_text("x")
    assert main(["convert", str(nifti_study), str(parent / "out")]) == 0
    names = sorted(p.name for p in parent.iterdir())
    assert names == sorted([live.name, remote_new.name, lookalike.name, user_hidden.name,
                            "keep.txt", "out"])


def test_remove_stale_temporaries_never_follows_links(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("x")
    (tmp_path / "runs").mkdir()
    link = tmp_path / "runs" / f"{TEMP_PREFIX}somehost.1.abcdefgh.out"
    link.symlink_to(target, target_is_directory=True)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(link, (old, old), follow_symlinks=False)
    removed = remove_stale_temporaries(tmp_path / "runs")
    assert removed == [link] and (target / "data").read_text() == "x"


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM")
def test_sigterm_leaves_no_temporary(tmp_path):
    """A run killed with SIGTERM while writing removes its temporary folder."""
    script = (
        "import signal, sys, time\n"
        "from ctperf.cli import main\n"
        "import ctperf.io as io\n"
        "def slow(*a, **k):\n"
        "    print('writing', flush=True); time.sleep(30)\n"
        "io.write_series_dicom = slow\n"
        f"sys.exit(main(['convert', {str(tmp_path / 's.nii.gz')!r}, "
        f"{str(tmp_path / 'out')!r}]))\n")
    write_series_nifti(_tiny_series(), tmp_path / "s.nii.gz")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15
    assert proc.stderr is not None  # one line, as Ctrl-C gets (it had printed nothing)
    assert proc.stderr.read().strip().splitlines()[-1] == "ctperf convert: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.nii.gz"]


def _tiny_series():
    from ctperf.types import CTPSeries

    hu = np.zeros((4, 2, 6, 6), dtype=np.float32)
    return CTPSeries(hu=hu, times=np.arange(4.0), affine=np.eye(4), meta={})


def test_an_output_that_cannot_be_created_is_refused_before_any_work(nifti_study, tmp_path,
                                                                     monkeypatch, capsys):
    """Permission bits said yes (a read-only mount, a full disk, /proc): the maps were
    computed, then writing failed with an error naming a temporary path. A folder is now
    made and removed there first."""
    import tempfile

    import ctperf.perfusion

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(ctperf.perfusion, "run_perfusion", lambda *a, **k: pytest.fail("ran"))
    assert main(["maps", str(nifti_study), str(tmp_path / "out")]) == 2
    _one_error_line(capsys, str(tmp_path / "out"), "cannot be written", "Read-only file system")


def test_a_mount_point_as_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """A container's volume given as OUT (``docker -v host:/out``) cannot be renamed away: the
    maps had been computed in full, then refused as 'Device or resource busy', leaving an empty
    temporary folder beside it."""
    import ctperf.io.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(atomic.os.path, "ismount", lambda p: Path(p) == out)
    with pytest.raises(InputError, match=r"is a mount point.*give a folder inside it"):
        check_output(out, inputs=[])
    with pytest.raises(InputError, match="is a mount point"), atomic_dir(out):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    check_output(out / "maps", inputs=[])  # a folder inside it is fine
    bound = tmp_path / "bound.csv"  # a file bound into a container: as refused
    bound.write_text("x")
    monkeypatch.setattr(atomic.os.path, "ismount", lambda p: Path(p) == bound)
    with pytest.raises(InputError, match="is a mount point"):
        check_output(bound, inputs=[], overwrite=True, kind="file")
    # a bind mount within one file system, which os.path.ismount misses: from the mount table
    monkeypatch.undo()
    spaced = tmp_path / "my out"
    spaced.mkdir()
    line = f"36 35 98:0 /src {str(spaced).replace(' ', chr(92) + '040')} rw - ext4 /dev/x rw"
    monkeypatch.setattr(atomic, "_mount_table", lambda: f"1 0 8:1 / / rw - ext4 /dev/y rw\n{line}")
    with pytest.raises(InputError, match="is a mount point"):
        check_output(spaced, inputs=[])
    check_output(tmp_path / "other", inputs=[])


def test_an_interruption_between_the_two_renames_keeps_the_earlier_output(tmp_path,
                                                                           monkeypatch):
    """A signal just after the earlier output was moved aside: the cleanup called rmdir on
    the folder now holding it ("Directory not empty"), OUT was gone, and the next run anywhere
    in that folder deleted the earlier output as a stale temporary."""
    from ctperf.io import atomic as atomic_module

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "cbf.nii.gz").write_text("earlier")
    real = os.replace
    calls = []

    def replace_then_signal(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the earlier output moved aside: the signal comes now
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic_module.os, "replace", replace_then_signal)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "cbf.nii.gz").write_text("new")
    monkeypatch.setattr(atomic_module.os, "replace", real)
    assert (out / "cbf.nii.gz").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_earlier_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    # SIGKILL between the two renames: OUT missing, the earlier output in a hidden temporary
    # that the next run had deleted as stale
    from ctperf.io import atomic as atomic_module

    parent = tmp_path / "runs"
    parent.mkdir()
    aside = parent / f"{TEMP_PREFIX}{atomic_module._HOST}.{_dead_pid()}.abcd1234.old.out"
    aside.mkdir()
    (aside / MARKER).write_text("ctperf output\n")
    (aside / "cbf.nii.gz").write_text("earlier")
    half = parent / f"{TEMP_PREFIX}{atomic_module._HOST}.{_dead_pid()}.efgh5678.out"
    half.mkdir()  # the replacement it was writing
    assert remove_stale_temporaries(parent) == [half]
    assert (parent / "out" / "cbf.nii.gz").read_text() == "earlier"
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_a_full_disk_under_a_librarys_own_error_is_one_line(nifti_study, tmp_path, capsys,
                                                              monkeypatch):
    # pydicom re-raises the file system's ENOSPC as a bare OSError without its number: the
    # CLI had printed a traceback and exited 1
    import pydicom

    def full(self, *args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            raise OSError(f"With tag (7FE0,0010) got exception: {exc}") from exc

    monkeypatch.setattr(pydicom.Dataset, "save_as", full)
    assert main(["convert", str(nifti_study), str(tmp_path / "dcm")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "ctperf" in line]
    assert err == [f"ctperf convert: error: {tmp_path / 'dcm'}: could not be written: No space "
                   "left on device"]  # one line (the progress bar's aside)
    assert not (tmp_path / "dcm").exists()
