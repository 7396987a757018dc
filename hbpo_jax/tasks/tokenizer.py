"""A small tokenizer trained offline on task text, usable through transformers.

sentencepiece trains a BPE vocabulary (digits split, no text normalisation, no dummy prefix) on the
text between the fixed tokens (its unigram trainer prunes a vocabulary this repetitive down to
characters); the pieces, in sentencepiece's merge order, become a `tokenizers` BPE model (each
piece's merge is its split into two earlier pieces) wrapped in transformers' fast tokenizer, which
adds:
  - special tokens `<|im_start|>`, `<|im_end|>` (EOS) and `<|endoftext|>` (padding),
  - `<think>`, `</think>`, a newline and `\\boxed{` as single, non-special tokens (so decoding with
    skip_special_tokens keeps the think tags the grader looks for),
  - a ChatML chat template.
Spaces become "▁" and start a new pre-token, so a text that ends at a word boundary tokenises to a
prefix of any continuation that starts with a space or a newline. Decoding inverts encoding
exactly for text made of characters seen in training. Same texts and settings -> same tokenizer.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

from hbpo_jax import files

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EXTRA_TOKENS = ("<think>", "</think>", "\n", "\\boxed{")  # single tokens, not special
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Always in the training text, whatever the caller passes: the chat roles and the HBPO prefixes.
_BASE_TEXTS = ("system", "user", "assistant", "I will answer the question with minimal tokens",
               "I will answer the question with 512 tokens")
_FIXED = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + EXTRA_TOKENS))
_META = "\u2581"


def _segments(texts: Iterable[str], whole_words: Sequence[str] = ()) -> list[str]:
    """The pieces of text between fixed tokens (and whole words): what the BPE trainer sees."""
    fixed = _FIXED if not whole_words else re.compile(
        "|".join([_FIXED.pattern] + [rf"\b{re.escape(w)}\b" for w in whole_words]))
    out = []
    for text in texts:
        out += [s for s in fixed.split(text) if s.strip()]
    return out


def _train_pieces(segments: Sequence[str], vocab_size: int) -> list[str]:
    """sentencepiece BPE pieces, best (earliest merged) first; '<unk>' is piece 0."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(segments), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, byte_fallback=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, unk_piece="<unk>",
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        max_sentencepiece_length=16, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _merges(pieces: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that rebuild every multi-character piece, ordered by the piece's rank, then by
    the ranks of its two halves."""
    rank = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece in pieces:
        splits = [(rank[piece[:i]], rank[piece[i:]], piece[:i], piece[i:]) for i in range(1, len(piece))
                  if piece[:i] in rank and piece[i:] in rank]
        merges += [(rank[piece], a, b, left, right) for a, b, left, right in splits]
    return [(left, right) for *_, left, right in sorted(merges)]


def _fast_tokenizer(pieces: list[str], whole_words: Sequence[str] = ()):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab, _merges(pieces), unk_token="<unk>", fuse_unk=True))
    meta = dict(replacement=_META, prepend_scheme="never", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(**meta), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace(**meta)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    tok.add_tokens([AddedToken(w, special=False, normalized=False, single_word=True) for w in whole_words])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=1 << 20)


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 192, whole_words: Sequence[str] = (),
                    workdir: str | None = None):
    """Trains a tokenizer on `texts` and returns it as a transformers fast tokenizer.

    vocab_size: the sentencepiece vocabulary (a soft limit: a small corpus may give fewer pieces);
    the fixed tokens come on top, so len(tokenizer) is about vocab_size + 7.
    whole_words: words that become one token each wherever they stand alone (e.g. the budget
    numbers "32", "160", which digit splitting would spread over the operand digits' tokens).
    workdir: when given, the tokenizer is cached in workdir/tokenizer-<hash of texts and settings>
    and loaded from there on later calls (transformers' save_pretrained layout).
    Takes about a second for a few thousand short texts.
    """
    texts, whole_words = list(_BASE_TEXTS) + list(texts), tuple(whole_words)
    folder = None
    if workdir is not None:
        key = [vocab_size, texts] + ([list(whole_words)] if whole_words else [])
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        folder = files.join(workdir, f"tokenizer-{digest}")
        if files.exists(files.join(folder, "tokenizer.json")):
            return load_tokenizer(folder)
    tokenizer = _fast_tokenizer(_train_pieces(_segments(texts, whole_words), vocab_size), whole_words)
    if folder is not None:
        _cache(tokenizer, folder)
    return tokenizer


def _cache(tokenizer, folder: str) -> None:
    """Saves `tokenizer` into `folder` (local or gs://) so that a reader never loads half of it:
    the other files first, tokenizer.json (what `build_tokenizer` looks for) last, each written
    whole. No folder rename (gcsfuse and GCS have none). Concurrent builders of the same
    tokenizer write the same bytes."""
    with tempfile.TemporaryDirectory(prefix="hbpo-jax-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        names = sorted(os.listdir(local), key=lambda n: n == "tokenizer.json")
        files.makedirs(folder)
        for name in names:
            tmp = files.join(folder, f".{name}.tmp{os.getpid()}") if files.is_local(folder) else None
            if tmp:  # locally: a file rename makes each file appear whole
                files.copy_file(os.path.join(local, name), tmp)
                os.replace(tmp, files.join(folder, name))
            else:  # GCS: one object upload is whole by itself
                files.copy_file(os.path.join(local, name), files.join(folder, name))


def load_tokenizer(folder: str):
    """Loads a tokenizer saved with save_pretrained, offline, exactly as saved."""
    from hbpo_jax.models.hf import load_tokenizer as load
    return load(folder)
