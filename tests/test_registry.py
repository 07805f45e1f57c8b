"""The policy registry: a new policy is one class, and infer.py and bench/decode.py offer it unchanged;
option values are checked where a policy is built, and every user error is one line with exit status 2."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from common.errors import UsageError
from gate.decode.cli import build_parser, main
from gate.decode.contract import Draft, Policy, arg, at_least
from gate.decode.registry import registered
from gate.decode.session import make_policy
from runtimes.hf import HFBackend
from runtimes.open import BACKENDS, Runtime, open_backend

from helpers import PROMPTS, lively

pytestmark = pytest.mark.usefixtures("one_thread")


class EveryOther(Policy):
    """Every other generated token is a fixed token, drafted without the big model (a test policy)."""
    name = "every_other"
    summary = "every other token is --fixed-token, drafted without the big model"
    source = "skip"
    args = (arg("--fixed-token", type=int, default=7, help="the token drafted at odd positions"),)
    examples = ('"Hello" --policy every_other --fixed-token 11',)

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def propose(self, state):
        if state.n_new % 2 == 0:
            return []
        self.calls += 1
        return [Draft(self.token, self.source, 1.0)]

    @classmethod
    def from_args(cls, args, rt):
        return cls(at_least("--fixed-token", args.fixed_token, 0))


PLUS = {**registered(), EveryOther.name: EveryOther}


def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_rt(tiny_tokenizer, tiny_llama_pair):
    big, small = tiny_llama_pair
    return Runtime(tiny_tokenizer, HFBackend(lively(big, 1), name="big"), big_info=None,
                   predictors={"self:15": HFBackend(lively(small, 2), name="self:15")},
                   eos_ids=(tiny_tokenizer.eos_token_id,))


# -- a new policy without touching the CLI or the benchmark ---------------------------------------------------
def test_help_is_generated_from_the_registry():
    text = build_parser(PLUS).format_help()
    assert "every_other" in text and "--fixed-token" in text and "[every_other]" in text
    assert 'python infer.py "Hello" --policy every_other --fixed-token 11' in text
    plain = build_parser().format_help()
    assert "every_other" not in plain                      # the global registry is untouched
    for name, cls in registered().items():
        assert f"  {name} " in plain and cls.summary.splitlines()[0] in plain
    assert "{big,small,ratio,entropy,cascade,gate" in plain


def test_cli_runs_a_new_policy(smollm2, tmp_path):
    out = tmp_path / "r.json"
    argv = ["It is a truth universally acknowledged", "-m", "6", "--quiet", "--json", str(out)]
    assert main(argv + ["--policy", "every_other", "--fixed-token", "11"], policies=PLUS) == 0
    r = json.loads(out.read_text())
    assert r["sources"] == ["big", "skip"] * 3 and r["output_ids"][1::2] == [11] * 3
    assert r["ledger"]["policy"] == "every_other" and r["ledger"]["skipped"] == 3
    assert main(argv + ["--policy", "every_other", "--verify"], policies=PLUS) == 0
    verified = json.loads(out.read_text())["output_ids"]
    assert main(argv + ["--policy", "big"]) == 0
    assert verified == json.loads(out.read_text())["output_ids"]


def test_cli_reports_a_new_policys_bad_option(smollm2, capsys):
    assert main(["x", "--policy", "every_other", "--fixed-token", "-1"], policies=PLUS) == 2
    err = capsys.readouterr().err.strip().splitlines()   # a first line may name the backend --backend auto chose
    assert err[-1] == "infer.py: error: --fixed-token must be >= 0, got -1" and len(err) <= 2


def test_bench_runs_a_new_policy(tiny_rt):
    bench = load_bench()
    assert "every_other" in bench.method_names(PLUS) and "every_other" not in bench.method_names(registered())
    args = bench.parse(["--methods", "big,every_other", "--fixed-token", "5"], PLUS)
    notes = []
    methods = bench.build(args, tiny_rt, notes, PLUS)
    assert list(methods) == ["big", "every_other"] and methods["big"].lossless
    ids = tiny_rt.tokenizer(PROMPTS[0]).input_ids
    rows = bench.run_prompts(tiny_rt, methods, [ids], 8, 1e-3, "float32")
    s = bench.summarize("every_other", methods["every_other"], rows["every_other"], None)
    assert s["skipped_share"] == 0.5 and s["big_calls_per_token"] == 0.5
    assert rows["every_other"][0]["ids"][1::2] == [5] * 4


def test_bench_skips_a_policy_with_incomplete_options(tiny_rt):
    bench = load_bench()
    args = bench.parse(["--methods", "big,cascade,entropy"])
    notes = []
    methods = bench.build(args, tiny_rt, notes)
    assert list(methods) == ["big", "entropy"]
    assert any(n.startswith("cascade: skipped (--policy cascade needs --models") for n in notes)


# -- option values ----------------------------------------------------------------------------------------------
BAD = [
    (["--policy", "gate", "--small", "self:15", "--threshold", "2"], "--threshold must be a number in [0, 1], got 2"),
    (["--policy", "gate", "--small", "self:15", "--threshold", "nan"],
     "--threshold must be a number in [0, 1], got nan"),
    (["--policy", "gate", "--small", "self:15", "--max-skip", "0"], "--max-skip must be >= 1, got 0"),
    (["--policy", "entropy", "--small", "self:15", "--tau", "0.2", "0.3"], "--policy entropy takes one --tau, got 2"),
    (["--policy", "entropy", "--small", "self:15", "--tau", "nan"], "--tau must be a number, got nan"),
    (["--policy", "entropy", "--small", "self:15", "--pattern", "["],
     "--pattern '[': not a regular expression (unterminated character set at position 0)"),
    (["--policy", "entropy", "--small", "self:15", "--span", "two"],
     "--span takes a positive integer or 'line', got 'two'"),
    (["--policy", "entropy", "--small", "self:15", "--lookahead", "0"], "--lookahead must be >= 1, got 0"),
    (["--policy", "entropy"], "--policy entropy needs --small M"),
    (["--policy", "ratio", "--small", "self:15", "-r", "nan"], "ratio must be in [0, 1]"),
    (["--policy", "ratio"], "--policy ratio needs --small M"),
    (["--policy", "cascade", "--models", "self:15", "x", "--tau", "0.1", "0.2", "0.3"],
     "--policy cascade: give one --tau per smaller model (1: self:15) or one for every level, got 3"),
    (["--policy", "cascade"], "--policy cascade needs --models"),
    (["--policy", "gate"], "--policy gate needs --gate PATH"),
    (["--policy", "small"], "--policy small needs --small M or --gate PATH"),
    (["--policy", "gate", "--gate", "/nonexistent/gate"], "--gate /nonexistent/gate: no such folder"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_policy_options_are_one_line_errors(tiny_rt, argv, message):
    args = build_parser().parse_args(["x"] + argv)
    with pytest.raises(UsageError) as e:
        make_policy(args, tiny_rt)
    assert str(e.value).startswith(message) and "\n" not in str(e.value) and "\\Z" not in str(e.value)


def test_good_policy_options_build(tiny_rt):
    def build(*argv):
        return make_policy(build_parser().parse_args(["x", *argv]), tiny_rt)
    assert build("--policy", "cascade", "--models", "self:15", "x", "--tau", "0.2").taus == [0.2]
    assert build("--policy", "entropy", "--small", "self:15", "--span", "line", "--pattern", r"\n").span == "line"
    gate = build("--policy", "gate", "--small", "self:15", "--threshold", "1", "--max-skip", "3")
    assert gate.threshold == 1.0 and gate.max_skip == 3 and gate.lms and gate.hidden_layer is None


@pytest.mark.parametrize("argv,message", [
    (["-t", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["-t", "-1"], "--temperature must be a finite number >= 0, got -1"),
    (["--verify-below", "nan"], "--verify-below must be a number, got nan"),
    (["--prompt-file", "/nonexistent/p.txt"], "--prompt-file /nonexistent/p.txt: No such file or directory"),
    (["-m", "0"], "-m must be an integer >= 1, got 0"),
])
def test_bad_run_options_exit_2_before_loading_models(argv, message, capsys):
    assert main(["x", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"infer.py: error: {message}\n"


def test_bad_option_through_main_is_one_line(smollm2, capsys):
    assert main(["x", "--policy", "entropy", "--small", "self:4", "--pattern", "["]) == 2
    err = capsys.readouterr().err.splitlines()   # a first line may name the backend --backend auto chose
    assert err[-1] == "infer.py: error: --pattern '[': not a regular expression " \
                      "(unterminated character set at position 0)" and len(err) <= 2


def test_backend_table_and_unknown_kind(tiny_dir):
    opened = open_backend(str(tiny_dir), "hf", hidden_layer=1)
    assert isinstance(opened.backend, HFBackend) and opened.backend.name == str(tiny_dir)
    assert opened.backend.hidden_layer == 1 and opened.info.n_layers == opened.backend.n_layers
    assert list(BACKENDS) == ["hf", "llama.cpp"]
    with pytest.raises(UsageError, match="unknown backend 'onnx'; choose from hf, llama.cpp"):
        open_backend(str(tiny_dir), "onnx")


def test_copy_policy_from_the_cli_verify_is_greedy_big(tiny_rt):
    from gate.decode.loop import Decoder

    ids = tiny_rt.tokenizer(" ".join([PROMPTS[0]] * 3)).input_ids
    outputs = {}
    for argv in (["--policy", "big"], ["--policy", "copy", "--verify", "--min-match", "2"]):
        args = build_parser().parse_args(["x", *argv])
        res = Decoder(tiny_rt.big, make_policy(args, tiny_rt), verify=args.verify).generate(ids, 24)
        outputs[args.policy] = res
    assert outputs["copy"].ids == outputs["big"].ids and outputs["copy"].ledger["drafted"] > 0
