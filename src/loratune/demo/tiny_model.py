"""The offline demo base model: a tiny Qwen2 built here, with no network, and cached.

A byte-level BPE tokenizer is trained with ``tokenizers`` on the demo's vocabulary, weights start
from a fixed seed, and a short pre-training on text in the demo's words (with scenes and plans paired
at random) teaches the model the language and the chat format but not the task. One LoRA trial on
it takes seconds on two CPU cores, and its loss responds to learning rate, rank and alpha.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

VERSION = "v1"  # bump when anything below changes: it names the cache directory
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR, SEED = 300, 16, 3e-3, 0


def cache_root() -> Path:
    """Where built models are cached: ``$LORATUNE_CACHE`` or ``~/.cache/loratune``."""
    return Path(os.environ.get("LORATUNE_CACHE") or Path.home() / ".cache" / "loratune")


def cache_dir() -> Path:
    return cache_root() / f"tiny-qwen2-{VERSION}"


def ensure_tiny_model(quiet: bool = True) -> Path:
    """Return the directory of the demo model, building it once (about half a minute on 2 cores).

    Concurrent callers (parallel trials) wait on a file lock; the build goes to a temporary
    directory that is renamed into place, so a crash never leaves a half-written model.
    """
    return ensure_built(cache_dir(), lambda out: build(out, quiet=quiet))


def ensure_built(target: Path, build_into: Callable[[Path], None]) -> Path:
    """Return ``target``, first running ``build_into(tmp)`` and renaming ``tmp`` to it if it has no model.

    A file lock next to ``target`` makes concurrent callers wait for one build; a failed build
    leaves nothing behind (its temporary directory is removed).
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
            try:
                build_into(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Turn off transformers' progress bars (``save_pretrained`` draws "Writing model shards" on stderr)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build(out: Path, quiet: bool = True) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from .dataset import pretraining_corpus

    corpus = pretraining_corpus()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(corpus),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(SEED)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    _pretrain(model, tokenizer, corpus, quiet)
    with quiet_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _train_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _pretrain(model, tokenizer, corpus: list[str], quiet: bool) -> None:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    ids = [torch.tensor(tokenizer(text)["input_ids"]) for text in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    model.train()
    for step in range(PRETRAIN_STEPS):
        pick = torch.randint(len(ids), (PRETRAIN_BATCH,), generator=generator).tolist()
        batch = torch.nn.utils.rnn.pad_sequence([ids[i] for i in pick], batch_first=True, padding_value=-100)
        labels = batch.clone()
        inputs = batch.masked_fill(batch == -100, tokenizer.pad_token_id)
        loss = model(input_ids=inputs, attention_mask=(batch != -100).long(), labels=labels).loss
        loss.backward()
        for group in optimizer.param_groups:  # linear decay keeps the short run stable
            group["lr"] = PRETRAIN_LR * (1 - step / PRETRAIN_STEPS)
        optimizer.step()
        optimizer.zero_grad()
        if not quiet and step % 50 == 0:
            print(f"pre-training the demo model: step {step}/{PRETRAIN_STEPS}, loss {loss.item():.3f}")
    model.eval()
