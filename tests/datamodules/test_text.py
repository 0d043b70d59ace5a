"""Text datamodules: local files and gensim's Wikipedia with an offline BPE, prompt/target files, synthetic tasks."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from datamodules import PromptTargetDataModule, SyntheticReasoningDataModule, TextLMDataModule
from lightning_methods._tokenizer import char_tokenizer, encode_prompts, encode_targets
from datamodules.text import SYNTHETIC_ALPHABET, wikipedia_articles

PARAGRAPHS = [
    f"Paragraph {i} talks about {topic}. " * 6
    for i, topic in enumerate(["rivers", "mountains", "the sea", "cities", "forests", "deserts", "islands", "lakes"] * 3)
]


@pytest.fixture
def text_files(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for k in range(2):
        (data / f"part{k}.txt").write_text("\n\n".join(PARAGRAPHS[k::2]) + "\n")
    return [str(data / "part0.txt"), str(data / "part1.txt")]


def test_text_files_bpe_saved_beside_the_data_and_reused(text_files):
    dm = TextLMDataModule(text_files, vocab_size=300, block_size=16, batch_size=4, val_fraction=0.15, test_fraction=0.15)
    saved = dm.default_tokenizer_dir()
    assert str(saved.parent) == os.path.dirname(text_files[0])
    assert (saved / "tokenizer.json").is_file()
    assert dm.tokenizer_dir == saved
    # byte-level BPE: lossless round trip, no <unk>
    text = "Paragraph 3 talks about cities. Ünïcödé too"
    assert dm.tokenizer.decode(dm.tokenizer(text)["input_ids"]) == text
    # documents are split, not mixed: 24 paragraphs -> 4 val, 4 test, 16 train
    docs = dm._documents
    assert [len(docs[s]) for s in ("train", "val", "test")] == [16, 4, 4]
    assert not set(docs["train"]) & (set(docs["val"]) | set(docs["test"]))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and batch["attention_mask"].all()
    # packing joins documents with EOS
    stream = torch.tensor([t for e in dm.data["train"] for t in e["input_ids"]])
    assert (stream == dm.tokenizer.eos_token_id).sum() >= 1
    assert dm.batch_format == "lm" and dm.max_length == 16
    # a second datamodule reuses the saved tokenizer instead of training again
    mtime = (saved / "tokenizer.json").stat().st_mtime_ns
    again = TextLMDataModule(text_files, vocab_size=300, block_size=16, val_fraction=0.15, test_fraction=0.15)
    assert (saved / "tokenizer.json").stat().st_mtime_ns == mtime
    assert again.tokenizer.get_vocab() == dm.tokenizer.get_vocab()


def test_text_tokenizer_directory_argument(text_files, tmp_path):
    where = tmp_path / "my_tokenizer"
    dm = TextLMDataModule(text_files, tokenizer=str(where), vocab_size=300, block_size=8, val_fraction=0.15, test_fraction=0.15)
    assert (where / "tokenizer.json").is_file()
    obj = TextLMDataModule(text_files, tokenizer=dm.tokenizer, block_size=8, val_fraction=0.15, test_fraction=0.15)
    assert obj.tokenizer is dm.tokenizer


def test_text_errors(text_files, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        TextLMDataModule([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="`block_size` must be a positive integer"):
        TextLMDataModule(text_files, block_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TextLMDataModule(text_files, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="`vocab_size` must be an integer >= 300"):
        TextLMDataModule(text_files, vocab_size=100)
    dm = TextLMDataModule(text_files, vocab_size=300, block_size=4096, val_fraction=0.15, test_fraction=0.15)
    with pytest.raises(ValueError, match="fewer than one block of 4096"):
        dm.setup()


@pytest.mark.slow  # > 3 s: outside the fast lane
def test_gensim_wikipedia_articles(tmp_path):
    articles = wikipedia_articles()
    assert len(articles) == 106
    assert 3_000_000 < sum(len(a["text"]) for a in articles) < 3_200_000
    assert articles[0]["title"] == "Anarchism" and "[[" not in articles[0]["text"]
    dm = TextLMDataModule(vocab_size=512, block_size=32, max_documents=20, cache_dir=str(tmp_path), batch_size=8)
    assert (tmp_path / "wikipedia" / "articles.jsonl").is_file()
    assert dm.tokenizer_dir.parent == tmp_path / "wikipedia"
    assert len(dm.tokenizer) == 512
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32)
    assert dm.num_tokens("train") > 50_000


# ----------------------------------------------------------------------------------------------------------------------
def test_prompt_target_from_json_jsonl_csv(tmp_path):
    tok = char_tokenizer(SYNTHETIC_ALPHABET)
    rows = [{"q": f"{i}+{i}=", "a": str(2 * i)} for i in range(40)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("q,a\n" + "\n".join(f"{r['q']},{r['a']}" for r in rows))
    batches = []
    for name in ("d.json", "d.jsonl", "d.csv"):
        dm = PromptTargetDataModule(str(tmp_path / name), tok, prompt_column="q", target_column="a", batch_size=64, shuffle=False)
        assert dm.batch_format == "prompt_target"
        assert [len(dm.data[s]) for s in ("train", "val", "test")] == [32, 4, 4]
        assert dm.max_prompt_length == 6 and dm.max_target_length == 3  # "39+39=", "78" + EOS
        batches.append(next(iter(dm.train_dataloader())))
    for b in batches[1:]:
        for key in batches[0]:
            assert torch.equal(batches[0][key], b[key])  # CSV's integer column read back as the same text
    b = batches[0]
    # targets end with EOS, prompts do not
    lengths = b["target_mask"].sum(1)
    assert (b["target_ids"][torch.arange(len(lengths)), lengths - 1] == tok.eos_token_id).all()
    assert not (b["prompt_ids"] == tok.eos_token_id).any()


def test_prompt_target_given_splits_and_errors(tmp_path):
    tok = char_tokenizer(SYNTHETIC_ALPHABET)
    for split, n in (("train", 10), ("val", 3), ("test", 2)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({"prompt": f"{i}=", "target": "T"}) for i in range(n)))
    dm = PromptTargetDataModule(
        str(tmp_path / "train.jsonl"), tok, val_file=str(tmp_path / "val.jsonl"), test_file=str(tmp_path / "test.jsonl")
    )
    assert [len(dm.data[s]) for s in ("train", "val", "test")] == [10, 3, 2]
    with pytest.raises(ValueError, match="not \\['question'\\]"):
        PromptTargetDataModule(str(tmp_path / "train.jsonl"), tok, prompt_column="question")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(ValueError, match=".json, .jsonl or .csv"):
        PromptTargetDataModule(str(tmp_path / "x.txt"), tok)
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        PromptTargetDataModule(str(tmp_path / "train.jsonl"), None)


# ----------------------------------------------------------------------------------------------------------------------
def test_synthetic_addition_msd_first_and_held_out():
    dm = SyntheticReasoningDataModule(num_train=2000, num_val=100, num_test=100, min_digits=2, max_digits=3)
    for p, t in itertools.chain(*dm.pairs.values()):
        a, b = p[:-1].split("+")
        assert p.endswith("=") and int(a) + int(b) == int(t) and t == str(int(t))  # most-significant digit first
        assert 2 <= len(a) <= 3 and 2 <= len(b) <= 3
    held_out = {p for p, _ in dm.pairs["val"] + dm.pairs["test"]}
    assert len(held_out) == 200 and not held_out & {p for p, _ in dm.pairs["train"]}
    # the fast character encoding equals the tokenizer's (and so what generate() feeds the model)
    sample = dm.pairs["test"][:20]
    assert [e["prompt_ids"] for e in dm.data["test"][:20]] == encode_prompts(dm.tokenizer, [p for p, _ in sample])
    assert [e["target_ids"] for e in dm.data["test"][:20]] == encode_targets(dm.tokenizer, [t for _, t in sample])
    assert dm.prompts("test")[:2] == [p for p, _ in sample[:2]] and dm.targets("test")[0] == sample[0][1]
    # pretraining format: prompt + target + EOS as one sequence
    lm = SyntheticReasoningDataModule(batch_format="lm", num_train=2000, num_val=100, num_test=100, min_digits=2, max_digits=3)
    e = lm.data["test"][0]["input_ids"]
    assert dm.tokenizer.decode(e[:-1]) == "".join(sample[0]) and e[-1] == dm.tokenizer.eos_token_id
    batch = next(iter(lm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"} and lm.max_length == 3 + 1 + 3 + 1 + 4 + 1


@pytest.mark.parametrize("sum_of", [3, 2])
def test_synthetic_three_sum_labels_and_balance(sum_of):
    dm = SyntheticReasoningDataModule(task="3sum", length=6, dim=2, sum_of=sum_of, num_train=400, num_val=50, num_test=50)
    for p, t in dm.pairs["train"][:200]:
        vectors = [[int(c) for c in v] for v in p[:-1].split(" ")]
        assert len(vectors) == 6 and all(len(v) == 2 for v in vectors)
        has = any(
            all(sum(xs) % 10 == 0 for xs in zip(*group)) for group in itertools.combinations(vectors, sum_of)
        )
        assert t == ("T" if has else "F")
    labels = [t for _, t in dm.pairs["train"]]
    assert labels.count("T") == labels.count("F") == 200
    assert dm.max_target_length == 2  # "T"/"F" + EOS


def test_synthetic_errors():
    with pytest.raises(ValueError, match="`task`"):
        SyntheticReasoningDataModule(task="sort")
    with pytest.raises(ValueError, match="`max_digits`"):
        SyntheticReasoningDataModule(min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="`length`"):
        SyntheticReasoningDataModule(task="3sum", length=2)
    with pytest.raises(ValueError, match="`sum_of`"):
        SyntheticReasoningDataModule(task="3sum", sum_of=1)
    with pytest.raises(ValueError, match="Too few distinct problems"):
        SyntheticReasoningDataModule(min_digits=1, max_digits=1, num_val=80, num_test=80)
