"""Orchestration above the stages: one study's analysis as named steps, one function per CLI
command doing the whole work for one study (read -> compute -> write atomically), phantom
cohorts, the NLR references of training cohorts, training runs and the paper's whole
experiment (:func:`reproduce_cohort`). The stages (io, preprocess, perfusion,
model, reporting, evaluation, phantom) never import this package."""

from ctperf.workflow.analysis import analyse_study
from ctperf.workflow.convert import ConvertOptions, convert_study
from ctperf.workflow.demo import DemoOptions, run_demo
from ctperf.workflow.phantoms import generate_cohort
from ctperf.workflow.references import REFERENCE_MAPS, nlr_references
from ctperf.workflow.reproduce import (
    NeuralDemoOptions,
    ReproduceOptions,
    ReproduceOutcome,
    reproduce_cohort,
    run_neural_demo,
)
from ctperf.workflow.study import (
    MapsOptions,
    PredictOptions,
    PreprocessOptions,
    StudyOutcome,
    maps_study,
    predict_study,
    preprocess_study,
    write_maps_and_summary,
    write_maps_outputs,
)
from ctperf.workflow.training import (
    TrainingOptions,
    TrainingOutcome,
    cross_validate_cohort,
    train_cohort,
)

__all__ = [
    "REFERENCE_MAPS",
    "ConvertOptions",
    "DemoOptions",
    "MapsOptions",
    "NeuralDemoOptions",
    "PredictOptions",
    "PreprocessOptions",
    "ReproduceOptions",
    "ReproduceOutcome",
    "StudyOutcome",
    "TrainingOptions",
    "TrainingOutcome",
    "analyse_study",
    "convert_study",
    "cross_validate_cohort",
    "generate_cohort",
    "maps_study",
    "nlr_references",
    "predict_study",
    "preprocess_study",
    "reproduce_cohort",
    "run_demo",
    "run_neural_demo",
    "train_cohort",
    "write_maps_and_summary",
    "write_maps_outputs",
]
