"""Reward execution: RewardSpec, loading, concurrency, timeouts, failure reports and on_error, combining, metrics."""
from __future__ import annotations

import asyncio
import math
import os
import textwrap
import time

import pytest

from posttrain.configlib import ConfigError
from posttrain.rewarding import (
    Reward,
    RewardError,
    RewardSpec,
    build_reward_specs,
    combine,
    load_rewards,
    reward_metrics,
    score_batch,
)

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["#### 1", "#### 2", "#### 3", "#### 4"]
COLUMNS = {"answer": ["1", "2", "0", "0"]}


def make(fn, **spec) -> Reward:
    """A Reward around an in-test function (bypassing the name lookup), as load_rewards would build it."""
    from posttrain.rewarding.loading import _check_settings, _executor

    s = RewardSpec(name=spec.pop("name", fn.__name__), **spec)
    return Reward(s, fn, s.alias or fn.__name__, _executor(fn, s), _check_settings(fn, s, "test", "test"))


def run(*rewards_, **kw):
    return score_batch(list(rewards_), PROMPTS, COMPLETIONS, COLUMNS, **kw)


# ------------------------------------------------------------------------------------------ spec and loading
def test_spec_from_a_recipe_list():
    specs = build_reward_specs(["gsm8k", {"name": "format", "weight": 0.1, "kwargs": {"tags": ["think", "answer"]},
                                          "on_error": "zero", "timeout": 5}])
    assert specs[0] == RewardSpec("gsm8k")
    assert specs[0].weight == 1.0 and specs[0].on_error == "raise" and specs[0].kwargs == {}
    assert specs[1].kwargs == {"tags": ["think", "answer"]} and specs[1].on_error == "zero" and specs[1].timeout == 5.0


@pytest.mark.parametrize("raw,message", [
    ({"name": "gsm8k", "wieght": 1},
     r"rewards.0.wieght: unknown key; allowed keys here: alias, executor, factory, kwargs"),
    ({"name": "gsm8k", "on_error": "ignore"},
     r"rewards.0.on_error: got 'ignore' \(str\); allowed: 'raise', 'zero', 'none'"),
    ({"name": "gsm8k", "weight": "nan"}, r"rewards.0.weight: must be a finite number"),
    ({"name": "gsm8k", "timeout": 0}, r"rewards.0.timeout: must be > 0 seconds or null"),
    ({"name": "gsm8k", "alias": "a/b"}, r"rewards.0.alias: letters, digits"),
    ({"weight": 1.0}, r"rewards.0.name: required value missing"),
])
def test_spec_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_reward_specs([raw])


def test_load_resolves_and_checks(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def brevity(completions, **kwargs):\n    return [0.0] * len(completions)\n"
                    "def no_completions(prompts):\n    return []\n")
    rs = load_rewards(build_reward_specs(["gsm8k", "math", f"{path}:brevity",
                                          {"name": "gsm8k", "alias": "gsm8k_strict", "kwargs": {"abs_tol": 0.0}}]))
    assert [r.label for r in rs] == ["gsm8k", "math", "brevity", "gsm8k_strict"]
    assert [r.executor for r in rs] == ["thread", "process", "thread", "thread"]
    with pytest.raises(ConfigError, match=r"rewards.1: two rewards would both be logged as 'gsm8k'; give one an alias"):
        load_rewards(build_reward_specs(["gsm8k", "gsm8k"]))
    with pytest.raises(ConfigError, match=r"rewards.0.name: unknown reward 'gsm9k'; registered: code, exact"):
        load_rewards(build_reward_specs(["gsm9k"]))
    with pytest.raises(ConfigError, match=r"rewards.0.kwargs.gold_colum: not a setting of reward 'gsm8k'; "
                                          r"its settings: abs_tol, gold_column, partial, rel_tol"):
        load_rewards(build_reward_specs([{"name": "gsm8k", "kwargs": {"gold_colum": "x"}}]))
    with pytest.raises(ConfigError, match=r"must accept `completions` by keyword"):
        load_rewards(build_reward_specs([f"{path}:no_completions"]))


# ------------------------------------------------------------------------------------------ calling convention
def test_trl_style_functions_run_unchanged():
    seen = {}

    def accuracy(completions, answer, **kwargs):                  # TRL: no `prompts` parameter, columns by name
        seen.update(kwargs)
        return [1.0 if c.endswith(a) else 0.0 for c, a in zip(completions, answer)]

    batch = score_batch([make(accuracy)], PROMPTS, COMPLETIONS, COLUMNS, completion_ids=[[1], [2], [3], [4]])
    assert batch.values["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert seen["prompts"] == PROMPTS and seen["completion_ids"] == [[1], [2], [3], [4]]


def test_functions_without_kwargs_get_only_what_they_name():
    def strict(prompts, completions):
        return [0.5] * len(completions)

    assert run(make(strict)).values["strict"] == [0.5] * 4


def test_settings_are_bound_and_clashes_reported():
    def scaled(completions, *, scale=1.0, answer=None, **kwargs):
        return [scale] * len(completions)

    assert run(make(scaled, kwargs={"scale": 3.0})).values["scaled"] == [3.0] * 4
    with pytest.raises(RewardError,
                       match=r"reward 'scaled': the name 'answer' is both a data column and a reward argument"):
        run(make(scaled, kwargs={"answer": 1}))
    with pytest.raises(ConfigError,
                       match=r"kwargs.scal: not a setting of reward 'scaled'; its settings: answer, scale"):
        make(scaled, kwargs={"scal": 1})


# ------------------------------------------------------------------------------------------ failures and on_error
def raises(completions, **kwargs):
    raise ValueError("gold answer unreadable")


def nan_at_2(completions, **kwargs):
    return [1.0, 1.0, float("nan"), 1.0]


def wrong_length(completions, **kwargs):
    return [1.0, 1.0, 1.0]


def scalar(completions, **kwargs):
    return 1.0


def text_value(completions, **kwargs):
    return [1.0, "yes", 1.0, 1.0]


def inf_at_0(completions, **kwargs):
    return [float("inf"), 1.0, 1.0, 1.0]


@pytest.mark.parametrize("fn,message", [
    (raises, r"reward 'raises': raised ValueError: gold answer unreadable \(at .*test_reward_exec.py:\d+ in raises\)"),
    (nan_at_2, r"reward 'nan_at_2' at sample 2: returned nan, expected a finite number or None"),
    (inf_at_0, r"reward 'inf_at_0' at sample 0: returned inf, expected a finite number or None"),
    (wrong_length, r"reward 'wrong_length': returned 3 values for 4 completions \(expected one per completion\)"),
    (scalar, r"reward 'scalar': returned float 1.0, expected a list of 4 values, one per completion \(a single value "
             r"is never broadcast\)"),
    (text_value, r"reward 'text_value' at sample 1: returned str 'yes', expected a number or None"),
])
def test_failures_raise_by_default_with_specific_messages(fn, message):
    with pytest.raises(RewardError, match=message):
        run(make(fn))


@pytest.mark.parametrize("on_error,fill", [("zero", 0.0), ("none", None)])
def test_on_error_for_a_failed_call_fills_the_batch(on_error, fill, caplog):
    batch = run(make(raises, on_error=on_error), make(lambda completions, **k: [1.0] * 4, alias="ok"))
    assert batch.values["raises"] == [fill] * 4 and batch.values["ok"] == [1.0] * 4
    assert [e.reward for e in batch.errors] == ["raises"] and batch.errors[0].index is None
    assert "gold answer unreadable" in caplog.text and f"on_error={on_error}" in caplog.text
    assert reward_metrics(batch)["reward/raises/errors"] == 1.0


@pytest.mark.parametrize("on_error,fill", [("zero", 0.0), ("none", None)])
def test_on_error_for_a_bad_value_fills_only_that_sample(on_error, fill):
    batch = run(make(nan_at_2, on_error=on_error))
    assert batch.values["nan_at_2"] == [1.0, 1.0, fill, 1.0]
    assert [(e.reward, e.index) for e in batch.errors] == [("nan_at_2", 2)]


def test_every_raising_reward_is_named():
    with pytest.raises(RewardError, match=r"reward 'raises'.*\(and 1 more: reward 'wrong_length': returned 3 values"):
        run(make(raises), make(wrong_length))


# ------------------------------------------------------------------------------------------ timeouts
def test_thread_timeout_is_reported_and_abandoned():
    def slow(completions, **kwargs):
        time.sleep(3)
        return [1.0] * len(completions)

    start = time.monotonic()
    with pytest.raises(RewardError, match=r"reward 'slow': timed out after 0.3s on a batch of 4 completions; "
                                          r"its thread is abandoned"):
        run(make(slow, timeout=0.3))
    assert time.monotonic() - start < 2.5
    batch = run(make(slow, timeout=0.3, on_error="zero"))
    assert batch.values["slow"] == [0.0] * 4 and "timed out" in str(batch.errors[0])


def test_async_functions_are_awaited_with_a_timeout():
    async def judge(completions, answer, **kwargs):
        await asyncio.sleep(0.01)
        return [1.0 if c.endswith(a) else 0.0 for c, a in zip(completions, answer)]

    async def hangs(completions, **kwargs):
        await asyncio.sleep(30)

    r = make(judge)
    assert r.executor == "async"
    assert run(r).values["judge"] == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match=r"reward 'hangs': timed out after 0.2s"):
        run(make(hangs, timeout=0.2))


def test_score_batch_works_inside_a_running_event_loop():
    async def main():
        return score_batch([make(nan_at_2, on_error="none")], PROMPTS, COMPLETIONS, COLUMNS)

    assert asyncio.run(main()).values["nan_at_2"] == [1.0, 1.0, None, 1.0]


@pytest.fixture
def user_rewards(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(textwrap.dedent("""
        import os, time
        def spin(completions, **kwargs):
            while True:
                pass
        def pid(completions, **kwargs):
            return [float(os.getpid())] * len(completions)
        def crash(completions, **kwargs):
            os._exit(3)
        def boom(completions, **kwargs):
            return [1 / 0]
        async def later(completions, **kwargs):
            return [2.0] * len(completions)
    """))
    return path


def test_process_executor_runs_kills_and_respawns(user_rewards):
    pid_reward, spin = load_rewards(build_reward_specs([
        {"name": f"{user_rewards}:pid", "executor": "process"},
        {"name": f"{user_rewards}:spin", "executor": "process", "timeout": 1.0, "on_error": "none"}]))
    try:
        first = run(pid_reward).values["pid"][0]
        assert first != os.getpid() and run(pid_reward).values["pid"][0] == first      # one persistent worker
        batch = run(spin)
        assert batch.values["spin"] == [None] * 4 and "timed out after 1.0s" in str(batch.errors[0])
        worker = spin.worker
        assert worker.dead and worker._proc.poll() is not None                          # the runaway was killed
        run(spin)
        assert spin.worker is not worker                                               # and replaced
    finally:
        pid_reward.close()
        spin.close()


def test_process_executor_reports_crashes_and_exceptions(user_rewards):
    crash, boom, later = load_rewards(build_reward_specs([
        {"name": f"{user_rewards}:crash", "executor": "process"},
        {"name": f"{user_rewards}:boom", "executor": "process"},
        {"name": f"{user_rewards}:later", "executor": "process"}]))
    try:
        with pytest.raises(RewardError, match=r"reward 'crash': its worker process died \(exit code 3\)"):
            run(crash)
        with pytest.raises(RewardError, match=r"reward 'boom': raised ZeroDivisionError: division by zero \(at .*"
                                              r"user_rewards.py:\d+ in boom\) \(in its worker process\)"):
            run(boom)
        assert run(later).values["later"] == [2.0] * 4
    finally:
        for r in (crash, boom, later):
            r.close()


# ------------------------------------------------------------------------------------------ concurrency
def test_thread_rewards_run_in_parallel():
    spans = {}

    def sleeper(name):
        def fn(completions, **kwargs):
            start = time.monotonic()
            time.sleep(0.5)
            spans[name] = (start, time.monotonic())
            return [1.0] * len(completions)
        fn.__name__ = name
        return fn

    run(make(sleeper("a")), make(sleeper("b")), make(sleeper("c")))
    starts, ends = [s for s, _ in spans.values()], [e for _, e in spans.values()]
    assert max(starts) < min(ends), f"the calls did not overlap: {spans}"


def test_async_rewards_run_concurrently():
    spans = {}

    def sleeper(name):
        async def fn(completions, **kwargs):
            start = time.monotonic()
            await asyncio.sleep(0.5)
            spans[name] = (start, time.monotonic())
            return [1.0] * len(completions)
        fn.__name__ = name
        return fn

    run(make(sleeper("a")), make(sleeper("b")))
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans


def test_process_and_thread_rewards_overlap(tmp_path):
    path = tmp_path / "sleepy.py"
    path.write_text("import time\ndef sleepy(completions, **kwargs):\n    start = time.time()\n    time.sleep(1.0)\n"
                    "    return [start, time.time(), 0.0, 0.0]\n")
    marks = {}

    def local(completions, **kwargs):
        marks["start"] = time.time()
        time.sleep(1.0)
        marks["end"] = time.time()
        return [0.0] * len(completions)

    (proc,) = load_rewards(build_reward_specs([{"name": f"{path}:sleepy", "executor": "process"}]))
    try:
        run(proc)                                       # start the worker first, so only the calls are timed
        values = run(proc, make(local)).values["sleepy"]
    finally:
        proc.close()
    assert max(values[0], marks["start"]) < min(values[1], marks["end"]), (values, marks)


# ------------------------------------------------------------------------------------------ combining and metrics
def test_combine_with_weights_and_abstentions():
    values = {"a": [1.0, None, 0.0, None], "b": [1.0, 1.0, None, None]}
    weights = {"a": 1.0, "b": 0.5}
    assert combine(values, weights) == [1.5, 0.5, 0.0, 0.0]


def test_batch_total_and_metrics():
    def a(completions, **kwargs):
        return [1.0, 0.0, None, 1.0]

    def b(completions, **kwargs):
        return [0.5, 0.5, 1.0, None]

    batch = run(make(a, weight=2.0), make(b, weight=-1.0))
    assert batch.total == [1.5, -0.5, -1.0, 2.0]
    m = reward_metrics(batch)
    assert m["reward/a/mean"] == pytest.approx(2 / 3) and m["reward/a/std"] == pytest.approx(math.sqrt(2) / 3)
    assert m["reward/a/abstained"] == 0.25 and m["reward/b/abstained"] == 0.25
    assert m["reward/b/mean"] == pytest.approx(2 / 3) and m["reward/b/std"] == pytest.approx(math.sqrt(2) / 6)
    assert m["reward/mean"] == pytest.approx(0.5) and m["reward/std"] == pytest.approx(math.sqrt(1.625))
    assert m["reward/a/errors"] == 0.0 and m["reward/a/seconds"] >= 0.0


def test_builtins_through_the_executor():
    rs = load_rewards(build_reward_specs([
        {"name": "gsm8k", "weight": 1.0},
        {"name": "format", "weight": 0.1, "kwargs": {"tags": ["answer"], "strict": False}},
        {"name": "math", "alias": "math_eq", "kwargs": {"gold_column": "answer"}, "executor": "thread"},
        {"name": "overlong", "weight": 0.5, "kwargs": {"max_length": 4, "cache_length": 2}}]))
    batch = score_batch(rs, ["q", "q"], ["<answer>#### 18</answer>", r"\boxed{17}"], {"answer": ["#### 18", "18"]},
                        completion_ids=[[1, 2, 3], [1, 2, 3, 4, 5]])
    assert batch.values == {"gsm8k": [1.0, 0.0], "format": [1.0, 0.0], "math_eq": [1.0, 0.0], "overlong": [-0.5, -1.0]}
    assert batch.total == [pytest.approx(1.0 + 0.1 + 1.0 - 0.25), pytest.approx(-0.5)]
    assert set(reward_metrics(batch)) >= {"reward/gsm8k/mean", "reward/format/std", "reward/math_eq/mean",
                                          "reward/overlong/std", "reward/mean", "reward/std"}


def test_batch_shape_is_checked():
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 4 completions"):
        score_batch([make(nan_at_2)], PROMPTS, COMPLETIONS, {"answer": ["1", "2"]})
    with pytest.raises(ValueError, match="3 prompts for 4 completions"):
        score_batch([make(nan_at_2)], PROMPTS[:3], COMPLETIONS)


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluation_verifies_through_the_executor(tmp_path):
    """`posttrain eval` and in-training evaluation score with score_batch: TRL's call shape (messages for
    conversational data, text otherwise; completion_ids), validation of the values, errors naming the reward."""
    from posttrain.config import EvalConfig
    from posttrain.data import DataConfig, to_examples
    from posttrain.evaluation import verdicts
    from posttrain.rollout.base import Completion

    path = tmp_path / "verifiers.py"
    path.write_text(textwrap.dedent("""
        SEEN = {}
        def echo(prompts, completions, answer, completion_ids, **kwargs):
            SEEN.update(prompts=prompts, completions=completions, ids=completion_ids, columns=sorted(kwargs))
            return [1.0 if str(a) in str(c) else 0.0 for c, a in zip(completions, answer)]
        def nan(completions, **kwargs):
            return [float("nan")] * len(completions)
        """))
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "completion": "2", "source_id": 7},
            {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4", "completion": "4", "source_id": 8}]
    chat = to_examples(rows, {"prompt": "prompt", "answer": "answer"}, DataConfig(source="x"))
    plain = to_examples([{**r, "prompt": r["prompt"][0]["content"]} for r in rows], {"prompt": "prompt"},
                        DataConfig(source="x"))
    outs = [Completion([5, 6], "2", [0.0, 0.0], "stop"), Completion([7], "5", [0.0], "stop")]
    cfg = EvalConfig(reward=f"{path}:echo")
    assert verdicts(cfg, chat, outs) == [1.0, 0.0]
    import sys
    seen = next(m for n, m in sys.modules.items() if n.startswith("posttrain_user_reward_verifiers")).SEEN
    assert seen["prompts"] == [r["prompt"] for r in rows]
    assert seen["completions"] == [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "5"}]]
    assert seen["ids"] == [[5, 6], [7]] and seen["columns"] == ["source_id"]       # prompt / completion are not columns
    assert verdicts(cfg, plain, outs) == [1.0, 0.0]
    assert seen["prompts"] == ["1+1?", "2+2?"] and seen["completions"] == ["2", "5"]
    with pytest.raises(RewardError, match=r"reward 'nan' at sample 0: returned nan, expected a finite number"):
        verdicts(EvalConfig(reward=f"{path}:nan"), plain, outs)
    with pytest.raises(ConfigError, match=r"eval: stages.1.eval.reward.name: unknown reward 'nope'"):
        verdicts(EvalConfig(reward="nope"), plain, outs, "stages.1.eval")
