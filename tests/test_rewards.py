"""The built-in rewards (gsm8k, math, format, overlong, exact, code), the lookup, and `posttrain rewards check`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain import rewards
from posttrain.rewards.answers import numeric_answer
from posttrain.rewards.code_tests import extract_code

GSM8K = Path(__file__).parents[2] / "shared/data/gsm8k"


def gsm8k_test_rows() -> list[dict]:
    path = GSM8K / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K test split not found at {path} (expected ../shared/data/gsm8k beside the checkout)")
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ gsm8k
def test_gsm8k_scores_every_gold_solution_of_the_test_split_as_correct():
    rows = gsm8k_test_rows()
    golds = [r["answer"] for r in rows]
    scores = rewards.gsm8k([r["question"] for r in rows], golds, answer=golds)
    assert len(rows) == 1319
    wrong = [i for i, s in enumerate(scores) if s != 1.0]
    assert not wrong, f"gold solutions scored as wrong: {wrong[:5]}"


def _perturb(solution: str, delta: int) -> str:
    body, final = solution.rsplit("####", 1)
    return f"{body}#### {int(final.strip().replace(',', '')) + delta}"


@pytest.mark.parametrize("delta", [1, -1, 10])
def test_gsm8k_scores_a_perturbed_final_answer_as_wrong(delta):
    rows = gsm8k_test_rows()
    golds = [r["answer"] for r in rows]
    scores = rewards.gsm8k([""] * len(rows), [_perturb(g, delta) for g in golds], answer=golds)
    right = [i for i, s in enumerate(scores) if s != 0.0]
    assert not right, f"perturbed answers scored as correct: {right[:5]}"


@pytest.mark.parametrize("completion,score", [
    ("9 * 2 = 18\n#### 18", 1.0),
    ("#### $18.00", 1.0),
    (r"Therefore she makes $\boxed{18}$ dollars.", 1.0),
    (r"\boxed{\$18}", 1.0),
    (r"\boxed{18 \text{ dollars}}", 1.0),
    ("The answer is 18.", 1.0),
    ("So the final answer is: $18 per day", 1.0),
    ("She makes 9 * 2 = 18 dollars", 1.0),
    ("She makes 18 dollars, not 17", 0.0),                  # the last number rules when nothing marks the answer
    ("#### 17", 0.0),
    ("The answer is 17. Check: 18", 0.0),                   # "answer is" beats the last number
    (r"\boxed{17} ... 18", 0.0),
    ("#### 18\nThe answer is 17", 1.0),                     # "####" beats everything
    ("no number at all", 0.0),
    ("", 0.0),
    ([{"role": "assistant", "content": "#### 18"}], 1.0),   # conversational completion
])
def test_gsm8k_answer_extraction(completion, score):
    assert rewards.gsm8k(["q"], [completion], answer=["9 * 2 = 18\n#### 18"]) == [score]


@pytest.mark.parametrize("text,value", [
    ("#### 1,450,000", 1450000.0), ("#### -3", -3.0), ("it costs $1,234.50 in total", 1234.5),
    ("#### 0.5", 0.5), (r"\boxed{\frac{3}{4}}", 0.75), (r"\boxed{1{,}000}", 1000.0), ("the answer is \u22125", -5.0),
    ("3-5 = -2", -2.0), ("profit of 50%", 50.0), ("A total of 12 kg.", 12.0), ("1, 2, 3", 3.0),
])
def test_numeric_answer(text, value):
    assert numeric_answer(text) == pytest.approx(value)


def test_gsm8k_tolerance_and_gold_column():
    assert rewards.gsm8k(["q"], ["#### 0.3333333334"], solution=["#### 0.3333333333"], gold_column="solution") == [1.0]
    assert rewards.gsm8k(["q"], ["#### 1450001"], answer=["#### 1,450,000"]) == [0.0]
    assert rewards.gsm8k(["q"], ["#### 3.1"], answer=["#### 3"], abs_tol=0.2) == [1.0]


def test_gsm8k_abstains_without_gold_and_names_bad_gold():
    assert rewards.gsm8k(["q", "q"], ["#### 1", "#### 1"], answer=[None, "1"]) == [None, 1.0]
    with pytest.raises(ValueError, match=r"sample 1: the gold answer in column 'answer' has no number"):
        rewards.gsm8k(["q", "q"], ["#### 1", "#### 1"], answer=["1", "unknown"])
    with pytest.raises(KeyError, match=r"reads column 'answer'.*columns: question.*kwargs.gold_column"):
        rewards.gsm8k(["q"], ["#### 1"], question=["q"])


# ------------------------------------------------------------------------------------------ math
MATH_EQUIVALENT = [  # (gold, completion): math-verify must call these equal
    (r"\frac{1}{2}", r"$\boxed{0.5}$"), (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}"),
    (r"\frac{1}{2}", "The answer is 1/2."),
    ("0.5", r"\boxed{\dfrac{1}{2}}"), (r"-\frac{3}{4}", r"\boxed{-0.75}"), ("1.5", r"\boxed{\frac{3}{2}}"),
    ("3", "The answer is 3."), ("3", r"\boxed{3.0}"), ("1000", r"\boxed{1,000}"), ("1,000", r"\boxed{1000}"),
    (r"2^{10}", r"\boxed{1024}"), (r"\sqrt{8}", r"\boxed{2\sqrt{2}}"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}"),
    (r"\log_2 8", r"\boxed{3}"), (r"2\pi", r"$\boxed{2\pi}$"), (r"\pi/2", r"\boxed{\frac{\pi}{2}}"),
    (r"\infty", r"\boxed{\infty}"), (r"x^2+2x+1", r"\boxed{(x+1)^2}"), (r"y=2x+1", r"\boxed{y = 1 + 2x}"),
    ("x=2", r"\boxed{2}"), ("(1,2]", r"\boxed{(1,2]}"), (r"[0, 1)", r"\boxed{[0,1)}"),
    (r"x \in [0, 1)", r"\boxed{[0,1)}"), (r"(-\infty, 2) \cup (3, \infty)", r"\boxed{(-\infty,2)\cup(3,\infty)}"),
    (r"\{1,2\}", r"\boxed{\{2,1\}}"), ("2,3", r"\boxed{3, 2}"), (r"\begin{pmatrix}1\\2\end{pmatrix}",
                                                                r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}"),
    (r"10\%", r"\boxed{10}"), (r"90^\circ", r"\boxed{90}"), (r"5\text{ cm}", r"\boxed{5}"), (r"\$18", r"\boxed{18}"),
    (r"\text{(C)}", r"\boxed{C}"), (r"\frac{1}{3}", r"\boxed{0.3333333}"), ("$\\frac{7}{2}$", r"so \boxed{3.5}"),
    (r"Half of 9 is \boxed{4.5}", r"\boxed{\frac{9}{2}}"),     # a whole gold solution ending in \boxed{}
]
MATH_DIFFERENT = [  # (gold, completion): math-verify must call these different
    ("3", r"\boxed{4}"), (r"\frac{1}{2}", r"\boxed{2}"), (r"\frac{1}{3}", r"\boxed{0.33}"),
    (r"2^{10}", r"\boxed{1023}"), (r"\{1,2\}", r"\boxed{\{1,3\}}"), ("[1,2]", r"\boxed{(1,2)}"),
    (r"\text{(C)}", r"\boxed{D}"), ("0.5", "no answer here"),
    (r"\sqrt{2}", r"\boxed{2}"), (r"x^2+1", r"\boxed{(x+1)^2}"), (r"2\pi", r"\boxed{2}"), ("-1", r"\boxed{1}"),
    ("(1,2]", r"\boxed{[1,2]}"), ("1000", r"\boxed{100}"), (r"y=2x+1", r"\boxed{y = 2x - 1}"),
    (r"\infty", r"\boxed{-\infty}"),
    ("2,3", r"\boxed{2, 4}"), (r"\frac{7}{2}", r"\boxed{2/7}"),
]


def test_math_has_at_least_fifty_cases():
    assert len(MATH_EQUIVALENT) + len(MATH_DIFFERENT) >= 50


@pytest.mark.parametrize("gold,completion", MATH_EQUIVALENT)
def test_math_equivalent(gold, completion):
    assert rewards.math(["q"], [completion], answer=[gold]) == [1.0]


@pytest.mark.parametrize("gold,completion", MATH_DIFFERENT)
def test_math_different(gold, completion):
    assert rewards.math(["q"], [completion], answer=[gold]) == [0.0]


def test_math_gold_column_abstention_and_bad_gold():
    got = rewards.math(["q", "q"], [r"\boxed{2}", r"\boxed{2}"], solution=["2", None], gold_column="solution")
    assert got == [1.0, None]
    with pytest.raises(ValueError, match=r"sample 0: math-verify cannot read the gold answer in column 'answer'"):
        rewards.math(["q"], [r"\boxed{2}"], answer=[""])


def test_math_in_a_thread_runs_without_signals():
    """math-verify's SIGALRM timeouts only work in a main thread; the reward must still work elsewhere."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(rewards.math, ["q"], [r"\boxed{\frac{1}{2}}"], answer=["0.5"]).result() == [1.0]


# ------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("completion,kwargs,score", [
    ("<think>2+2=4</think><answer>4</answer>", {}, 1.0),
    ("  <think>\nstep\n</think>\n\n<answer>4</answer>\n", {}, 1.0),
    ("<think></think><answer></answer>", {}, 1.0),
    ("<answer>4</answer><think>x</think>", {}, 0.0),                       # wrong order
    ("<think>x</think>", {}, 0.0),                                         # missing block
    ("Sure! <think>x</think><answer>4</answer>", {}, 0.0),                 # text outside, strict
    ("Sure! <think>x</think> so <answer>4</answer> done", {"strict": False}, 1.0),
    ("<think>x</think><answer>4</answer><answer>5</answer>", {}, 0.0),     # a second answer block
    ("<think><think>x</think><answer>4</answer>", {}, 0.0),                # nested opening tag
    ("x</think><answer>4</answer>", {"prefix": "<think>"}, 1.0),           # the template opened <think>
    ("<reasoning>r</reasoning><solution>s</solution>", {"tags": ["reasoning", "solution"]}, 1.0),
    ("<think>x</think><answer>4</answer>", {"tags": ["answer"]}, 0.0),
    ("ANSWER: 42", {"pattern": r"ANSWER: \d+"}, 1.0),
    ("ANSWER: 42!", {"pattern": r"ANSWER: \d+"}, 0.0),
    ([{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}], {}, 1.0),
])
def test_format(completion, kwargs, score):
    assert rewards.format(["q"], [completion], **kwargs) == [score]


def test_format_rejects_bad_tags():
    with pytest.raises(ValueError, match="tags must be a non-empty list"):
        rewards.format(["q"], ["x"], tags=["a b"])


# ------------------------------------------------------------------------------------------ overlong
@pytest.mark.parametrize("length,expected", [(0, 0.0), (60, 0.0), (61, -0.025), (70, -0.25), (80, -0.5), (99, -0.975),
                                             (100, -1.0), (101, -1.0), (5000, -1.0)])
def test_overlong_matches_dapo(length, expected):
    """L_max = 100, L_cache = 40: 0 up to 60 tokens, a linear ramp to -1 at 100, -1 beyond."""
    got = rewards.overlong(["q"], ["text"], completion_ids=[[7] * length], max_length=100, cache_length=40)
    assert got == [pytest.approx(expected)]


def test_overlong_lengths_without_ids():
    assert rewards.length is rewards.overlong and rewards.get("length") is rewards.get("overlong")
    words = " ".join(["w"] * 70)
    assert rewards.overlong(["q"], [words], max_length=100, cache_length=40) == [pytest.approx(-0.25)]


def test_overlong_with_a_tokenizer(tmp_path):
    """Without completion_ids, |y| comes from re-tokenizing with the named tokenizer (here: one token per character)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("0123456789+=#\n "))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    text = "1+2=3\n#### 3"                                  # 12 characters = 12 tokens, but 3 words
    got = rewards.overlong(["q"], [text], tokenizer=str(tmp_path / "tok"), max_length=14, cache_length=4)
    assert got == [pytest.approx(-0.5)]                     # (10 - 12) / 4
    assert rewards.overlong(["q"], [text], max_length=14, cache_length=4) == [0.0]   # the word-count fallback


def test_overlong_checks_settings_and_ids():
    with pytest.raises(ValueError, match="cache_length <= max_length"):
        rewards.overlong(["q"], ["x"], max_length=10, cache_length=20)
    with pytest.raises(ValueError, match="1 completion_ids for 2 completions"):
        rewards.overlong(["q", "q"], ["x", "y"], completion_ids=[[1]])


# ------------------------------------------------------------------------------------------ exact
def test_exact_keeps_its_behaviour():
    assert rewards.exact(["q"] * 3, ["#### 5", "5", "#### 05"], answer=["5", "#### 5", "5"]) == [1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------ code
@pytest.mark.xdist_group("sandbox")    # starts sandboxes: see tests/test_sandbox.py
def test_code_reward_fraction_of_asserts():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    completions = ["Here you go:\n```python\ndef add(a, b):\n    return a + b\n```",
                   "def add(a, b):\n    return abs(a) + b",
                   "```python\ndef add(a, b) return\n```",              # syntax error
                   "no code"]
    got = rewards.code(["p"] * 4, completions, tests=[tests] * 4)
    assert got == [pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0, 0.0]


@pytest.mark.xdist_group("sandbox")    # starts sandboxes: see tests/test_sandbox.py
def test_code_reward_abstains_and_checks_columns():
    assert rewards.code(["p", "p"], ["x = 1", "x = 1"], tests=[None, []]) == [None, None]
    assert rewards.code(["p"], ["x = 1"], tests=["assert x == 1"]) == [1.0]          # one string = one test
    assert rewards.code(["p"], ["x = 1"], cases=[["assert x == 2"]], tests_column="cases") == [0.0]
    with pytest.raises(KeyError, match="reads column 'tests'"):
        rewards.code(["p"], ["x = 1"], test_list=[["assert x"]])
    with pytest.raises(TypeError, match="sample 0: column 'tests' must hold a list of test strings"):
        rewards.code(["p"], ["x = 1"], tests=[[1, 2]])


@pytest.mark.parametrize("text,code", [
    ("```python\na = 1\n```", "a = 1\n"),
    ("```py\na = 1\n```\ntext\n```python3\nb = 2\n```", "a = 1\n\nb = 2\n"),
    ("```\na = 1\n```", "a = 1\n"),
    ("```text\nnot code\n```\n```python\na = 1\n```", "a = 1\n"),
    ("```python\na = 1\nb = 2", "a = 1\nb = 2"),                          # cut off before the closing fence
    ("a = 1", "a = 1"),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


# ------------------------------------------------------------------------------------------ lookup
def test_lookup_by_name_module_and_file(tmp_path):
    assert rewards.get("gsm8k") is rewards.gsm8k
    assert rewards.get("posttrain.rewards.numeric:gsm8k") is rewards.gsm8k
    path = tmp_path / "my_reward.py"
    path.write_text("def brevity(completions, **kwargs):\n    return [-len(c) / 100 for c in completions]\n")
    fn = rewards.get(f"{path}:brevity")
    assert fn(prompts=["q"], completions=["abcd"]) == [-0.04]
    assert rewards.get(f"{path}:brevity") is fn                     # the file is imported once


def test_lookup_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match=r"unknown reward 'nope'; registered: code, exact, format, gsm8k"):
        rewards.get("nope")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module'"):
        rewards.get("no_such_module:fn")
    with pytest.raises(FileNotFoundError, match="file 'missing.py' not found"):
        rewards.get("missing.py:fn")
    path = tmp_path / "r.py"
    path.write_text("def good(completions, **kw):\n    return [0.0]\n")
    with pytest.raises(AttributeError, match="has no function 'bad'; its functions: good"):
        rewards.get(f"{path}:bad")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="reward 'gsm8k' is already registered"):
        rewards.register("gsm8k")(lambda prompts, completions, **kw: [])


# ------------------------------------------------------------------------------------------ CLI
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_rewards_check_reports_the_distribution(tmp_path, capsys):
    from posttrain.cli import main

    data = _write_jsonl(tmp_path / "d.jsonl", [
        {"question": "q1", "answer": "#### 4", "completion": "#### 4"},
        {"question": "q2", "answer": "#### 5", "completion": "#### 6"},
        {"question": "q3", "answer": None, "completion": "#### 6"},
        {"question": "q4", "answer": "unknown", "completion": "#### 6"},
    ])
    assert main(["rewards", "check", "gsm8k", "--data", str(data), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["count"], s["scored"], s["abstained"], s["errors"]) == (4, 2, 1, 1)
    assert s["mean"] == 0.5 and s["histogram"] == [[0.0, 1], [1.0, 1]]
    assert "has no number" in s["error_messages"][0][0]

    assert main(["rewards", "check", "gsm8k", "--data", str(data), "--gold", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"reward gsm8k: 2 completions, 2 scored, 0 abstained, 0 errors", out)
    assert re.search(r"mean 1\.0000", out)


def test_cli_rewards_check_settings_and_errors(tmp_path, capsys):
    from posttrain.cli import main

    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "<think>a</think>!<answer>b</answer>"}])
    assert main(["rewards", "check", "format", "kwargs.strict=false", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean"] == 1.0
    assert main(["rewards", "check", "format", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean"] == 0.0
    assert main(["rewards", "check", "format", "--data", str(data), "--column", "nope"]) == 2
    assert "has no column 'nope'" in capsys.readouterr().err
    assert main(["rewards", "check", "format", "kwargs.strictt=false", "--data", str(data)]) == 2
    assert "kwargs.strictt: not a setting of reward 'format'" in capsys.readouterr().err


def test_cli_rewards_check_on_gsm8k_gold(capsys):
    from posttrain.cli import main

    gsm8k_test_rows()
    assert main(["rewards", "check", "gsm8k", "--data", str(GSM8K / "test.jsonl"), "--gold", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["count"], s["mean"], s["errors"]) == (1319, 1.0, 0)


@pytest.mark.parametrize("argv", [["rewards", "--help"], ["rewards", "check", "--help"]])
def test_cli_rewards_help(argv, capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "check" in capsys.readouterr().out


def test_steps_verifies_every_line_of_an_arithmetic_chain():
    """`steps` takes chat or text prompts, rejects a right answer reached through a wrong step, a skipped step or a
    reordered chain, and names the row whose prompt is not a chain."""
    from posttrain.rewards import steps
    from posttrain.tasks.arithmetic import ArithmeticConfig, generate

    rows = generate(ArithmeticConfig(digits=1, num_ops=3, num_examples=20))
    chat = [[{"role": "user", "content": r["question"]}] for r in rows]
    assert steps(chat, [r["solution"] for r in rows], answer=[r["answer"] for r in rows]) == [1.0] * 20
    q = [{"role": "user", "content": "What is 7 - 8 + 1?"}]
    cases = {"7-8=-1\n-1+1=0\n#### 0": 1.0,        # the gold chain
             "7-8=-1\n-1+1=0\n#### 0\n": 1.0,      # trailing whitespace
             "7-8=0\n0+1=0\n#### 0": 0.0,          # right answer, two wrong steps
             "7-8=-1\n#### 0": 0.0,                # a step skipped
             "7+1=8\n8-8=0\n#### 0": 0.0,          # operations reordered
             "7-8=-1\n-1+1=0\n#### 1": 0.0}        # a wrong final answer
    assert steps([q] * len(cases), list(cases), answer=["0"] * len(cases)) == list(cases.values())
    with pytest.raises(ValueError, match=r"reward 'steps': row 1: the prompt has no arithmetic chain"):
        steps(["What is 2 + 3?", "Name a colour."], ["#### 5", "red"], answer=["5", "red"])


def _modules_with_doctests() -> list[str]:
    import doctest
    import importlib
    import pkgutil

    names = [f"posttrain.rewards.{m.name}" for m in pkgutil.iter_modules(rewards.__path__)]
    return [n for n in names if any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(n)))]


@pytest.mark.parametrize("module", _modules_with_doctests())
def test_doctests(module):
    """The reward modules' doctests, under their installed name posttrain.rewards.* (pytest's --doctest-modules would
    import the top-level rewards/ directory as a second package `rewards`)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctests of {module} failed (output above)"
