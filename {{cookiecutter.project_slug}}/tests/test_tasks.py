"""Tasks with columns, through `train.py` as a user runs them: TRL's reward-function contract (the
dataset's columns as keyword lists aligned with the completions), weighted lists of rewards with
None, chat prompts, `datasets` files, and the built-in verifiable task."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script

from {{ cookiecutter.package_name }}.training.rewards import KeywordReward, Reward, WeightedRewards, as_reward
from {{ cookiecutter.package_name }}.training.rollout import score_responses

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT = str(PROJECT / "configs/default.yaml")
SHORT = [
    "--trainer.max_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.num_sanity_val_steps=0",
    "--model.init_args.sampling.max_new_tokens=4",
    "--data.batch_size=4",
    "--data.epoch_repeats=1",
]

REWARDS = '''
import json


def seen(prompts, completions, completion_ids, **columns):
    """Writes down what it was given; applies to the rows of even id only."""
    with open("seen.jsonl", "a") as file:
        record = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
        record["columns"] = {name: [type(v).__name__ for v in values] for name, values in columns.items()}
        file.write(json.dumps({**record, "values": columns}) + "\\n")
    return [None if i % 2 else 1.0 for i in columns["id"]]


def words(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]  # text or a chat message
    return [float(len(text.split())) for text in texts]
'''

PROMPTS = ["the movie was", "this film is", "the story is", "the actor was", "the music in this movie", "i think"]


def project(tmp_path: Path) -> Path:
    """train.py with the reward functions beside it, as a user keeps them in the project root."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(PROJECT / "train.py", root)
    (root / "my_rewards.py").write_text(REWARDS)
    return root


def train(root: Path, *args: str) -> list[dict]:
    result = run_script(str(root / "train.py"), "fit", "--config", DEFAULT, *SHORT, *args, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (root / "seen.jsonl").read_text().splitlines()]


def metrics(root: Path) -> list[dict]:
    return list(csv.DictReader(next((root / "logs").rglob("metrics.csv")).open()))


def test_a_trl_function_gets_the_columns_and_weighted_rewards_are_logged_by_name(tmp_path):
    root = project(tmp_path)
    rows = [{"prompt": p, "answer": 10 + i, "id": i} for i, p in enumerate(PROMPTS * 2)]
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    calls = train(
        root,
        "--data.source=file",
        "--data.train_path=rows.jsonl",
        "--data.num_val_prompts=4",
        "--model.init_args.reward=[my_rewards.seen, my_rewards.words]",
        "--model.init_args.reward_weights=[2.0, 0.5]",
        "--model.init_args.sampling.val_samples_per_prompt=2",
        "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=1",
    )
    n = 4 * 4  # 4 prompts x samples_per_prompt 4
    first = next(call for call in calls if len(call["completions"]) == n)  # the training batch
    values = first["values"]
    assert first["columns"] == {"answer": ["int"] * n, "id": ["int"] * n}, "every column, as the data holds it"
    assert len(first["prompts"]) == len(first["completion_ids"]) == n
    for prompt, answer, i in zip(first["prompts"], values["answer"], values["id"], strict=True):
        assert (prompt, answer) == (rows[i]["prompt"], rows[i]["answer"]), "columns stay with their prompt"
    assert first["prompts"][::4] == first["prompts"][1::4] == first["prompts"][3::4], "k adjacent per prompt"
    assert all(len(ids) <= 4 and all(isinstance(t, int) for t in ids) for ids in first["completion_ids"])
    assert any(len(call["completions"]) == 2 * 4 for call in calls), "validation: 4 prompts x 2 samples"
    # The total is nansum(2 * seen + 0.5 * words): a None (odd id) leaves `seen` out of the sum.
    total = [2.0 * (i % 2 == 0) + 0.5 * len(c.split()) for i, c in zip(values["id"], first["completions"], strict=True)]
    row = next(r for r in metrics(root) if r.get("train/reward/mean"))
    assert math.isclose(float(row["train/reward/mean"]), sum(total) / n, rel_tol=1e-5)
    assert float(row["train/reward/seen/mean"]) == 1.0, "a function's mean is over the samples it applies to"
    words = [len(c.split()) for c in first["completions"]]
    assert math.isclose(float(row["train/reward/words/mean"]), sum(words) / n, rel_tol=1e-5)
    assert any(r.get("val/reward/words/mean") for r in metrics(root)), "validation logs each reward too"


def test_files_of_every_kind_give_prompts_and_columns(tmp_path):
    from {{ cookiecutter.package_name }}.training.data import PromptBatch, PromptDataModule, read_table

    (tmp_path / "rows.json").write_text(json.dumps([{"q": "the movie", "n": 1}, {"q": "a film", "n": 2}]))
    (tmp_path / "columns.json").write_text(json.dumps({"q": ["the movie", "a film"], "n": [1, 2]}))
    (tmp_path / "rows.csv").write_text("q,n\nthe movie,1\na film,2\n")
    for name, n in (("rows.json", [1, 2]), ("columns.json", [1, 2]), ("rows.csv", ["1", "2"])):
        assert read_table(tmp_path / name, prompt_column="q") == (["the movie", "a film"], {"n": n}), name
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(its columns: q, n\); set data.prompt_column"):
        read_table(tmp_path / "rows.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "completions": 1}) + "\n")
    with pytest.raises(ValueError, match="column 'completions' would clash with the keyword a reward function gets"):
        read_table(tmp_path / "bad.jsonl")
    # Prompts with columns: batches are PromptBatches whose columns stay with their prompts.
    rows = str(tmp_path / "rows.json")
    data = PromptDataModule(source="file", train_path=rows, val_path=rows, prompt_column="q", batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, PromptBatch) and len(batch) == 2
    assert {p: n for p, n in zip(batch.prompts, batch.columns["n"], strict=True)} == {"the movie": 1, "a film": 2}


class Lookup(Reward):
    """A class-based reward that takes one column by name."""

    def __call__(self, prompts, responses, answer):
        return torch.tensor([float(r == a) for r, a in zip(responses, answer, strict=True)])


def test_weights_and_none_follow_trl_and_errors_name_the_reward():
    def sometimes(completions, **kwargs):
        return [None, 1.0, None, 3.0]

    rewards = as_reward([sometimes, KeywordReward(["good"])], [2.0, 0.5])
    assert isinstance(rewards, WeightedRewards) and rewards.name == "2 x sometimes + 0.5 x KeywordReward"
    prompts, responses = ["p"] * 4, ["good", "good good", "bad", "good"]
    scores = score_responses(rewards, prompts, responses, torch.device("cpu"))
    torch.testing.assert_close(scores.total, torch.tensor([0.5, 3.0, 0.0, 6.5]))
    assert scores.by_reward["sometimes"].isnan().tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match=r"non-finite reward nan for prompt 'p' and response 'good'.*at least one"):
        score_responses(as_reward([sometimes], [1.0]), prompts, responses, torch.device("cpu"))
    with pytest.raises(ValueError, match="^model.init_args.reward_weights has 1 weights for 2 rewards"):
        as_reward([sometimes, sometimes], [1.0])
    twice = as_reward([sometimes, sometimes])
    assert twice.names == ["sometimes", "sometimes_2"], "one metrics column per reward"
    with pytest.raises(ValueError, match=r"^reward sometimes returned 4 values for 2 responses"):
        twice.scores(["p", "p"], ["a", "b"], {})
    # A class-based reward gets the columns its __call__ names; one without columns, none.
    columns = {"answer": ["good", "x", "bad", "y"], "id": [0, 1, 2, 3]}
    lookup = score_responses(as_reward([Lookup(), KeywordReward(["good"])]), _with(prompts, columns), responses, "cpu")
    torch.testing.assert_close(lookup.total, torch.tensor([2.0, 2.0, 1.0, 1.0]))


def _with(prompts: list, columns: dict):
    from {{ cookiecutter.package_name }}.training.data import RepeatedPrompts

    return RepeatedPrompts(prompts, columns)


def jinja(text: str) -> str:
    """Jinja with (% %) and (( )) for its delimiters (literal ones would read as template leftovers)."""
    return text.replace("(%", "{" + "%").replace("%)", "%" + "}").replace("((", "{" + "{").replace("))", "}" + "}")


# Renders the messages' words after "the", and "and" where the assistant's turn begins: all of it
# words of the built-in vocabulary.
CHAT = jinja("(% for m in messages %)the (( m['content'] )) (% endfor %)(% if add_generation_prompt %)and(% endif %)")


def test_a_chat_prompt_is_rendered_with_the_chat_template_and_rewards_get_messages(tmp_path):
    from {{ cookiecutter.package_name }}.models.vocabulary import builtin_tokenizer
    from {{ cookiecutter.package_name }}.training.module import RBKLModule

    tokenizer = builtin_tokenizer()
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(tmp_path / "chat-tokenizer")
    module = RBKLModule(tokenizer=str(tmp_path / "chat-tokenizer"))
    ids, mask = module.encode_prompts([[{"role": "user", "content": "movie was"}], [{"role": "user", "content": "a"}]])
    assert module.tokenizer.batch_decode([row[m] for row, m in zip(ids, mask, strict=True)]) == [
        "the movie was and",
        "the a and",
    ]
    root = project(tmp_path)
    rows = [{"prompt": [{"role": "user", "content": p}], "id": i} for i, p in enumerate(PROMPTS * 2)]
    (root / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    chat = ["--data.source=file", "--data.train_path=chat.jsonl", "--data.num_val_prompts=4"]
    chat += ["--model.init_args.reward=[my_rewards.seen, my_rewards.words]", "--trainer.limit_val_batches=0"]
    calls = train(root, *chat, f"--model.init_args.tokenizer={tmp_path / 'chat-tokenizer'}")
    first = calls[0]
    assert first["prompts"][0] == rows[first["values"]["id"][0]]["prompt"], "the messages, as TRL passes them"
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in first["completions"])
    # Without a chat template: one sentence, before any step.
    result = run_script(str(root / "train.py"), "fit", "--config", DEFAULT, *SHORT, *chat, cwd=root)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the prompts are lists of messages but the tokenizer of 'builtin:tiny-gpt2' has no chat template: "
        "give the prompts as text, or set model.init_args.tokenizer to one that has a chat template"
    ), result.stderr[-2000:]


def test_a_datasets_dataset_from_a_local_parquet_file_keeps_its_types(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from {{ cookiecutter.package_name }}.training.data import PromptDataModule

    root = project(tmp_path)
    table = {"question": PROMPTS * 2, "id": list(range(12)), "weight": [0.5] * 12, "tags": [["a", "b"]] * 12}
    pq.write_table(pa.table(table), root / "rows.parquet")
    data = PromptDataModule(source="datasets", hf_dataset=str(root / "rows.parquet"), prompt_column="question")
    with pytest.raises(ValueError, match=r"has no split 'test' \(its splits: train\); set data.hf_val_split"):
        data.setup("fit")
    source = ["--data.source=datasets", f"--data.hf_dataset={root / 'rows.parquet'}", "--data.hf_val_split=null"]
    source += ["--data.prompt_column=question", "--data.num_val_prompts=4", "--trainer.limit_val_batches=0"]
    calls = train(root, *source, "--model.init_args.reward=[my_rewards.seen, my_rewards.words]")
    assert calls[0]["columns"] == {"id": ["int"] * 16, "weight": ["float"] * 16, "tags": ["list"] * 16}
    assert calls[0]["values"]["tags"][0] == ["a", "b"]


@pytest.mark.slow
def test_the_verifiable_task_learns_above_chance(tmp_path):
    data = PROJECT / "data/repeat_word"
    args = ["fit", "--config", str(PROJECT / "configs/repeat_word.yaml"), "--trainer.max_epochs=5"]
    args += [f"--data.train_path={data / 'train.jsonl'}", f"--data.val_path={data / 'val.jsonl'}"]
    args += ["--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    result = run_script("train.py", *args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metrics(tmp_path) if r.get("train/reward/mean")]
    assert all(r["train/reward/exact_match/mean"] == r["train/reward/mean"] for r in rows), "one reward, weight 1"
    first, last = ([r for r in rows if r["epoch"] == str(epoch)] for epoch in (0, 4))

    def mean_and_se(epoch_rows):  # the steps' means, and the standard error of their mean over prompts
        means = [float(r["train/reward/mean"]) for r in epoch_rows]
        sems = [float(r["train/reward/sem_prompts"]) for r in epoch_rows]
        return sum(means) / len(means), math.sqrt(sum(s * s for s in sems)) / len(sems)

    (m0, se0), (m4, se4) = mean_and_se(first), mean_and_se(last)
    assert m4 - m0 > 3 * math.hypot(se0, se4), f"epoch 0: {m0:.3f} ± {se0:.3f}, epoch 4: {m4:.3f} ± {se4:.3f}"
    assert m4 > 10 / 191, "well above chance: one of the vocabulary's 191 tokens at random"
