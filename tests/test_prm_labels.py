"""Math-Shepherd step labels (``posttrain data prm-labels``): hard and soft labels worked by hand from a scripted
sampler, step splitting, the continuation prompt (the assistant turn goes on, never re-opens), and the command end
to end on the tiny model: the row contract, the cost record, resume (after a finished row and after a torn one)
equal to one run, and refused settings."""

import json
import shutil

import pytest

from posttrain.cli import main
from posttrain.curate.prm_labels import (
    PRMSettings,
    Question,
    continuation_ids,
    label_file,
    label_question,
    prefix_texts,
    prepare,
    prompt_ids,
    read_questions,
    row_record,
    row_seed,
    split_steps,
)
from posttrain.data.prompts import load_prompts
from posttrain.errors import ConfigError, DataError
from posttrain.rollout.sample import Rollout
from tests.helpers import write_jsonl

SYSTEM = "Solve it step by step. End with '#### <number>'."


class ScriptedEngine:
    """A rollout engine that answers each ``sample`` call with the next list of texts; records every call."""

    name, sync_s = "scripted", 0.0

    def __init__(self, *replies: list[str]):
        self.replies, self.calls = list(replies), []

    def sample(self, prompt_ids, *, n, seeds, **kw):
        self.calls.append({"prompts": prompt_ids, "n": n, "seeds": seeds})
        texts = self.replies.pop(0)
        assert len(texts) == len(prompt_ids) * n
        return Rollout([p for p in prompt_ids for _ in range(n)], [[7] * (len(t) + 1) for t in texts], texts,
                       [True] * len(texts), [[0.0]] * len(texts))


SOLUTION = "Red and blue: 2 + 3 = 5\n\nDoubled: 5 * 2 = 10\n#### 10"
ROLLOUTS = [
    # from step 1 ("Red and blue: 2 + 3 = 5\n"): 9 is wrong; with no number of its own, the prefix's last (5) counts
    "#### 9", "so we wait", "then 5 * 2 = 11",  # 0 of 3
    # from step 2 (... "Doubled: 5 * 2 = 10\n"): "Done." is judged by the prefix's last number, 10: right
    "#### 8", "Done.", "the answer is 11",  # 1 of 3
    # from step 3 (... "#### 10\n"): the first '####' line decides, and the prefix has it
    "", "Done.", "and 4 boxes",  # 3 of 3
]


def question(system: str | None = None) -> Question:
    chat = [{"role": "user", "content": "2 red and 3 blue balls, doubled: how many?"}]
    chat = [{"role": "system", "content": system}, *chat] if system else chat
    return Question(4, chat, chat if system else chat[0]["content"], "2 + 3 = 5, 5 * 2 = 10\n#### 10")


def test_hard_and_soft_labels_by_hand(tokenizer):
    q, s = question(), PRMSettings(model="m", k=3, seed=7)
    engine = ScriptedEngine([SOLUTION], ROLLOUTS)
    lab = label_question(q, engine, tokenizer, s)
    assert lab.steps == ["Red and blue: 2 + 3 = 5", "Doubled: 5 * 2 = 10", "#### 10"]
    assert lab.successes == [0, 1, 3]
    assert row_record(q, lab, s, "in.jsonl")["labels"] == [0, 1, 1]
    soft = PRMSettings(model="m", k=3, seed=7, label="soft")
    assert row_record(q, lab, soft, "in.jsonl")["labels"] == pytest.approx([0.0, 1 / 3, 1.0])
    # one call for the solution, one for all k rollouts of all prefixes, each seeded by (seed, row, part) alone
    ids = prompt_ids(tokenizer, q.chat)
    solution_call, rollout_call = engine.calls
    assert solution_call == {"prompts": [ids], "n": 1, "seeds": [row_seed(7, 4, 0)]}
    assert rollout_call["n"] == 3 and rollout_call["seeds"] == [row_seed(7, 4, i) for i in (1, 2, 3)]
    assert rollout_call["prompts"] == [continuation_ids(ids, p, tokenizer) for p in prefix_texts(lab.steps)]
    assert lab.tokens == len(SOLUTION) + 1 + sum(len(t) + 1 for t in ROLLOUTS)
    assert len({row_seed(7, 4, 0), row_seed(7, 5, 0), row_seed(8, 4, 0), row_seed(7, 4, 1)}) == 4


def test_reference_solution_is_labelled_without_sampling_one(tokenizer):
    q = question()
    q = Question(q.row, q.chat, q.prompt, "2 + 3 = <<2+3=5>>5 balls\nDoubled: 5 * 2 = <<5*2=10>>10\n#### 10")
    s = PRMSettings(model="m", k=2, solution="reference")
    engine = ScriptedEngine(["#### 7", "no idea", "#### 10", "", "", "Done."])  # only the rollouts are sampled
    lab = label_question(q, engine, tokenizer, s)
    assert lab.steps == ["2 + 3 = 5 balls", "Doubled: 5 * 2 = 10", "#### 10"]  # the calculator notes removed
    assert lab.successes == [0, 2, 2] and len(engine.calls) == 1 and engine.calls[0]["n"] == 2
    assert row_record(q, lab, s, "in.jsonl")["provenance"]["solution"] == "reference"
    with pytest.raises(ConfigError, match="solution 'gold'"):
        PRMSettings(model="m", solution="gold")


def test_all_prefixes_in_one_call_of_the_real_sampler(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from posttrain.rollout.interface import HFEngine

    hf = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer)

    class ScriptedSolution(ScriptedEngine):  # the solution is scripted, the rollouts are the tiny model's
        def sample(self, prompt_ids, *, n, seeds, **kw):
            return super().sample(prompt_ids, n=n, seeds=seeds, **kw) if self.replies else \
                hf.sample(prompt_ids, n=n, seeds=seeds, **kw)

    lab = label_question(question(), ScriptedSolution([SOLUTION]), tokenizer, PRMSettings(model="m", k=2,
                                                                                           max_new_tokens=4))
    assert len(lab.steps) == len(lab.successes) == 3 and all(0 <= n <= 2 for n in lab.successes)
    assert len(SOLUTION) + 1 + 3 * 2 <= lab.tokens <= len(SOLUTION) + 1 + 3 * 2 * 4
    # the last prefix holds "#### 10", the first '####' line of whatever follows it: all its rollouts succeed
    assert lab.successes[2] == 2


def test_step_split_and_prefixes():
    text = "  First: 2 + 3 = 5\n\n\n Then 5 * 2 = 10 \n#### 10\n"
    assert split_steps(text) == ["First: 2 + 3 = 5", "Then 5 * 2 = 10", "#### 10"]
    assert prefix_texts(split_steps(text)) == ["First: 2 + 3 = 5\n", "First: 2 + 3 = 5\nThen 5 * 2 = 10\n",
                                               "First: 2 + 3 = 5\nThen 5 * 2 = 10\n#### 10\n"]
    assert split_steps("a\nb\n \n\nc", "paragraph") == ["a\nb", "c"]
    assert prefix_texts(["a\nb", "c"], "paragraph") == ["a\nb\n\n", "a\nb\n\nc\n\n"]
    assert split_steps("") == [] and split_steps("\n  \n") == []


def test_continuation_is_the_prompt_then_the_prefix(tokenizer, tmp_path):
    q = question(SYSTEM)
    ids = prompt_ids(tokenizer, q.chat)
    # the prompt is GRPO's rendering of the same row (data.prompt_field, data.system_prompt)
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": q.chat[1]["content"]}])
    grpo = load_prompts(path, tokenizer, prompt_field="question", system_prompt=SYSTEM, max_prompt_len=512,
                        overlong="error", chat_template=None)[0][0]
    assert ids == grpo
    prefix = "Red and blue: 2 + 3 = 5\n"
    cont = continuation_ids(ids, prefix, tokenizer)
    assert cont == ids + tokenizer(prefix, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(cont)
    assert text.endswith("<|im_start|>assistant\n" + prefix)  # the turn goes on: not closed, not opened again
    assert text.count("<|im_start|>assistant") == 1 and text.count("<|im_end|>") == 2  # system and user turns


def test_bad_rows_name_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?"}])
    with pytest.raises(DataError) as err:
        read_questions(path)
    assert (err.value.file, err.value.row, err.value.field) == (path, 2, "answer")
    assert len(read_questions(path, limit=1)) == 1
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "1 + 1?", "answer": "#### 2"}, {"q": "2?", "answer": "none"}])
    with pytest.raises(DataError, match="row 1, field 'question'"):
        read_questions(path)
    with pytest.raises(DataError, match="row 2, field 'answer': no number"):
        read_questions(path, question_field="q")


def test_empty_solution_is_counted_and_skipped(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1 + 1?", "answer": "#### 2"},
                                              {"question": "2 + 3?", "answer": "#### 5"}])
    job = prepare(path, tmp_path / "out.jsonl", PRMSettings(model="m", k=2))
    report = label_file(job, ScriptedEngine(["  \n"], ["2 + 3 = 5"], ["#### 5", "#### 6"]), tokenizer)
    assert report.skipped_empty == [1]
    assert (report.rows, report.questions, report.steps, report.rollouts) == (1, 2, 1, 2)
    assert report.solutions_correct == 1 and report.steps_reaching_answer == 1
    (row,) = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    assert row["steps"] == ["2 + 3 = 5"] and row["successes"] == [1] and row["provenance"]["source"] == f"{path}:2"
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["skipped_empty"] == [1]


def run(inp, out, tiny_dir, *extra) -> int:
    return main(["data", "prm-labels", inp, "--out", str(out), "--model", tiny_dir, "--k", "2", "--max-new-tokens",
                 "6", "--seed", "3", "--system-prompt", SYSTEM, *extra])


def test_cli_rows_meta_and_resume(tiny_dir, tmp_path, capsys):
    rows = [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(3)]
    inp = write_jsonl(tmp_path / "q.jsonl", rows)
    full = tmp_path / "full.jsonl"
    assert run(inp, full, tiny_dir, "--limit", "2") == 0
    written = [json.loads(line) for line in full.read_text().splitlines()]
    assert len(written) == 2
    for num, row in enumerate(written, 1):
        assert list(row) == ["prompt", "steps", "labels", "successes", "k", "answer", "provenance"]
        assert row["prompt"] == [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": rows[num - 1]["question"]}]
        assert row["answer"] == rows[num - 1]["answer"] and row["k"] == 2
        assert len(row["steps"]) == len(row["labels"]) == len(row["successes"]) >= 1
        assert all(0 <= n <= 2 for n in row["successes"]) and row["labels"] == [int(n > 0) for n in row["successes"]]
        assert row["provenance"] == {"model": tiny_dir, "k": 2, "temperature": 0.8, "max_new_tokens": 6, "seed": 3,
                                     "label": "hard", "step_split": "line", "solution": "sampled",
                                     "source": f"{inp}:{num}"}
    meta = json.loads((tmp_path / "full.jsonl.meta.json").read_text())
    steps = sum(len(r["steps"]) for r in written)
    assert (meta["rows"], meta["questions"], meta["steps"], meta["rollouts"]) == (2, 2, steps, 2 * steps)
    assert meta["generated_tokens"] > 0 and meta["wall_s"] > 0 and meta["s_per_row"] > 0
    assert meta["settings"]["k"] == 2 and meta["settings"]["input"] == inp

    part = tmp_path / "part.jsonl"  # interrupted after row 1
    assert run(inp, part, tiny_dir, "--limit", "1") == 0
    assert run(inp, part, tiny_dir, "--limit", "2", "--resume") == 0
    assert part.read_bytes() == full.read_bytes()
    assert json.loads((tmp_path / "part.jsonl.meta.json").read_text())["rows_resumed"] == 1

    torn = tmp_path / "torn.jsonl"  # interrupted while writing row 2
    text = full.read_text()
    torn.write_text(text[:len(text) - len(text.splitlines()[-1]) // 2])
    assert run(inp, torn, tiny_dir, "--limit", "2", "--resume") == 0
    assert torn.read_bytes() == full.read_bytes()

    capsys.readouterr()
    assert run(inp, full, tiny_dir, "--limit", "3", "--resume", "--k", "3") == 2
    assert "full.jsonl, row 1, field 'provenance.k': written with k=2, this run has 3" in capsys.readouterr().err
    assert run(inp, full, tiny_dir, "--limit", "3") == 2
    assert "already exists: pass --resume" in capsys.readouterr().err
    assert main(["data", "prm-labels", inp, "--out", str(full), "--model", tiny_dir, "--k", "2", "--max-new-tokens",
                 "6", "--seed", "3", "--resume"]) == 2  # no system prompt now: the prompts differ
    assert "row 1, field 'prompt'" in capsys.readouterr().err
    moved = str(shutil.copy(inp, tmp_path / "other.jsonl"))
    assert run(moved, full, tiny_dir, "--resume") == 2
    assert "field 'provenance.source'" in capsys.readouterr().err
    assert full.read_bytes() == text.encode()  # a refused resume leaves the file as it was
