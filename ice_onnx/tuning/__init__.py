"""Per-layer tuning: the cheapest per-block plan that keeps a model's final
outputs within a fidelity budget on calibration inputs. `ice-onnx tune` renders it;
`ice-onnx convert --plan` applies the plan it writes. See docs/tuning.md.

    from ice_onnx.tuning import TuneSettings, load_calibration, plan_document, tune
    result = tune("model.onnx", load_calibration("random:256", onnx.load("model.onnx")), TuneSettings(budget=0.99))
"""

from ice_onnx.tuning.calibration import CalibrationError, load_calibration
from ice_onnx.tuning.candidates import DEFAULT_SPEC, Candidate, parse_candidates
from ice_onnx.tuning.tuner import BudgetError, TuneSettings, plan_document, tune

__all__ = ["BudgetError", "CalibrationError", "Candidate", "DEFAULT_SPEC", "TuneSettings", "load_calibration",
           "parse_candidates", "plan_document", "tune"]
