"""Training side: records -> heads + gates -> calibrated drafter artifact; evaluation and probes.

    config.py       FitConfig: every setting of `train.py fit`, once (the command's options are generated from it)
    data.py         reading records (splits, the big model's entry and layer) and scoring record pairs
    distill.py      the heads' training loops (distillation from the big model)
    stages.py       resumable stages: a finished stage is loaded when its key matches
    fit.py          `train.py fit`: the stages in order, from records to the Drafter folder
    calibration.py  precision/coverage curves and the Learn-then-Test threshold
    evaluate.py     `train.py evaluate`: the gate on held-out books, report and figures
    probes.py       linear probes of the recorded hidden states

Imports go one way: corpus_tools <- gate.model <- gate.train.
"""
