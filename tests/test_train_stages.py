"""FitConfig (one list of settings, the command-line options generated from it) and the cached-stage helper."""
import argparse

import pytest
import torch

from gate.train.config import FitConfig, add_arguments, options_from_args
from gate.train.stages import StageCache, stage_key


def test_fit_config_defaults_options_and_stages():
    with pytest.raises(TypeError, match="unknown fit options"):
        FitConfig.from_options(epochz=3)
    cfg = FitConfig.from_options(max_skip=8, d_tok=8)
    assert cfg.as_dict()["max_skip"] == 8 and cfg.d_tok == 8
    # the heads' cache key covers exactly the settings that change the heads
    assert set(cfg.stage_settings("heads")) == {
        "seed", "max_skip", "n_ctx", "restricted", "d_tok", "d_hid", "width", "epochs", "future_epochs", "batch",
        "soft_weight", "n_pca", "word_inputs", "gate_frac", "max_train", "threads", "dtype", "reg_weight",
        "min_steps"}
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--max-skip", "8", "--epochs", "2.5", "--layer", "12", "--predictor", "word"])
    opts = options_from_args(args)
    assert opts["max_skip"] == 8 and opts["epochs"] == 2.5 and opts["layer"] == "12" and opts["predictor"] == "word"
    assert "d_tok" not in opts                                 # an API-only setting
    assert FitConfig.from_options(**options_from_args(ap.parse_args([]))) == FitConfig()
    with pytest.raises(SystemExit):
        ap.parse_args(["--predictor", "nope"])


def test_stage_cache_loads_finished_stages_and_recomputes_on_a_new_key(tmp_path):
    calls, logs = [], []

    def compute():
        calls.append(1)
        return {"n": len(calls)}, {"w": torch.full((2,), float(len(calls)))}

    cache = StageCache(tmp_path / "stages", log=logs.append)
    key = stage_key("heads", {"seed": 0})
    meta, st = cache.run("heads", key, compute, with_tensors=True)
    assert meta == {"key": key, "n": 1} and st["w"].tolist() == [1.0, 1.0]
    meta, st = cache.run("heads", key, compute, with_tensors=True)          # finished: loaded
    assert len(calls) == 1 and meta["n"] == 1 and st["w"].tolist() == [1.0, 1.0]
    assert any("heads: loaded finished stage" in m for m in logs)
    assert cache.run("heads", stage_key("heads", {"seed": 1}), compute, with_tensors=True)[0]["n"] == 2
    (tmp_path / "stages" / "heads.safetensors").unlink()                    # a stage without its tensors
    assert cache.run("heads", stage_key("heads", {"seed": 1}), compute, with_tensors=True)[0]["n"] == 3
    forced = StageCache(tmp_path / "stages", force=True, log=logs.append)
    assert forced.run("heads", stage_key("heads", {"seed": 1}), compute, with_tensors=True)[0]["n"] == 4
    assert cache.run("mode", "k", lambda: ({"mode": "word"}, None)) == ({"key": "k", "mode": "word"}, None)
