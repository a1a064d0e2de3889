import json

import pytest
from conftest import write_jsonl

from loratune.config import DataConfig
from loratune.data import load_examples
from loratune.data.batching import length_grouped_batches, padding_fraction
from loratune.data.chat import IGNORE, tokenize_rows
from loratune.demo import dataset
from loratune.errors import LoratuneError

CHAT = {"messages": [{"role": "user", "content": "A lone man says goodbye."},
                     {"role": "assistant", "content": "Framing: a single close-up."}]}
INSTRUCTION = {"instruction": "A lone man says goodbye.", "input": "", "output": "Framing: a single close-up."}
COMPLETION = {"prompt": "A lone man says goodbye.", "completion": "Framing: a single close-up."}


def response_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


@pytest.mark.parametrize("row", [CHAT, INSTRUCTION, COMPLETION], ids=["chat", "instruction", "completion"])
def test_each_format_masks_everything_but_the_response(tokenizer, tmp_path, row):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (ex,) = tokenize_rows(tokenizer, [row], DataConfig(path=str(path)), str(path))
    # the loss sees exactly the assistant's answer and its end-of-turn token, nothing of the prompt nor the
    # line break the template puts between turns
    assert response_text(tokenizer, ex) == "Framing: a single close-up.<|im_end|>"
    n_prompt = ex.labels.index(next(label for label in ex.labels if label != IGNORE))
    prompt = tokenizer.decode(ex.input_ids[:n_prompt])
    assert prompt.endswith("<|im_start|>assistant\n") and "A lone man says goodbye." in prompt


def test_json_and_csv_files_load(tokenizer, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([COMPLETION] * 5))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "hello,world\n" * 5)
    for name in ("d.json", "d.csv"):
        train, val = load_examples(tokenizer, DataConfig(path=str(tmp_path / name), validation_path=None,
                                                         validation_size=0.2), seed=0)
        assert (len(train), len(val)) == (4, 1)


def test_validation_split_is_deterministic_from_the_seed(tokenizer, tmp_path):
    rows = [{"prompt": f"scene {i}", "completion": f"plan {i}"} for i in range(30)]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), validation_path=None, validation_size=6)
    a, b, c = (load_examples(tokenizer, cfg, seed) for seed in (1, 1, 2))
    assert [e.input_ids for e in a[1]] == [e.input_ids for e in b[1]]
    assert [e.input_ids for e in a[1]] != [e.input_ids for e in c[1]]
    assert len(a[0]) == 24 and len(a[1]) == 6


@pytest.mark.parametrize(("setup", "message"), [
    (lambda p: None, "data.path: dataset file not found"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: write_jsonl(p, [{"text": "x"}]), "cannot tell the data format from columns ['text']"),
    (lambda p: p.write_text("{not json\n"), "data.path: cannot read"),
])
def test_bad_datasets(tokenizer, tmp_path, setup, message):
    path = tmp_path / "d.jsonl"
    setup(path)
    with pytest.raises(LoratuneError, match=None) as err:
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None), seed=0)
    assert message in str(err.value)


def test_row_without_expected_fields_is_named(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(LoratuneError, match=r"d.jsonl: row 2: not in chat form"):
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None, validation_size=1), seed=0)


def test_split_that_leaves_no_validation_examples(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [COMPLETION] * 3)
    with pytest.raises(LoratuneError, match="data.validation_size: 0.1 of 3 rows leaves no validation rows"):
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None, validation_size=0.1), seed=0)


def test_max_length_shorter_than_the_prompt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [COMPLETION] * 3)
    with pytest.raises(LoratuneError, match=r"data.max_length: 8 tokens is shorter than the prompt of .*row [0-9]+"):
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None, validation_size=1, max_length=8), seed=0)


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    import random

    lengths = [random.Random(i).randint(20, 300) for i in range(200)]
    batches = length_grouped_batches(lengths, batch_size=4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    order = list(range(200))
    random.Random(0).shuffle(order)
    plain = [order[i:i + 4] for i in range(0, 200, 4)]
    assert padding_fraction(batches, lengths) < padding_fraction(plain, lengths) / 3


def test_shipped_demo_data_is_what_the_generator_makes():
    train, validation, test = dataset.generate()
    assert (len(train), len(validation), len(test)) == (148, 37, 37)
    for path, rows in ((dataset.TRAIN_FILE, train), (dataset.VALIDATION_FILE, validation), (dataset.TEST_FILE, test)):
        assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    scenes = [{r["messages"][1]["content"] for r in rows} for rows in (train, validation, test)]
    assert not (scenes[0] & scenes[2]) and not (scenes[1] & scenes[2])  # the test split's scenes are its own


THREE_TURNS = {"messages": [
    {"role": "system", "content": "You plan shots."},
    {"role": "user", "content": "A lone man says goodbye."},
    {"role": "assistant", "content": "Framing: a single close-up."},
    {"role": "user", "content": "And at night?"},
    {"role": "assistant", "content": "Low key light, one practical lamp."},
    {"role": "user", "content": "Rain?"},
    {"role": "assistant", "content": "Rain on the window, shallow focus."},
]}
ANSWERS = [m["content"] for m in THREE_TURNS["messages"] if m["role"] == "assistant"]


def trained_runs(tokenizer, example) -> list[str]:
    """The trained tokens as the texts of their consecutive runs."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token  # a trained position is labelled with its own token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def check_three_turn_mask(tokenizer, end_of_turn: str):
    (every,) = tokenize_rows(tokenizer, [THREE_TURNS], DataConfig(), "t")
    assert trained_runs(tokenizer, every) == [a + end_of_turn for a in ANSWERS]
    # token by token: what is not trained is exactly the rendered conversation minus the answers
    rendered = tokenizer.apply_chat_template(THREE_TURNS["messages"], tokenize=False)
    assert tokenizer.decode(every.input_ids) == rendered
    untrained = tokenizer.decode([t for t, label in zip(every.input_ids, every.labels, strict=True) if label == IGNORE])
    assert untrained == rendered.replace(ANSWERS[0] + end_of_turn, "", 1).replace(
        ANSWERS[1] + end_of_turn, "", 1).replace(ANSWERS[2] + end_of_turn, "", 1)
    (last,) = tokenize_rows(tokenizer, [THREE_TURNS], DataConfig(train_on="last_assistant_turn"), "t")
    assert trained_runs(tokenizer, last) == [ANSWERS[2] + end_of_turn] and last.input_ids == every.input_ids


def test_every_assistant_turn_is_trained_under_the_demo_template(tokenizer):
    check_three_turn_mask(tokenizer, "<|im_end|>")


def test_every_assistant_turn_is_trained_under_smollm2s_chatml(smollm2):
    from transformers import AutoTokenizer

    check_three_turn_mask(AutoTokenizer.from_pretrained(smollm2), "<|im_end|>")


@pytest.mark.parametrize(("row", "trained"), [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "A lone "}, {"type": "text", "text": "man."}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A close-up."}]}]}, "A close-up."),
    ({"prompt": "Scene", "completion": "NA"}, "NA"),
    ({"prompt": "Scene", "completion": "None"}, "None"),
])
def test_text_is_trained_exactly_as_written(tokenizer, row, trained):
    (ex,) = tokenize_rows(tokenizer, [row], DataConfig(), "t")
    assert trained_runs(tokenizer, ex) == [trained + "<|im_end|>"]
    if "messages" in row:
        assert "A lone man." in tokenizer.decode(ex.input_ids)  # parts joined, not a printed Python list


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
     "row 1: not in chat form: message 2's content is null"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
     "row 1: not in chat form: the assistant's answer is empty"),
    ({"prompt": "x", "completion": None}, "row 1: not in completion form: 'completion' is null"),
    ({"prompt": "x", "completion": ""}, "row 1: not in completion form: the assistant's answer is empty"),
    ({"instruction": "x", "output": 3}, "row 1: not in instruction form: 'output' is int, not text"),
])
def test_null_or_empty_answers_are_row_errors(tokenizer, row, message):
    with pytest.raises(LoratuneError, match=message):
        tokenize_rows(tokenizer, [row], DataConfig(), "d.jsonl")


def test_csv_cells_are_text_exactly_as_written(tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nScene one,NA\nScene two,null\nScene three,N/A\nScene four,"None"\n5,6\n')
    train, _ = load_examples(tokenizer, DataConfig(path=str(path), validation_size=1), seed=0)
    answers = sorted(trained_runs(tokenizer, e)[0].removesuffix("<|im_end|>") for e in train)
    all_answers = sorted(["NA", "null", "N/A", "None", "6"])
    assert set(answers) <= set(all_answers) and len(answers) == 4
    path.write_text("prompt,completion\nScene one,\nScene two,ok\n")
    with pytest.raises(LoratuneError, match="d.csv: row 1: not in completion form: the assistant's answer is empty"):
        load_examples(tokenizer, DataConfig(path=str(path), validation_size=1), seed=0)


def test_a_chat_template_that_refuses_a_conversation_is_one_line(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tiny_model)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(LoratuneError) as err:
        tokenize_rows(strict, [COMPLETION], DataConfig(system_prompt="Be brief."), "d.jsonl")
    assert str(err.value) == ("d.jsonl: row 1: the model's chat template refused it: System role not supported "
                              "(data.system_prompt adds a system message, which this template may not take)")


def test_without_a_template_a_tokenizer_that_adds_bos_keeps_it(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    tok.bos_token = "<|endoftext|>"
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)])
    assert tok("Scene")["input_ids"][0] == tok.bos_token_id  # as at inference
    (ex,) = tokenize_rows(tok, [COMPLETION], DataConfig(), "t")
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1] != tok.bos_token_id  # one BOS, not zero or two
    assert trained_runs(tok, ex) == ["Framing: a single close-up.<|im_end|>"]


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00garbage\x01", "cannot read"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n', "line 2, column 34: not valid JSON (expecting ',' delimiter)"),
])
def test_unreadable_data_files_name_the_line(tokenizer, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(LoratuneError) as err:
        load_examples(tokenizer, DataConfig(path=str(path)), seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    ('prompt,completion\n"unterminated,x\n', "d.csv: line 2: unexpected end of data"),
    ("prompt,completion\na,b,c\n", "d.csv: line 2: 3 fields where the header has 2"),
])
def test_broken_csv_files_name_the_line(tokenizer, tmp_path, content, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(LoratuneError, match=message):
        load_examples(tokenizer, DataConfig(path=str(path)), seed=0)


# ---------------------------------------------------------------------------------------------
# The ids a trial trains on are the ids of the whole rendered conversation, tokenized at once


QA = [("What is the capital of France?", "Paris is the capital of France."), ("Opposite of cold?", "Hot."),
      ("Which planet is red?", "Mars is the red planet."), ("A baby cat is called?", "A kitten.")]
TEMPLATES = {  # SentencePiece-style tokenizers as Llama 2, Mistral, Zephyr and TinyLlama ship them
    "mistral_inst": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                     "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
                     ["<unk>", "<s>", "</s>"], "</s>"),
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
               ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}


def metaspace_tokenizer(name: str):
    """A small SentencePiece-style BPE (Metaspace, prepend_scheme "first"), trained here offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, eos = TEMPLATES[name]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = [f"{q} {a}" for q, a in QA] * 20 + ["[INST] [/INST] user assistant"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>")
    hf.chat_template = template
    return hf


class WithoutOffsets:
    """A tokenizer that cannot give character offsets, as SentencePiece tokenizers in Python cannot."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def check_whole_conversation(tok, rows: list[dict], end_of_turn: str):
    examples = tokenize_rows(tok, rows, DataConfig(), "qa.jsonl")
    without_offsets = tokenize_rows(WithoutOffsets(tok), rows, DataConfig(), "qa.jsonl")
    for row, ex, other in zip(rows, examples, without_offsets, strict=True):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        assert ex.input_ids == whole  # what generation and serving see
        assert response_text(tok, ex).strip() == row["completion"] + end_of_turn
        assert (other.input_ids, other.labels) == (ex.input_ids, ex.labels)  # the prefix method agrees


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_sentencepiece_tokenizer_trains_on_the_ids_of_the_whole_conversation(name):
    """The issue's example: with the prompt and answer tokenized apart, '[/INST]Paris' was trained as '▁Paris'
    (10 of 10 rows differed on each template)."""
    check_whole_conversation(metaspace_tokenizer(name), [{"prompt": q, "completion": a} for q, a in QA],
                             TEMPLATES[name][2])


def test_byte_level_bpe_trains_on_the_ids_of_the_whole_conversation(tokenizer):
    check_whole_conversation(tokenizer, [{"prompt": q, "completion": a} for q, a in QA], "<|im_end|>")


def test_smollm2_trains_on_the_ids_of_the_whole_conversation(smollm2):
    from transformers import AutoTokenizer

    check_whole_conversation(AutoTokenizer.from_pretrained(smollm2), [{"prompt": q, "completion": a} for q, a in QA],
                             "<|im_end|>")


REASONING_TEMPLATE = (  # Qwen3's property: an (empty) reasoning block only on turns after the last user message
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{{ m['content'] + '<|im_end|>\\n' }}{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}")


def test_a_template_that_rewrites_earlier_turns_trains_each_turn_as_it_renders_it_then(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = REASONING_TEMPLATE
    messages = THREE_TURNS["messages"]
    turns = tokenize_rows(tok, [THREE_TURNS], DataConfig(), "t")
    assert len(turns) == 3  # one example per assistant turn
    for k, (ex, answer) in enumerate(zip(turns, ANSWERS, strict=True)):
        upto = messages[:[i for i, m in enumerate(messages) if m["role"] == "assistant"][k] + 1]
        assert tok.decode(ex.input_ids) == tok.apply_chat_template(upto, tokenize=False)  # as served at that turn
        assert trained_runs(tok, ex) == [f"<think>\n\n</think>\n\n{answer}<|im_end|>"]
    (last,) = tokenize_rows(tok, [THREE_TURNS], DataConfig(train_on="last_assistant_turn"), "t")
    assert (last.input_ids, last.labels) == (turns[2].input_ids, turns[2].labels)
    # a held-out row keeps all its turns: 4 conversations of 3 turns, one of them validation
    path = write_jsonl(tmp_path / "chats.jsonl", [THREE_TURNS] * 4)
    train, validation = load_examples(tok, DataConfig(path=str(path), validation_size=1), seed=0)
    assert (len(train), len(validation)) == (9, 3)


def test_an_answer_whose_end_cannot_be_marked_is_one_line_that_says_what_to_set(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.eos_token = None
    tok.chat_template = None
    with pytest.raises(LoratuneError, match="the tokenizer has neither a chat template nor an eos_token, so the model "
                                            "could not learn where an answer ends; set eos_token"):
        tokenize_rows(tok, [COMPLETION], DataConfig(), "t")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(LoratuneError, match="the chat template puts nothing after an assistant's answer"):
        tokenize_rows(tok, [COMPLETION], DataConfig(), "t")
