"""Every branch of every reward, on hand-written responses; dispatch; the fault-tolerant executor."""

from __future__ import annotations

import time

import pytest

from megarl.rewards import compute_score, reward_name
from megarl.rewards.executor import RewardExecutor, RewardRequest
from tests.unit.reward_helpers import bad_returns, deaf_hang, sleepy_or_real

KK_TRUTH = {"solution_text_format": "(1) Zoey is a knight\n(2) Oliver is a knave"}
GOOD = "Zoey tells the truth, so Oliver lies.</think>\n<answer> (1) Zoey is a knight\n(2) Oliver is a knave </answer>"


def kk(text):
    return compute_score("kk_logic", text, KK_TRUTH)


@pytest.mark.parametrize("text,score,level", [
    (GOOD, 3.0, 1),                                                                         # right
    ("<think>x</think><answer>(1) Zoey is a knave\n(2) Oliver is a knave</answer>", -0.5, 2),  # wrong roles
    ("<think>x</think><answer>Zoey is a knight.</answer>", -1.0, 3),                      # one role for two people
    ("<think>x</think><answer>Zoey: knight, Oliver: knave</answer>", -1.0, 3),            # unparseable phrasing
    ("<think>x</think><answer>  </answer>", -1.0, 4),                                     # format ok, empty answer
    ("<think>x</think> no answer tags at all", -3.0, 4),                                  # tags missing
    (GOOD + "<answer>(1) Zoey is a knight</answer>", -3.0, 4),                            # two answers
    ("<think>x<answer>(1) Zoey is a knight\n(2) Oliver is a knave</answer></think>", -3.0, 4),  # wrong order
    ("<think><think>x</think><answer>(1) Zoey is a knight\n(2) Oliver is a knave</answer>", -3.0, 4),  # 2 <think>
])
def test_kk_every_branch(text, score, level):
    r = kk(text)
    assert (r["score"], r["level"], r["acc"]) == (score, level, level == 1)


def test_kk_same_score_with_or_without_the_prompts_think():
    own = kk("<think>" + GOOD)          # the response opens its own <think>
    supplied = kk(GOOD)                  # the prompt ended with <think>
    with_header = kk("<|im_start|>assistant\n<think>" + GOOD)
    assert own == supplied == with_header and own["level"] == 1


def test_kk_does_not_cut_at_an_assistant_the_model_wrote():
    """The response alone (what the trainer passes): an "Assistant:" after the answer is the model's own text."""
    assert kk(GOOD + "\nAssistant: done")["level"] == 1


def test_kk_names_are_matched_as_words():
    truth = {"solution_text_format": "(1) Ava is a knight\n(2) Avan is a knave"}
    r = compute_score("kk_logic", "x</think><answer>(1) Avan is a knave (2) Ava is a knight</answer>", truth)
    assert r["level"] == 1


@pytest.mark.parametrize("text,gt,method,score,pred", [
    ("So the total is #### 1,234", "1234", "strict", 1.0, "1234"),
    ("So the total is #### 1234", "1,234", "strict", 1.0, "1234"),     # the ground truth's commas go too
    ("#### 12\nthen #### 13", "13", "strict", 0.0, "12"),          # strict takes the FIRST marker
    ("The answer is 42.", "42", "strict", 0.0, None),               # no marker
    ("#### $-7", "-7", "strict", 0.0, None),                        # '$' before the number: no match
    ("First 3 apples, then 4, so 7.", "7", "flexible", 0.0, "7."),  # upstream quirk: the trailing "." stays
    ("I got 3 then 1,000", "1000", "flexible", 1.0, "1000"),
    ("no digits here", "5", "flexible", 0.0, None),
])
def test_gsm8k_branches(text, gt, method, score, pred):
    r = compute_score("openai/gsm8k", text, gt, gsm8k_method=method)
    assert (r["score"], r["pred"]) == (score, pred)
    assert r["acc"] == (score == 1.0)


@pytest.mark.parametrize("text,gt,acc,judge", [
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "string"),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True, "string"),             # dfrac, shorthand
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "string"),                   # Hendrycks special case
    ("\\boxed{x = 3}", "3", True, "string"),                            # short lhs dropped
    ("\\boxed{5 \\text{ cm}}", "5", True, "string"),                    # units
    ("\\boxed{6 \\text{ cm} \\text{ and } 8}", "6", False, None),       # two \text{: not a unit, not cut
    ("\\boxed{50\\%}", "50", True, "string"),                          # escaped percent stripped (Hendrycks)
    ("\\boxed{50%}", "50", True, "math_verify"),                         # a plain % is not: math-verify decides
    ("first \\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}", True, "string"),  # last box, nested braces
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True, "math_verify"),          # only math-verify sees this
    ("\\boxed{0.25}", "\\frac{1}{4}", True, "math_verify"),
    ("\\boxed{3}", "4", False, None),
    ("the answer is 3", "3", False, None),                              # no box
    ("\\boxed{3", "3", False, None),                                    # unbalanced
])
def test_math_boxed_branches(text, gt, acc, judge):
    r = compute_score("DigitalLearningGmbH/MATH-lighteval", text, gt)
    assert (r["acc"], r["judge"], r["score"]) == (acc, judge, 1.0 if acc else 0.0)


def test_math_ground_truth_may_carry_a_box_and_math_verify_can_be_off():
    assert compute_score("lighteval/MATH", "\\boxed{7}", "so \\boxed{7}")["acc"]
    assert compute_score("HuggingFaceH4/MATH-500", "\\boxed{\\frac12}", "\\frac{1}{2}")["acc"]  # MATH-500 source
    assert not compute_score("lighteval/MATH", "\\boxed{\\sqrt{8}}", "2\\sqrt{2}", use_math_verify=False)["acc"]


@pytest.mark.parametrize("text,gt,score,pred", [
    ("...\nAnswer: 540", "540", 1.0, "540"),
    ("Answer: $\\boxed{540}$", "540", 1.0, "540"),
    ("Answer: x = 540", "540", 1.0, "540"),
    ("Answer: 540 degrees", "540", 1.0, "540"),
    ("Answer: 1,000", "1000", 1.0, "1000"),
    ("answer : \\frac12", "\\frac{1}{2}", 1.0, "\\frac{1}{2}"),
    ("Answer: 3\nlater... Answer: 541", "540", -1.0, "541"),             # the last Answer line counts
    ("I think it is 540.", "540", -1.0, "[INVALID]"),
    ("Answer: 540" + "\n" + "x" * 400, "540", -1.0, "[INVALID]"),        # only the last 300 characters are read
])
def test_math_dapo_branches(text, gt, score, pred):
    r = compute_score("math_dapo", text, gt)
    assert (r["score"], r["pred"], r["acc"]) == (score, pred, score == 1.0)


def test_dispatch_by_data_source():
    assert [reward_name(s) for s in ("kk_logic", "openai/gsm8k", "lighteval/MATH", "math_dapo", "aime2025",
                                     "amc_23")] == ["kk", "gsm8k", "math", "math_dapo", "math_dapo", "math_dapo"]
    with pytest.raises(ValueError, match=r"no reward for data_source 'squad'; known: kk_logic, openai/gsm8k"):
        compute_score("squad", "x", "y")


def test_executor_scores_in_order_and_counts_errors():
    reqs = [RewardRequest("math_dapo", "Answer: 5", "5"), RewardRequest("kk_logic", GOOD, {}),   # KeyError inside
            RewardRequest("openai/gsm8k", "raise", "1"), RewardRequest("openai/gsm8k", "#### 1", "1")]
    with RewardExecutor(num_workers=2, timeout_s=20, score_fn=sleepy_or_real) as ex:
        results, stats = ex.score(reqs)
    assert [r["score"] for r in results] == [1.0, -3.0, 0.0, 1.0]
    assert results[1]["level"] == 4 and "KeyError" in results[1]["error"] and "boom" in results[2]["error"]
    assert stats == {"errors": 2, "timeouts": 0}
    local, local_stats = RewardExecutor(num_workers=0, score_fn=sleepy_or_real).score(reqs)
    assert [r["score"] for r in local] == [1.0, -3.0, 0.0, 1.0] and local_stats["errors"] == 2


def test_executor_per_call_timeout_keeps_the_batch_going():
    reqs = [RewardRequest("math_dapo", "sleep", "5"), RewardRequest("math_dapo", "Answer: 5", "5")]
    t = time.monotonic()
    with RewardExecutor(num_workers=1, timeout_s=1.0, score_fn=sleepy_or_real) as ex:
        results, stats = ex.score(reqs)
        assert time.monotonic() - t < 30
        assert [r["score"] for r in results] == [-1.0, 1.0] and stats == {"errors": 0, "timeouts": 1}
        again, _ = ex.score([RewardRequest("math_dapo", "Answer: 6", "6")])  # the same pool still works
        assert again[0]["acc"]


def test_executor_hard_deadline_kills_a_hang_that_ignores_signals():
    reqs = [RewardRequest("openai/gsm8k", "hang", "1"), RewardRequest("openai/gsm8k", "#### 1", "1")]
    t = time.monotonic()
    with RewardExecutor(num_workers=2, timeout_s=1.0, score_fn=deaf_hang) as ex:
        results, stats = ex.score(reqs)
        assert time.monotonic() - t < 30
        assert [r["score"] for r in results] == [0.0, 1.0] and stats["timeouts"] == 1
        assert ex._pool is None  # replaced: the stuck worker is gone
        assert ex.score([RewardRequest("openai/gsm8k", "#### 2", "2")])[0][0]["acc"]


def test_in_process_scoring_times_out_too():
    """reward.num_workers=0 (the demo, the tiny config): a reward that never returns costs one timeout, not the
    run (before: it hung forever)."""
    reqs = [RewardRequest("math_dapo", "sleep", "5"), RewardRequest("math_dapo", "Answer: 5", "5")]
    t = time.monotonic()
    results, stats = RewardExecutor(num_workers=0, timeout_s=1.0, score_fn=sleepy_or_real).score(reqs)
    assert time.monotonic() - t < 10 and stats == {"errors": 0, "timeouts": 1}
    assert [r["score"] for r in results] == [-1.0, 1.0]


@pytest.mark.parametrize("workers", [0, 1])
def test_what_is_not_a_finite_score_is_a_counted_failure(workers):
    texts = ["nan", "inf", "str", "none", "nodict", "num", "fine"]
    reqs = [RewardRequest("arithmetic", t, "1") for t in texts]
    with RewardExecutor(num_workers=workers, timeout_s=20, score_fn=bad_returns) as ex:
        results, stats = ex.score(reqs)
    assert stats == {"errors": 5, "timeouts": 0}
    assert [r["score"] for r in results] == [0.0] * 5 + [0.5, 1.0]
    assert "not a finite number" in results[0]["error"] and "returned str" in results[2]["error"]


def test_unknown_source_is_a_config_error_not_a_failed_answer():
    with pytest.raises(ValueError, match="no reward for data_source"):
        RewardExecutor(num_workers=0).score([RewardRequest("mystery", "x", "y")])


@pytest.mark.parametrize("text, gt, score", [
    ("7", "7", 1.0), ("It is 7.", "7", 1.0), ("8 - 1 = 7", "7", 1.0), ("7 or 8", "7", 0.0),
    ("The result is 12.", "12", 1.0), ("", "3", 0.0), ("three", "3", 0.0), ("0", "0", 1.0), ("-2", "2", 0.0),
])
def test_arithmetic_takes_the_last_integer(text, gt, score):
    from megarl.rewards import compute_score

    r = compute_score("arithmetic", text, gt)
    assert r["score"] == score and r["acc"] == (score == 1.0)


# TRPA levels of the answer-extraction rewards (docs/algorithms.md): 1 right, 2 wrong, 3 empty answer or no ground
# truth, 4 nothing extracted. Written out per source from the rule, not from the code's own output.
@pytest.mark.parametrize("source,text,gt,level", [
    ("arithmetic", "It is 12.", "12", 1),
    ("arithmetic", "7 + 5 = 13", "12", 2),
    ("arithmetic", "twelve", "12", 4),
    ("openai/gsm8k", "so #### 7", "7", 1),
    ("openai/gsm8k", "so #### 8", "7", 2),
    ("openai/gsm8k", "so #### 7", "", 3),                     # no ground truth
    ("openai/gsm8k", "the answer is 7", "7", 4),               # strict: no marker
    ("lighteval/MATH", "so $\\boxed{\\frac12}$", "\\frac{1}{2}", 1),
    ("lighteval/MATH", "so $\\boxed{3}$", "\\boxed{4}", 2),
    ("lighteval/MATH", "so $\\boxed{}$", "4", 3),              # empty box
    ("lighteval/MATH", "the answer is 4", "4", 4),             # no box
    ("math_dapo", "work\nAnswer: 34", "34", 1),
    ("math_dapo", "work\nAnswer: 35", "34", 2),
    ("math_dapo", "work\nAnswer: $$", "34", 3),                # an Answer line that normalises to nothing
    ("aime2024", "I think 34", "34", 4),
])
def test_answer_rewards_give_trpa_levels(source, text, gt, level):
    r = compute_score(source, text, gt)
    assert r["level"] == level and r["acc"] == (level == 1)


def test_levels_from_scores_for_custom_rewards():
    from megarl.rewards.levels import levels_from_scores

    # right answers level 1; the rest ranked by score, equal scores sharing a level; NaN last
    assert levels_from_scores([1.0, 0.0, 0.0, 1.0], [True, False, False, True]) == [1, 2, 2, 1]
    assert levels_from_scores([0.9, 0.2, 0.5, -1.0, 0.5], [True, False, False, False, False]) == [1, 3, 2, 4, 2]
    assert levels_from_scores([float("nan"), 0.1, 0.3], [False, False, False]) == [4, 3, 2]
    assert levels_from_scores([0.0, 0.0], [False, False]) == [2, 2]


def test_failed_answers_score_at_the_worst_level_for_every_builtin_source():
    executor = RewardExecutor(num_workers=0, score_fn=_raises)
    sources = ["kk_logic", "openai/gsm8k", "arithmetic", "lighteval/MATH", "math_dapo"]
    results, stats = executor.score([RewardRequest(s, "x", "1") for s in sources])
    assert stats["errors"] == len(sources)
    assert [r["level"] for r in results] == [4] * len(sources) and not any(r["acc"] for r in results)


def _raises(data_source, solution_str, ground_truth, extra_info=None, **options):
    raise RuntimeError("boom")


def test_a_response_cut_off_by_the_length_limit_ranks_below_every_finished_answer():
    from megarl.rewards.levels import truncated_last

    assert truncated_last([1, 2, 3, 4, 1, 5], ["length", "length", "stop", "length", "stop", "length"]) == \
        [4, 4, 3, 4, 1, 5]
