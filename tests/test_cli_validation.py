"""Command-line numbers are checked before anything is written; no study path leaves ctperf."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctperf.cli import main
from ctperf.errors import ValidationError
from ctperf.io import write_series_dicom, write_volume
from test_perfusion_pipeline import synthetic_study

BAD_ARGUMENTS = [
    # (command, extra arguments, the flag the message must name)
    ("maps", ["--rho", "0"], "--rho"),
    ("maps", ["--rho", "nan"], "--rho"),
    ("maps", ["--rho", "5"], "--rho"),  # 5 g/mL is no brain
    ("maps", ["--kh", "0"], "--kh"),
    ("maps", ["--kh", "inf"], "--kh"),
    ("maps", ["--kh", "nan"], "--kh"),
    ("maps", ["--kh", "1.36"], "--kh"),  # the inverse ratio by mistake
    ("maps", ["--tmax", "-1"], "--tmax"),
    ("maps", ["--core-rcbf", "1.5"], "--core-rcbf"),
    ("maps", ["--core-cbv", "nan"], "--core-cbv"),
    ("maps", ["--lesion-smooth", "-2"], "--lesion-smooth"),
    ("maps", ["--lesion-smooth", "1e6"], "--lesion-smooth"),  # had asked for terabytes
    ("maps", ["--spatial-sigma", "0"], "--spatial-sigma"),
    ("maps", ["--range-sigma", "-20"], "--range-sigma"),
    ("maps", ["--frame-interval", "nan"], "--frame-interval"),
    ("maps", ["--frame-interval", "500"], "--frame-interval"),  # milliseconds
    ("phantom", ["--frame-interval", "500"], "--frame-interval"),  # every reader refused it
    ("maps", ["--tmax", "6000"], "--tmax"),  # milliseconds: no voxel hypoperfused, exit 0
    ("maps", ["--core-cbv", "200"], "--core-cbv"),  # every voxel core
    ("preprocess", ["--workers", "0"], "--workers"),
    ("preprocess", ["--spatial-sigma", "inf"], "--spatial-sigma"),
    ("predict", ["--model", "m.pt", "--batch-size", "0"], "--batch-size"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--preset", "gpu"], "--preset"),
    ("train", ["--device", "cuda:x"], "--device"),
    ("train", ["--resample-interval", "0"], "--resample-interval"),
    ("train", ["--epochs", "-1"], "--epochs"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("train", ["--lr", "nan"], "--lr"),
    ("train", ["--lr", "-1e-5"], "--lr"),
    ("train", ["--frames", "0"], "--frames"),
    ("train", ["--size", "2.5"], "--size"),
    ("train", ["--size", "100000"], "--size"),  # had asked for terabytes
    ("train", ["--pretrain-size", "5000"], "--pretrain-size"),
    ("train", ["--val-fraction", "1.5"], "--val-fraction"),
    ("train", ["--seed", "-1"], "--seed"),
    ("preprocess", ["--spatial-sigma", "1e6"], "--spatial-sigma"),  # a uniform study, exit 0
    ("preprocess", ["--range-sigma", "1e9"], "--range-sigma"),
    ("cv", ["--folds", "1"], "--folds"),
    ("cv", ["--pretrain-epochs", "-3"], "--pretrain-epochs"),
]


@pytest.mark.parametrize(("command", "extra", "flag"), BAD_ARGUMENTS,
                         ids=[f"{c} {' '.join(e)}" for c, e, _ in BAD_ARGUMENTS])
def test_bad_numbers_end_in_one_argparse_error(tmp_path, capsys, command, extra, flag):
    study = tmp_path / "study.nii.gz"
    study.write_bytes(b"never read")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([command, str(study), str(out), *extra])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ctperf {command}: error: argument {flag}")
    assert not out.exists()


@pytest.mark.parametrize("rcbf", [["--core-rcbf", "0.4"], ["--core-reference", "global"]])
def test_two_rules_for_the_core_are_refused(tmp_path, capsys, rcbf):
    """--core-cbv with --core-rcbf or --core-reference had dropped the latter in silence."""
    study = tmp_path / "study.nii.gz"
    study.write_bytes(b"never read")
    assert main(["maps", str(study), str(tmp_path / "out"), "--core-cbv", "2", *rcbf]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--core-cbv defines the core by CBV alone: {rcbf[0]}" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--frames", "0"], ["--subjects", "0"], ["--size", "8"],
                                   ["--size", "100000"], ["--frames", "2"],
                                   ["--frame-interval", "inf"], ["--mas", "0"], ["--seed", "-1"],
                                   ["--lesion-free", "nan"]])
def test_phantom_options_are_checked_before_writing(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exc:
        main(["phantom", str(tmp_path / "cohort"), *extra])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"argument {extra[0]}" in lines[0]
    assert not (tmp_path / "cohort").exists()


# --workers 1: the subjects run in this process, where the stand-ins below are in place
TINY = ["--size", "32", "--slices", "1", "--frames", "12", "--anatomy", "procedural",
        "--no-dicom", "--workers", "1"]


@dataclasses.dataclass
class _FakeSubject:
    params: dict


@pytest.fixture
def quick_subjects(monkeypatch):
    """Replace the simulation (seconds per subject) by a stand-in that checks the options the
    same way and writes a folder: these tests are about cohort bookkeeping."""
    import ctperf.workflow.phantoms as cohort_module

    def generate(*, seed, frames, **options):
        if frames < 2:
            raise ValidationError(f"need frames >= 2, got {frames}")
        return _FakeSubject(params={"seed": seed})

    def write(subject, folder, **options):
        folder.mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps(subject.params))

    monkeypatch.setattr(cohort_module, "generate_subject", generate)
    monkeypatch.setattr(cohort_module, "write_subject", write)


def test_phantom_rerun_after_a_bad_option_works(tmp_path, quick_subjects):
    cohort = tmp_path / "cohort"
    with pytest.raises(SystemExit):
        main(["phantom", str(cohort), "--size", "32", "--frames", "0"])
    assert not cohort.exists()
    assert main(["phantom", str(cohort), *TINY]) == 0
    assert json.loads((cohort / "cohort.json").read_text())["options"]["frames"] == 12
    assert (cohort / "sub-0000" / "params.json").is_file()


def test_library_writes_no_cohort_json_for_invalid_options(tmp_path, quick_subjects):
    from ctperf.workflow import generate_cohort

    with pytest.raises(ValidationError):
        generate_cohort(tmp_path / "c", subjects=2, seed=0, frames=0)
    assert not (tmp_path / "c").exists()


def test_cohort_json_without_subjects_does_not_block_new_options(tmp_path, quick_subjects):
    """A cohort.json left by an earlier failed run (no subject written) is replaced; with
    subjects, other options are still refused."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "cohort.json").write_text(json.dumps({"subjects": 1, "seed": 0,
                                                    "options": {"frames": 0}}))
    assert main(["phantom", str(cohort), *TINY]) == 0
    assert json.loads((cohort / "cohort.json").read_text())["options"]["frames"] == 12
    assert main(["phantom", str(cohort), *TINY, "--seed", "5"]) == 2


def test_phantom_refuses_a_foreign_folder(tmp_path, capsys):
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(b"%PDF")
    assert main(["phantom", str(folder), *TINY]) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["a.pdf"]


def test_train_refuses_a_foreign_folder_before_building_anything(tmp_path, capsys):
    cohort, out = tmp_path / "cohort", tmp_path / "run"
    cohort.mkdir()
    out.mkdir()
    (out / "model.pt").write_bytes(b"someone's model")
    assert main(["train", str(cohort), str(out), "--epochs", "1"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == b"someone's model"
    assert not (cohort / ".ctperf-cache").exists()
    assert main(["train", str(cohort), str(cohort / "run")]) == 2  # inside the cohort
    assert "lies inside the input" in capsys.readouterr().err


# --- privacy -----------------------------------------------------------------------------------

IDENTITY = {"PatientName": "Doe^Jane", "PatientID": "MRN4711", "PatientBirthDate": "19470203",
            "AccessionNumber": "ACC0815", "InstitutionName": "Saint Example Hospital"}
SECRET_WORDS = ("Doe", "Jane", "MRN4711", "19470203", "ACC0815", "Saint Example")


@pytest.fixture(scope="module")
def patient_study(tmp_path_factory):
    """A small synthetic study as DICOM with patient tags, in a folder named after the patient."""
    series, truth = synthetic_study(np.random.default_rng(3), noise=3.0, size=48)
    root = tmp_path_factory.mktemp("privacy")
    folder = root / "DOE_JANE_1947" / "ctp"
    write_series_dicom(series, folder, patient=IDENTITY)
    aif = root / "aif.nii.gz"
    write_volume(truth["artery"], series.affine, aif)
    return folder, aif


@pytest.fixture(scope="module")
def tiny_patient_study(tmp_path_factory):
    """A 6-frame study of 2 x 16 x 16 voxels as DICOM with patient tags (for the writers)."""
    from ctperf.types import CTPSeries

    hu = np.random.default_rng(5).normal(30.0, 5.0, (6, 2, 16, 16)).astype(np.float32)
    series = CTPSeries(hu=hu, times=np.arange(6) * 1.0, affine=np.diag([0.5, 0.5, 5.0, 1.0]),
                       meta={"description": "CTP", "kvp": 80.0})
    folder = tmp_path_factory.mktemp("privacy") / "DOE_JANE_1947" / "ctp"
    write_series_dicom(series, folder, patient=IDENTITY)
    return folder


def _text_outputs(out):
    """Every JSON file and every NIfTI header description/extension under ``out``."""
    texts = {p: p.read_text() for p in out.rglob("*.json")}
    for p in out.rglob("*.nii.gz"):
        header = nib.load(p).header
        texts[p] = bytes(header["descrip"]).decode(errors="replace") + "".join(
            str(e.get_content()) for e in header.extensions)
    return texts


def test_maps_writes_no_study_path_and_anonymises_dicom(patient_study, tmp_path, monkeypatch):
    import ctperf.reporting as reporting

    folder, aif = patient_study
    titles = []
    figure = reporting.maps_overview

    def spy(result, *, title=""):
        titles.append(title)
        return figure(result, title=title)

    monkeypatch.setattr(reporting, "maps_overview", spy)
    out = tmp_path / "out"
    assert main(["maps", str(folder), str(out), "--method", "bsvd", "--aif-mask", str(aif),
                 "--dicom", "--anonymise"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "study" not in summary
    texts = _text_outputs(out)
    assert out / "summary.json" in texts
    for path, text in texts.items():
        for word in ("DOE_JANE", str(folder.parent), *SECRET_WORDS):
            assert word not in text, (path, word)
    assert titles and all("DOE" not in t and str(folder) not in t for t in titles)
    files = list((out / "dicom").rglob("*.dcm"))
    assert files
    for path in files[:3]:
        ds = pydicom.dcmread(path)
        for keyword in IDENTITY:
            assert str(ds.get(keyword, "")) != IDENTITY[keyword], (path.name, keyword)


@pytest.mark.parametrize("command", ["convert", "preprocess"])
def test_series_outputs_are_anonymised_on_request(tiny_patient_study, tmp_path, command):
    folder = tiny_patient_study
    out = tmp_path / "out"
    extra = ["--no-register", "--no-filter", "--dicom"] if command == "preprocess" else []
    assert main([command, str(folder), str(out), "--anonymise", *extra]) == 0
    dicom = out / "dicom" if command == "preprocess" else out
    for path in sorted(dicom.glob("*.dcm"))[:3]:
        ds = pydicom.dcmread(path)
        for keyword in IDENTITY:
            assert str(ds.get(keyword, "")) != IDENTITY[keyword], (path.name, keyword)
    for path, text in _text_outputs(out).items():
        for word in ("DOE_JANE", *SECRET_WORDS):
            assert word not in text, (path, word)


def test_dicom_keeps_identity_without_anonymise(tiny_patient_study, tmp_path):
    """Without --anonymise a converted series still files with the patient's study."""
    folder = tiny_patient_study
    out = tmp_path / "out"
    assert main(["convert", str(folder), str(out)]) == 0
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    assert str(ds.PatientID) == IDENTITY["PatientID"]


def test_a_phantom_cohort_refusal_names_the_setting_that_differs(tmp_path, quick_subjects,
                                                                 capsys):
    """Extending a cohort with another setting printed both option dicts whole (a changed
    default hidden among a dozen keys); the setting that differs is named."""
    cohort = tmp_path / "cohort"
    assert main(["phantom", str(cohort), *TINY]) == 0
    capsys.readouterr()
    assert main(["phantom", str(cohort), *TINY[:6], "--anatomy", "auto", "--no-dicom",
                 "--workers", "1", "--subjects", "2"]) == 2
    err = capsys.readouterr().err
    assert "made with other settings (anatomy 'procedural' -> 'auto')" in err


def test_subjects_of_another_ctperf_version_are_not_made_again(tmp_path, quick_subjects,
                                                               capsys):
    """A cohort made by an older ctperf, extended by a newer one: its four subjects, which
    maps and trainings had been made from, were generated again in silence (studies up to
    2487 HU apart). The run is refused, naming them; a cohort of this version extends."""
    cohort = tmp_path / "cohort"
    assert main(["phantom", str(cohort), *TINY, "--subjects", "2"]) == 0
    manifest = json.loads((cohort / "manifest.json").read_text())
    for row in manifest["studies"].values():
        row["ctperf_version"] = "0.1.0"
    (cohort / "manifest.json").write_text(json.dumps(manifest))
    made = (cohort / "sub-0000" / "params.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["phantom", str(cohort), *TINY, "--subjects", "3"]) == 2
    assert "2 done studies (sub-0000, sub-0001) were made by ctperf 0.1.0" in \
        capsys.readouterr().err
    assert (cohort / "sub-0000" / "params.json").stat().st_mtime_ns == made
    assert not (cohort / "sub-0002").exists()
    # the record is left as it was (it had been rewritten for 3 subjects before the refusal)
    assert json.loads((cohort / "cohort.json").read_text())["subjects"] == 2
    fresh = tmp_path / "fresh"
    assert main(["phantom", str(fresh), *TINY, "--subjects", "2"]) == 0
    assert main(["phantom", str(fresh), *TINY, "--subjects", "3"]) == 0
    assert (fresh / "sub-0002").is_dir()


def test_a_subject_missing_a_file_is_made_again_by_the_same_version(tmp_path):
    """A first version of the refusal above also refused to repair a subject of this very
    version that had lost a file, or to add DICOM to it ("made with other options or
    inputs")."""
    cohort = tmp_path / "cohort"
    assert main(["phantom", str(cohort), *TINY]) == 0
    (cohort / "sub-0000" / "truth" / "cbf.nii.gz").unlink()
    assert main(["phantom", str(cohort), *TINY]) == 0
    assert (cohort / "sub-0000" / "truth" / "cbf.nii.gz").is_file()
    # an output format added (DICOM) makes the subject again with this version, its data the
    # same (a first version of the refusal had refused this too)
    assert main(["phantom", str(cohort), *TINY[:-3], "--workers", "1"]) == 0
    assert (cohort / "sub-0000" / "dicom").is_dir()
