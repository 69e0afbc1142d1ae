"""Datasets: K&K puzzles solved independently from their English text, verl parquet I/O and its errors, the
shared AIME/AMC files, prompt rendering, and the data CLI."""

from __future__ import annotations

import itertools
import random
import re

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megarl.data.kk_dataset import write_kk_dataset
from megarl.data.kk_puzzles import generate_puzzle
from megarl.data.parquet import DataError, describe, read_rows, write_rows
from megarl.data.prompts import render_prompt
from megarl.rewards import compute_score
from tests.cli import megarl

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "data" / "eval"
SHARED = REPO.parent / "shared" / "data"  # the project's shared copy, beside the checkout when present


def parse_quiz(quiz: str):
    """Independent reading of the quiz text: (names, {speaker: clause})."""
    names = re.search(r"You meet \d+ inhabitants: (.*?)\.", quiz).group(1).replace(", and ", ", ").replace(" and ", ", ")
    names = names.split(", ")
    claims = {}
    for sentence in quiz.split(". "):
        m = re.match(r"(\w+) (?:said|told you|claimed|stated|remarked|mentioned) that (.*)", sentence.strip())
        if m:
            claims[m.group(1)] = m.group(2).rstrip(".")
    return names, claims


def truth_of(clause: str, role: dict[str, bool]) -> bool:
    """Evaluate an English clause under a role assignment (True = knight)."""
    if clause.startswith("if ") and " then " in clause:
        a, b = clause[3:].split(" then ", 1)
        return (not truth_of(a, role)) or truth_of(b, role)
    for word, fn in ((" if and only if ", lambda a, b: a == b), (" and ", lambda a, b: a and b),
                     (" or ", lambda a, b: a or b)):
        if word in clause:
            a, b = clause.split(word, 1)
            return fn(truth_of(a, role), truth_of(b, role))
    m = re.fullmatch(r"(\w+) is (not )?a (knight|knave)", clause)
    said_knight = (m.group(3) == "knight") != bool(m.group(2))
    return role[m.group(1)] == said_knight


@pytest.mark.parametrize("people", range(2, 9))
def test_puzzles_have_exactly_the_stated_solution(people):
    rng = random.Random(people)
    for _ in range(6 if people < 8 else 2):
        p = generate_puzzle(rng, people)
        names, claims = parse_quiz(p.quiz)
        assert names == p.names and set(claims) == set(names)
        solutions = []
        for bits in itertools.product((True, False), repeat=people):
            role = dict(zip(names, bits))
            if all(role[n] == truth_of(claims[n], role) for n in names):
                solutions.append(bits)
        assert solutions == [p.knights]
        lines = p.solution_text_format.splitlines()
        assert lines[0].startswith("(1) ") and len(lines) == people


def test_dataset_is_seeded_disjoint_and_its_gold_answers_score_level_1(tmp_path):
    write_kk_dataset(tmp_path / "a", 30, 10, [2, 3, 5], seed=4)
    write_kk_dataset(tmp_path / "b", 30, 10, [2, 3, 5], seed=4)
    assert (tmp_path / "a" / "train.parquet").read_bytes() == (tmp_path / "b" / "train.parquet").read_bytes()
    train, test = read_rows(tmp_path / "a" / "train.parquet"), read_rows(tmp_path / "a" / "test.parquet")
    assert len(train) == 30 and len(test) == 10
    quiz = lambda r: r["prompt"][-1]["content"]  # noqa: E731
    assert not {quiz(r) for r in train} & {quiz(r) for r in test}
    assert {r["extra_info"]["people"] for r in train} == {2, 3, 5}
    for r in train + test:
        gold = "ok</think><answer>" + r["reward_model"]["ground_truth"]["solution_text_format"] + "</answer>"
        assert compute_score(r["data_source"], gold, r["reward_model"]["ground_truth"])["level"] == 1


def test_worked_solutions_score_level_1_and_check_every_statement(tmp_path):
    """The SFT targets `megarl data kk` writes (extra_info.response) are right answers in the reward's format, and
    their check of each statement agrees with a brute-force evaluation of it under the solution."""
    from megarl.data.kk_puzzles import evaluate

    write_kk_dataset(tmp_path, 40, 0, [2, 3, 4, 6], seed=11)
    for r in read_rows(tmp_path / "train.parquet"):
        score = compute_score(r["data_source"], r["extra_info"]["response"], r["reward_model"]["ground_truth"])
        assert score["level"] == 1 and score["format_ok"]
    rng = random.Random(5)
    for _ in range(50):
        p = generate_puzzle(rng, rng.choice([2, 3, 5]))
        claims = re.findall(r"must be (true|false), and it is (true|false)", p.worked_solution)
        assert len(claims) == len(p.names)
        for (must, is_), stmt, knight in zip(claims, p.statements, p.knights):
            assert must == ("true" if knight else "false") == is_ == str(evaluate(stmt, p.knights)).lower()


def test_the_shared_aime_amc_files_read_as_is_and_their_gold_answers_score():
    expect = {"aime-2024.parquet": ("math_dapo", 960), "aime25.parquet": ("aime2025", 960),
              "amc-23.parquet": ("amc_23", 1280)}
    for name, (source, n) in expect.items():
        if (SHARED / name).is_file():  # our copy must be the shared file, byte for byte
            assert (EVAL / name).read_bytes() == (SHARED / name).read_bytes()
        rows = read_rows(EVAL / name)
        assert len(rows) == n and {r["data_source"] for r in rows} == {source}
        assert all(r["prompt"][0]["content"].startswith("Solve the following math problem") for r in rows)
        for r in rows[:: max(1, n // 40)]:
            gt = r["reward_model"]["ground_truth"]
            assert compute_score(r["data_source"], f"...\nAnswer: {gt}", gt)["score"] == 1.0
            assert compute_score(r["data_source"], "Answer: -12345", gt)["score"] == -1.0


def test_malformed_rows_name_file_row_and_field(tmp_path):
    good = {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "1+1?"}],
            "reward_model": {"style": "rule", "ground_truth": "2"}}
    bad = {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "2+2?"}],
           "reward_model": {"style": "rule", "ground_truth": None}}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([good, bad]), path)
    with pytest.raises(DataError, match=rf"{path} row 1: field 'reward_model.ground_truth' is missing"):
        read_rows(path)
    pq.write_table(pa.Table.from_pylist([{"data_source": "x", "prompt": "not chat"}]), path)
    with pytest.raises(DataError, match=r"column\(s\) \['reward_model'\] missing"):
        read_rows(path)
    with pytest.raises(DataError, match=r"row 0 to write: field 'prompt' must be a non-empty list"):
        write_rows(tmp_path / "out.parquet", [{**good, "prompt": []}])
    assert not (tmp_path / "out.parquet").exists()
    kk = {**good, "data_source": "kk_logic", "reward_model": {"ground_truth": {"statements": "[]"}}}
    with pytest.raises(DataError, match="solution_text_format"):
        write_rows(tmp_path / "out.parquet", [kk])


@pytest.mark.cli  # (unpacks the bundled model the first time: tens of seconds)
def test_prompt_rendering_chat_and_raw(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    write_kk_dataset(tmp_path / "i", 1, 1, [3], template="instruct")
    write_kk_dataset(tmp_path / "b", 1, 1, [3], template="base")
    inst, base = read_rows(tmp_path / "i" / "train.parquet")[0], read_rows(tmp_path / "b" / "train.parquet")[0]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = render_prompt(inst["prompt"], tok, generation_prefix=inst["extra_info"]["generation_prefix"])
    assert text.startswith("<|im_start|>system\nYou are a careful logician")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>")
    raw = render_prompt(base["prompt"], raw_template=base["extra_info"]["raw_template"],
                        generation_prefix=base["extra_info"]["generation_prefix"])
    assert raw.startswith("A conversation between User and Assistant") and raw.endswith("Assistant: <think>")
    assert base["prompt"][0]["content"] in raw
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt(inst["prompt"])


@pytest.mark.cli
def test_data_cli(tmp_path):
    r = megarl("data", "kk", "--out", str(tmp_path), "--train", "5", "--test", "2", "--people", "2-4")
    assert r.returncode == 0 and "train.parquet: 5 puzzles" in r.stdout
    r = megarl("data", "inspect", str(tmp_path / "train.parquet"), "--rows", "1")
    assert r.returncode == 0 and "kk_logic: 5" in r.stdout and "[system]" in r.stdout
    assert describe(tmp_path / "train.parquet").count("row ") >= 2
    r = megarl("data", "kk", "--out", str(tmp_path), "--people", "9")
    assert r.returncode == 2 and r.stderr.strip() == "megarl: error: people=9: Knights-and-Knaves puzzles here " \
                                                     "have 2 to 8 people."
    r = megarl("data", "inspect", str(tmp_path / "nope.parquet"))
    assert r.returncode == 2 and "no such file" in r.stderr
