"""Training side: records -> drafter artifacts; evaluation, recalibration, probes (docs/training.md).

    fit.py          `train.py fit`: the heads drafter; fit_eagle.py (--drafter eagle), fit_router.py (router)
    config.py       FitConfig: every setting of `train.py fit`, once;  stages.py: resumable stages
    data.py         records -> splits, the predictor on record pairs;  distill.py / eagle.py: training loops
    pca.py          pca_fit, shared by the heads and router fits;  calibration.py: Learn-then-Test thresholds
    evaluate.py     `train.py evaluate`: the gate on held-out books;  probes.py: linear probes of the layers
    recalibrate.py  `train.py calibrate`: a new threshold on records of your own text
    export.py       `train.py export`: a feature head as the Hugging Face EAGLE-3 draft (vLLM, SGLang, llama.cpp)

Imports go one way: corpus_tools, runtimes <- gate.model <- gate.train.
"""
