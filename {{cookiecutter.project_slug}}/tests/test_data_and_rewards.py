"""Prompt sources and rewards: what they return, and the errors they give."""

import pytest
import torch

from {{ cookiecutter.package_name }}.training.data import PromptDataModule, read_prompts
from {{ cookiecutter.package_name }}.training.options import near_names
from {{ cookiecutter.package_name }}.training.rewards import (
    FunctionReward,
    KeywordReward,
    Reward,
    SentimentClassifierReward,
    VaderSentimentReward,
    as_reward,
    check_rewards,
    reward_config,
    reward_name,
    samples_per_prompt,
)
from {{ cookiecutter.package_name }}.training.rollout import score_responses


def test_builtin_prompts_keep_validation_separate():
    data = PromptDataModule(batch_size=4)
    data.setup("fit")
    assert data.train_prompts and data.val_prompts
    assert not set(data.train_prompts) & set(data.val_prompts)
    assert next(iter(data.val_dataloader())) == data.val_prompts[:4]


def test_file_source_reads_txt_and_jsonl(prompt_files):
    data = PromptDataModule(source="file", train_path=str(prompt_files["train"]), val_path=str(prompt_files["val"]))
    data.setup("fit")
    assert data.train_prompts[:2] == ["this movie was", "the acting"]
    assert data.val_prompts == ["the story is", "what a"]


def test_file_source_holds_out_the_last_prompts_without_a_val_file(prompt_files):
    data = PromptDataModule(source="file", train_path=str(prompt_files["train"]), num_val_prompts=3)
    data.setup("fit")
    assert len(data.train_prompts) == 5 and len(data.val_prompts) == 3


@pytest.mark.parametrize(
    "content, suffix, match",
    [
        ("", ".txt", "holds no prompts"),
        ("\n  \n", ".txt", "holds no prompts"),
        ('{"prompt": "ok"}\nnot json\n', ".jsonl", r":2: expected a JSON object"),
        ("a\n", ".xml", "must be .txt"),
    ],
)
def test_bad_prompt_files_are_clear_errors(tmp_path, content, suffix, match):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_prompts(path)


def test_missing_prompt_file_and_missing_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="needs data.train_path"):
        PromptDataModule(source="file").setup("fit")
    with pytest.raises(ValueError, match="prompt_tokens"):
        PromptDataModule(prompt_tokens=(5, 2))


def test_vader_reward_prefers_positive_text():
    reward = VaderSentimentReward(include_prompt=False)
    scores = reward(["x", "x", "x"], ["great wonderful film", "the film", "awful boring film"])
    assert scores[0] > scores[1] == 0 > scores[2]


def test_keyword_reward_counts_words():
    assert KeywordReward(["good"], scale=2.0)(["p", "p"], ["good good bad", "bad"]).tolist() == [4.0, 0.0]


def test_classifier_reward_reencodes_text_and_uses_the_positive_logit(hf_checkpoints):
    reward = SentimentClassifierReward(str(hf_checkpoints["classifier"]), positive_label="POSITIVE")
    prompts, responses = ["the movie", "a film"], [" was great", " was a waste of time"]
    scores = reward(prompts, responses)
    enc = reward.tokenizer([p + r for p, r in zip(prompts, responses, strict=True)], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reward.model(**enc).logits[:, 1]
    torch.testing.assert_close(scores, expected)
    assert not any(p.requires_grad for p in reward.model.parameters())
    with pytest.raises(ValueError, match="not in the classifier's labels"):
        SentimentClassifierReward(str(hf_checkpoints["classifier"]), positive_label="HAPPY")


def test_check_rewards_refuses_wrong_shapes_and_names_non_finite_texts():
    with pytest.raises(ValueError, match=r"^the reward returned 3 values for 2 responses \(2 prompts x 1 samples"):
        check_rewards(torch.zeros(3), ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="non-finite reward inf for prompt 'b' and response 'd'"):
        check_rewards(torch.tensor([0.0, float("inf")]), ["a", "b"], ["c", "d"])


class TwoColumns(Reward):
    def __call__(self, prompts, responses):
        return torch.zeros(len(responses), 1)


def test_a_reward_of_the_wrong_shape_is_named_with_the_rollout_numbers():
    # 3 prompts x 2 samples; "p" comes twice, apart: the groups are the runs of equal adjacent prompts.
    prompts = ["p", "p", "q", "q", "p", "p"]
    assert samples_per_prompt(prompts) == 2 and samples_per_prompt(["a"] * 3 + ["b"] * 6) == 3
    with pytest.raises(
        ValueError,
        match=r"^reward TwoColumns returned a tensor of shape \(6, 1\) for 6 responses "
        r"\(3 prompts x 2 samples per prompt: sampling.samples_per_prompt when training",
    ):
        score_responses(TwoColumns(), prompts, list("abcdef"), torch.device("cpu"))
    assert reward_name(as_reward(trl_style)) == "trl_style" and reward_name(KeywordReward(["a"])) == "KeywordReward"


def test_hub_source_cuts_reviews_to_2_to_8_tokens(monkeypatch, hf_checkpoints):
    # The IMDB path without the hub: a stand-in `datasets` module serves two splits.
    import sys
    import types

    from transformers import AutoTokenizer

    reviews = {
        "train": [f"review {i}: this movie was great<br />and the acting was wonderful indeed" for i in range(30)],
        "test": [f"test {i}: a terrible film with a boring plot and bad actors" for i in range(30)],
    }
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: {"text": reviews[split]} if name == "stanfordnlp/imdb" else None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    tokenizer_path = str(hf_checkpoints["gpt2"])
    data = PromptDataModule(source="hf", hf_tokenizer=tokenizer_path, max_train_prompts=20, num_val_prompts=5)
    data.setup("fit")
    assert len(data.train_prompts) == 20 and len(data.val_prompts) == 5
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    lengths = [len(tokenizer(p)["input_ids"]) for p in data.train_prompts + data.val_prompts]
    assert min(lengths) >= 2 and max(lengths) <= 8 and len(set(lengths)) > 1
    assert all(p.startswith("test") for p in data.val_prompts), "validation comes from the test split"
    assert not any("<br />" in p for p in data.train_prompts)
    with pytest.raises(ValueError, match="needs data.hf_tokenizer"):
        PromptDataModule(source="hf").setup("fit")


def test_every_prompt_is_checked_before_the_first_step(tiny_trainer, tmp_path):
    from {{ cookiecutter.package_name }}.training.module import RBKLModule
    from {{ cookiecutter.package_name }}.training.options import Sampling

    prompts = tmp_path / "train.txt"
    long_prompt = " ".join(["the movie was good and"] * 12)  # 60 words: no room for 12 new tokens
    prompts.write_text("\n".join(["the movie was"] * 20 + [long_prompt, "a film with"]) + "\n")
    data = PromptDataModule(source="file", train_path=str(prompts), num_val_prompts=1, batch_size=2)
    trainer = tiny_trainer(max_steps=1, logger=False)
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens: 'the movie was good and"):
        trainer.fit(RBKLModule(sampling=Sampling(max_new_tokens=12)), data)
    assert trainer.global_step == 0, "refused before any step"


def test_words_outside_the_vocabulary_are_named_once():
    from {{ cookiecutter.package_name }}.training.module import RBKLModule

    with pytest.warns(UserWarning, match=r"2 word\(s\) .* read as <unk>: 'qwzx', 'zzyzx'") as record:
        RBKLModule().prompt_encoder.warn_unknown_words(["the camera qwzx", "zzyzx film", "the movie"])
    assert len(record) == 1


def test_a_batch_larger_than_the_prompt_set_is_said(tmp_path):
    with pytest.warns(UserWarning, match="data.batch_size=64 is more than the"):
        PromptDataModule(batch_size=64).setup("fit")


def trl_style(prompts, completions, **kwargs):
    return [float(len(c.split())) if p else None for p, c in zip(prompts, completions, strict=True)]


def test_a_trl_reward_function_is_called_with_keywords_and_checked_like_a_reward():
    seen = {}

    def only_completions(completions, **kwargs):  # TRL passes keywords, so this form works there
        seen.update(kwargs)
        return [1.0] * len(completions)

    reward = as_reward(only_completions)
    assert isinstance(reward, FunctionReward) and as_reward(reward) is reward and as_reward(None) is None
    torch.testing.assert_close(reward(["p", "p"], ["a", "b"]), torch.ones(2))
    assert seen == {"prompts": ["p", "p"]}
    assert reward.name == "only_completions", "the plots name the function, not the wrapper"
    torch.testing.assert_close(as_reward(trl_style)(["x"], ["two words"]), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="non-finite reward nan for prompt '' and response 'b'"):
        check_rewards(as_reward(trl_style)(["a", ""], ["a", "b"]), ["a", ""], ["a", "b"])
    with pytest.raises(ValueError, match="one value per response"):
        check_rewards(as_reward(lambda prompts, completions: [1.0])(["a", "b"], ["c", "d"]), ["a", "b"], ["c", "d"])
    with pytest.raises(TypeError, match="a Reward or a function"):
        as_reward(3)


def test_a_reward_function_is_stored_as_its_dotted_path():
    assert reward_config(trl_style) == f"{__name__}.trl_style"
    assert reward_config({"class_path": "x.Y"}) == {"class_path": "x.Y"} and reward_config(None) is None


@pytest.mark.parametrize(
    "name, near",
    [
        ("betta", ["objective.beta"]),  # a typo of an option inside a group
        ("beta", ["objective.beta"]),  # an option that moved into a group
        ("objective.betta", ["objective.beta"]),
        ("zzz", []),
    ],
)
def test_near_names_find_typos_and_moved_options(name, near):
    known = {"objective.beta", "objective.kl_gradient", "sampling.max_new_tokens", "policy"}
    assert near_names(name, known)[:1] == near


def test_the_data_order_is_dealt_to_the_ranks_in_turn_and_continues_where_a_resume_left_it():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from {{ cookiecutter.package_name }}.training.data import EpochShuffle

    n, seed, epoch = 30, 5, 2
    whole = list(EpochShuffle(n, seed, lambda: epoch, lambda: 0))
    assert sorted(whole) == list(range(n)), "one process: every item once"
    # Two ranks: rank r takes items r, r + 2, ... of that order, as Lightning's wrapper would deal it.
    ranks = [list(EpochShuffle(n, seed, lambda: epoch, lambda: 0, ranks=2, rank=r)) for r in range(2)]
    wrapped = [
        list(
            DistributedSamplerWrapper(
                EpochShuffle(n, seed, lambda: epoch, lambda: 0), num_replicas=2, rank=r, shuffle=False
            )
        )
        for r in range(2)
    ]
    assert ranks == wrapped == [whole[0::2], whole[1::2]]
    # Resumed after 3 batches of 4 per rank (24 items of the order): each rank continues its own share.
    for r in range(2):
        resumed = list(EpochShuffle(n, seed, lambda: epoch, lambda: 24, ranks=2, rank=r))
        assert resumed == ranks[r][12:], r
    assert len(EpochShuffle(n, seed, lambda: epoch, lambda: 24, ranks=2, rank=0)) == 15, "a constant length per rank"
